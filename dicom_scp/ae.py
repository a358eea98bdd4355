"""The node's Application Entity: SOP classes, transfer syntaxes, timeouts, sockets.

Everything a PACS administrator reads in the conformance statement is defined here, in one
place: which storage SOP classes are accepted, in which transfer syntaxes, and how the AE
behaves on the network (PDU size, association limit, timeouts, TCP_NODELAY).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = [
    "DAFNE_IMPLEMENTATION_UID",
    "DAFNE_IMPLEMENTATION_VERSION",
    "DEFAULT_MAX_PDU",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "build_ae",
    "requested_contexts",
    "set_nodelay",
    "storage_contexts",
]

LOGGER = logging.getLogger(__name__)

# A UUID-derived UID (PS3.5 §B.2): uuid5(NAMESPACE_URL, "https://github.com/dafne-imaging/dafne-node")
DAFNE_IMPLEMENTATION_UID = "2.25.203717175820030100373152753576081089440"
DAFNE_IMPLEMENTATION_VERSION = "DAFNE_NODE_01"

# The largest P-DATA PDU we accept. Bigger PDUs mean fewer round trips through the upper
# layer per instance (a 256x256 MR image is 2 PDUs at 128 KiB instead of 9 at 16 KiB).
DEFAULT_MAX_PDU = 1024 * 1024

STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
}
"""Storage SOP classes accepted as SCP (and sent as SCU), UID -> name."""

TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, First-Order Prediction (Process 14 SV1)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless Only",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
"""Transfer syntaxes accepted for every storage SOP class, in order of preference.

pynetdicom accepts the first syntax of this list that the requestor proposed in a context,
so uncompressed and lossless syntaxes come first: a sender that offers both is never made
to compress lossily. Instances are stored in the syntax they arrive in (no transcoding).
"""


def storage_contexts(
    sop_classes: Iterable[str] | None = None,
    transfer_syntaxes: Sequence[str] | None = None,
) -> list[PresentationContext]:
    """The presentation contexts the SCP supports: Verification plus storage.

    Parameters
    ----------
    sop_classes : iterable of str, optional
        Storage SOP Class UIDs; :data:`STORAGE_SOP_CLASSES` by default.
    transfer_syntaxes : sequence of str, optional
        Transfer syntax UIDs; :data:`TRANSFER_SYNTAXES` by default.
    """
    syntaxes = list(transfer_syntaxes or TRANSFER_SYNTAXES)
    contexts = [build_context(Verification)]
    for uid in sop_classes or STORAGE_SOP_CLASSES:
        contexts.append(build_context(uid, syntaxes))
    return contexts


def requested_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts for an SCU: one per (SOP class, transfer syntax) pair.

    A context per exact pair lets the files go out byte for byte in their own transfer
    syntax; Explicit VR Little Endian is added as a fallback for uncompressed data.
    """
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    for sop_class, syntax in pairs:
        if (sop_class, syntax) in seen:
            continue
        seen.add((sop_class, syntax))
        syntaxes = [syntax]
        if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2"):
            syntaxes.append("1.2.840.10008.1.2.1")
        contexts.append(build_context(sop_class, syntaxes))
    if len(contexts) > 127:
        raise ValueError(f"{len(contexts)} presentation contexts needed, at most 127 allowed")
    return contexts


def build_ae(
    ae_title: str,
    *,
    max_associations: int = 16,
    max_pdu: int = DEFAULT_MAX_PDU,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    connection_timeout: float | None = 10.0,
) -> AE:
    """Build the node's AE with its identity, limits and timeouts (no contexts yet).

    Parameters
    ----------
    ae_title : str
        The node's AE title (at most 16 characters).
    max_associations : int
        How many associations may be active at once before new ones are rejected
        ("local limit exceeded").
    max_pdu : int
        Maximum PDU length the node receives; ``0`` means unlimited.
    acse_timeout, dimse_timeout, network_timeout, connection_timeout : float
        Seconds to wait for association messages, DIMSE messages, any network traffic,
        and a TCP connection (SCU side).
    """
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = DAFNE_IMPLEMENTATION_UID
    ae.implementation_version_name = DAFNE_IMPLEMENTATION_VERSION
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    return ae


def set_nodelay(sock: socket.socket | None) -> None:
    """Switch off Nagle's algorithm on ``sock``.

    Why: a DIMSE exchange is a small command PDU followed by a response; with Nagle on,
    the small PDU waits for the peer's delayed ACK (40 ms on Linux) and pynetdicom drops
    to ~20 images/s.
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # e.g. a socket that is already closed
        LOGGER.debug("cannot set TCP_NODELAY: %s", exc)
