"""The structures Dafne's lower-leg model segments, with their DICOM codes.

A label's integer value is its index in a label map (0 is background) and its
segment number in a DICOM-SEG. Codes follow DICOM PS3.16 practice for
segmentations: the category is "Anatomical Structure" and the type is the
SNOMED CT body-structure concept of the muscle, so that a viewer (3D Slicer,
OHIF) shows the right name and colour without knowing this project.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")


@dataclass(frozen=True)
class Label:
    """One segmented structure.

    Attributes
    ----------
    value:
        Value in a label map and segment number in a DICOM-SEG (1-based).
    key:
        Short machine name used in manifests, logs and CLI output.
    name:
        Human-readable name shown to radiologists (the Segment Label).
    type_code:
        SNOMED CT code of the structure (Segmented Property Type).
    category_code:
        Segmented Property Category, "Anatomical Structure" for every muscle.
    """

    value: int
    key: str
    name: str
    type_code: Code
    category_code: Code = ANATOMICAL_STRUCTURE


LEG_MUSCLES: tuple[Label, ...] = (
    Label(1, "soleus", "Soleus", Code("181702007", "SCT", "Soleus muscle")),
    Label(2, "gastrocnemius_medial", "Medial gastrocnemius",
          Code("213689008", "SCT", "Medial head of gastrocnemius muscle")),
    Label(3, "gastrocnemius_lateral", "Lateral gastrocnemius",
          Code("213588009", "SCT", "Lateral head of gastrocnemius muscle")),
    Label(4, "tibialis_anterior", "Tibialis anterior",
          Code("181696007", "SCT", "Tibialis anterior muscle")),
    Label(5, "extensor_digitorum_longus", "Extensor digitorum longus",
          Code("52297001", "SCT", "Extensor digitorum longus muscle")),
    Label(6, "peroneus", "Peroneus",
          Code("181694005", "SCT", "Peroneus muscle")),
)
"""The six muscles of Dafne's leg model, in label-map order."""


def label_by_key(key: str) -> Label:
    """Return the leg-muscle label with this key.

    Raises
    ------
    KeyError
        If no label has that key; the message lists the valid keys.
    """
    for label in LEG_MUSCLES:
        if label.key == key:
            return label
    valid = ", ".join(label.key for label in LEG_MUSCLES)
    raise KeyError(f"unknown label {key!r}; valid labels: {valid}")
