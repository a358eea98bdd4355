"""Routing rules as a PACS administrator writes them."""

from __future__ import annotations

from pydicom.uid import MRImageStorage, SegmentationStorage

from dafne_node.config import Route
from dafne_node.inference.route import Correction, Segment, SeriesFacts, Skip, route_series

T1_LEG = SeriesFacts(calling_ae="ORTHANC", modality="MR", sop_class_uid=MRImageStorage,
                     body_part="LEG", series_description="T1 TSE axial calf",
                     image_type=("ORIGINAL", "PRIMARY", "M"), instance_count=40)


def test_without_rules_mr_goes_to_the_default_destination() -> None:
    assert route_series(T1_LEG, [], "pacs") == Segment("default", "default", ("pacs",))


def test_without_a_destination_the_series_is_skipped_with_the_reason() -> None:
    decision = route_series(T1_LEG, [], None)
    assert isinstance(decision, Skip)
    assert "no default destination" in decision.reason


def test_first_matching_rule_decides() -> None:
    routes = [
        Route(name="knees", body_part="KNEE", destinations=["pacs"]),
        Route(name="calves", series_description=r"t1.*calf", min_slices=20,
              calling_ae="ORTHANC", image_type="PRIMARY", destinations=["pacs", "research"]),
    ]
    assert route_series(T1_LEG, routes, None) == Segment("calves", "default",
                                                         ("pacs", "research"))


def test_no_match_lists_why_each_rule_failed() -> None:
    routes = [Route(name="big", min_slices=100, destinations=["pacs"]),
              Route(name="ct", modality="CT", destinations=["pacs"]),
              Route(name="derived", image_type="DERIVED", destinations=["pacs"])]
    decision = route_series(T1_LEG, routes, "pacs")
    assert isinstance(decision, Skip)
    assert "big: 40 slices, fewer than 100" in decision.reason
    assert "ct: modality 'MR' is not 'CT'" in decision.reason
    assert "derived: image type 'ORIGINAL/PRIMARY/M' lacks 'DERIVED'" in decision.reason


def test_a_seg_is_never_segmented() -> None:
    seg = SeriesFacts(calling_ae="ORTHANC", modality="SEG", sop_class_uid=SegmentationStorage)
    assert route_series(seg, [Route(name="all", modality=None, destinations=["p"])],
                        "p") == Correction()


def test_non_mr_is_skipped_by_the_default_rule() -> None:
    ct = SeriesFacts(calling_ae="X", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                     instance_count=100)
    decision = route_series(ct, [], "pacs")
    assert isinstance(decision, Skip) and "modality 'CT' is not 'MR'" in decision.reason
