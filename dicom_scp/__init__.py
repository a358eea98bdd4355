"""DICOM networking for the node: Storage SCP, Storage SCU, association policy, spool.

Knows nothing of models or training; the receive path ends at an index
(:class:`dicom_scp.store.InstanceIndex`) that the node wires to its database.
"""

from dicom_scp.admission import AdmissionLimits
from dicom_scp.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, build_ae, storage_contexts
from dicom_scp.header import HeaderError, InstanceHeader, parse_header
from dicom_scp.policy import AllowedCaller, CallerPolicy, DiskWatermark
from dicom_scp.receiver import StorageServer
from dicom_scp.sender import SendResult, echo, send_files
from dicom_scp.spool import Spool, SpoolError
from dicom_scp.store import (
    IndexResult,
    InstanceIndex,
    ReceivedInstance,
    StoreRequest,
    StoreResult,
    StoreService,
)

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "AdmissionLimits",
    "AllowedCaller",
    "CallerPolicy",
    "DiskWatermark",
    "HeaderError",
    "IndexResult",
    "InstanceHeader",
    "InstanceIndex",
    "ReceivedInstance",
    "SendResult",
    "Spool",
    "SpoolError",
    "StorageServer",
    "StoreRequest",
    "StoreResult",
    "StoreService",
    "build_ae",
    "echo",
    "parse_header",
    "send_files",
    "storage_contexts",
]
