"""Synthetic lower-leg MRI studies of both calves, with ground truth, for four sites.

No real patient data may be used by this project, so training, validation and the DICOM tests
all run on this phantom: a parametric shape model of the calf (``anatomy``), four hospital
protocols with different contrast, resolution, noise and shading (``sites``), rendering of
stored MR values (``render``), DICOM MR Image Storage output (``dicom``) and the documentation
figure (``figure``, imported on demand because it needs matplotlib).
"""

from dafne_node.phantom.anatomy import Subject, Tissue, random_subject
from dafne_node.phantom.dicom import slice_dataset, write_images
from dafne_node.phantom.render import PhantomStudy, make_study
from dafne_node.phantom.sites import SITES, SiteProtocol, TissueSignals, get_site

__all__ = [
    "SITES",
    "PhantomStudy",
    "SiteProtocol",
    "Subject",
    "Tissue",
    "TissueSignals",
    "get_site",
    "make_study",
    "random_subject",
    "slice_dataset",
    "write_images",
]
