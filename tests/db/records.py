"""Test records for the index (a ``ReceivedInstance`` with sensible defaults)."""

from __future__ import annotations

from db.base import utcnow
from dicom_scp.store import ReceivedInstance

MR = "1.2.840.10008.5.1.4.1.1.4"


def record(
    n: int, series: str = "1.2.3.1", study: str = "1.2.3", **extra: object
) -> ReceivedInstance:
    """Instance ``n`` of ``series``; keyword arguments override any field."""
    values: dict[str, object] = {
        "sop_instance_uid": f"{series}.{n}",
        "sop_class_uid": MR,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "spool_path": f"{study}/{series}/{series}.{n}.dcm",
        "size_bytes": 1000,
        "received_at": utcnow(),
        "calling_ae": "MODALITY",
        "peer_address": "127.0.0.1",
        "modality": "MR",
        "series_description": "T1 axial calf",
        "body_part_examined": "LEG",
        "patient_id": "P1",
        "instance_number": n,
    }
    values.update(extra)
    return ReceivedInstance(**values)  # type: ignore[arg-type]
