"""DICOM-SEG in and out: what the node writes for PACS and reads back from viewers."""

from dafne_node.seg.decode import (
    DecodedSegmentation,
    SegmentationError,
    SegmentInfo,
    SourceFrame,
    decode_segmentation,
    map_segments,
    read_segments,
    source_frames_of,
)
from dafne_node.seg.encode import SegmentationAlgorithm, encode_segmentation

__all__ = [
    "DecodedSegmentation",
    "SegmentInfo",
    "SegmentationAlgorithm",
    "SegmentationError",
    "SourceFrame",
    "decode_segmentation",
    "encode_segmentation",
    "map_segments",
    "read_segments",
    "source_frames_of",
]
