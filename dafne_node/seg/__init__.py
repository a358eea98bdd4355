"""DICOM-SEG in and out: what the node writes for PACS and reads back from viewers."""

from dafne_node.seg.decode import DecodedSegmentation, SegmentationError, decode_segmentation
from dafne_node.seg.encode import SegmentationAlgorithm, encode_segmentation

__all__ = [
    "DecodedSegmentation",
    "SegmentationAlgorithm",
    "SegmentationError",
    "decode_segmentation",
    "encode_segmentation",
]
