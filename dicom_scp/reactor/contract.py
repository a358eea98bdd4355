"""What the fast receive path relies on inside pynetdicom, checked against the installed one.

The loops of :mod:`dicom_scp.reactor` override or call private methods of pynetdicom and
read its private attributes. A version number says little about those (a patch release
may change any of them), so each is pinned here by the SHA-256 of its source as the path
was written against, together with the module of ours that mirrors it. :func:`differences`
names every one that changed or is gone; :func:`is_supported` is true only when nothing
did, and the server falls back to pynetdicom's own loops otherwise. The contract test
fails on any difference, so an upgrade of pynetdicom is a deliberate review, not luck.

To accept a reviewed pynetdicom release, update the mirroring module and run
``python -m dicom_scp.reactor.contract`` to print the new table.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import textwrap
from typing import Any

__all__ = ["ATTRIBUTES", "METHODS", "differences", "fingerprint", "is_supported"]

_DUL = "dicom_scp/reactor/dul.py"
_DIRECT = "dicom_scp/reactor/direct.py"
_ASSOC = "dicom_scp/reactor/association.py"
_SOCKETS = "dicom_scp/reactor/sockets.py"
_SERVER = "dicom_scp/reactor/server.py"

METHODS: dict[str, tuple[str, str]] = {
    # dotted path: (sha256 of its source, the module of ours that depends on it)
    "pynetdicom.dul.DULServiceProvider.__init__": (
        "6ba6c0a89a5ab52aeedde7f6589d8ab3b826f82f1822c9ae28d730acb460a42d", _DUL),
    "pynetdicom.dul.DULServiceProvider.run_reactor": (
        "780cd7ed323ef3bb42f5df9daab4bc44099e55b686f1993e433c04f2a31adbf7", _DUL),
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": (
        "4679cb00a659ff5f49fc7e51131d51d1b21f1d1ccd00d36e0ae90850b0ac578e", _DUL),
    "pynetdicom.dul.DULServiceProvider.kill_dul": (
        "81a5917503d167bf5c652f005b00ef21e99b6048f90be1feffe93e5409333382", _DUL),
    "pynetdicom.dul.DULServiceProvider.stop_dul": (
        "2d3c60aed053f592b801493c808957c75943ddc55b8532d4ea52ffcb11f56b5f", _DUL),
    "pynetdicom.dul.DULServiceProvider._decode_pdu": (
        "1c1f241500de9aafa4a41c9676b7cd6fa115e33630a60b6d3f1ac9d8bb7657a1", _DUL),
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive": (
        "be1c4202c189e6ac133d698cf7e0e79e0d9dcc281f0ab6ac92b4d627c764e048", _DUL),
    "pynetdicom.dul.DULServiceProvider._is_transport_event": (
        "6868c3eee650bc3fbde4941019ec1d90ae2ef05a42dbb6be9be1690bc62b4fd8", _DUL),
    "pynetdicom.dul.DULServiceProvider.receive_pdu": (
        "bf6204d9f8c3f5a632badc4ce2ded14384706cf7fc1c86871b1d574e3d12838d", _DUL),
    "pynetdicom.dimse.DIMSEServiceProvider.__init__": (
        "b5d6429f7c244e2eaf0c63c86dbd5e609e75cf51eedef4e9fee1bfae993762fd", _DIRECT),
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive": (
        "4307baf82f143a89e4179915d3100d5b6c308eec40c9bb13dff139715e3c59f1", _DIRECT),
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg": (
        "b285f58a41affc09e748d56f2473298d25c385f070320b89d0e23f939f759d93", _DIRECT),
    "pynetdicom.association.Association._serve_request": (
        "b9dad50a37d68ef777c74ed2c0f6a845954dce2198b1d7b2e0fb380c84ce3416", _DIRECT),
    "pynetdicom.association.Association.__init__": (
        "37cd0192fe87ffd120497ba255bb6c6126cdc76a9d7d5377ca4ceb17f8db2df2", _ASSOC),
    "pynetdicom.association.Association.run_reactor": (
        "3b2745eed4988ef723e3d600d161bf23f969dab04ded44aea1c9d8089924926c", _ASSOC),
    "pynetdicom.association.Association._run_reactor": (
        "cbf8d3c3eb37093aa702f646a200a8166ea574542d1c83dcebb779ef22053ecc", _ASSOC),
    "pynetdicom.association.Association.kill": (
        "531f3ec8d4df979aef30bc15ff2fa0df3ee439c1a8fdccbd77476eae7d1b7ba5", _ASSOC),
    "pynetdicom.transport.RequestHandler._create_association": (
        "4ad65038b9aedd3656fbd79714c57c5d257256b888e6a633818d1b7904a60be3", _ASSOC),
    "pynetdicom.transport.RequestHandler.handle": (
        "049e60ec3c8c25f60e8acd8bc7635fe532180c5c9e70c1d22defa0fe5749e898", _ASSOC),
    "pynetdicom.transport.AssociationSocket.__init__": (
        "bdf9c81c82dd508f68dcac8ae6ff36d0a2be68f9fd7d1be757ec8b2c7f5078b1", _SOCKETS),
    "pynetdicom.transport.AssociationSocket.recv": (
        "0c5fbc85ac69f1b2b3ee39596cb8228caddb8debba10f3b4393d5715cf230c19", _SOCKETS),
    "pynetdicom.transport.AssociationSocket.ready": (
        "245230e31ef3ad5194231c9ae5a25a8d14bab025364606139100a0cc8cb7bba4", _SOCKETS),
    "pynetdicom.transport.AssociationServer.__init__": (
        "c8e7a80c8793ae783321dd49e8fcb51dfe5841d3b5a130e744b55150a9b811ee", _SERVER),
    "pynetdicom.transport.AssociationServer.get_request": (
        "94f13a70081c532264d9402ae1c44c05b05a71f1c8c5ea58ccadd45e8427b44b", _SERVER),
    "pynetdicom.transport.AssociationServer.process_request": (
        "81d905e69dfbbde770aac0d78fa31a556f8ca4175ea6224b39d930784f4abf95", _SERVER),
    "pynetdicom.transport.AssociationServer.shutdown": (
        "172412b9556c206aed7674c84b97d95d1c05f54b295d184f3f94c4b89e66f71f", _SERVER),
    "pynetdicom.transport.AssociationServer.active_associations": (
        "389e6caeadb130655565f6f90857f6fbfa6d1ab385806a922efaeb76793260d1", _SERVER),
    "pynetdicom.transport.ThreadedAssociationServer.process_request_thread": (
        "dcccbc61de08d727373bd12cff41b027d44681c8c00367675a9b9180140acbde", _SERVER),
    "pynetdicom.acse.ACSE._negotiate_as_acceptor": (
        "317caea98a1e6be0ff4cfe0254be672204c5ad29e566c79e3dd8dcd48331ffbc", _SERVER),
    "pynetdicom.ae.ApplicationEntity.make_server": (
        "83ba1aae727c61e00a9ecb8997baa8eb0980c8869e946697bc2c370add25de96", _SERVER),
}
"""Methods the path overrides with mirrored logic or calls, pinned by their source."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "pynetdicom.association.Association": (
        "_accepted_cx", "_dul_ready", "_is_paused", "_kill", "_reactor_checkpoint",
        "_sent_release", "_server", "_started_dul", "acceptor", "requestor", "dul", "dimse",
    ),
    "pynetdicom.dul.DULServiceProvider": (
        "_idle_timer", "_kill_thread", "_recv_pdu", "artim_timer", "event_queue",
        "state_machine", "to_provider_queue", "to_user_queue",
    ),
    "pynetdicom.dimse.DIMSEServiceProvider": ("cancel_req", "message", "msg_queue"),
}
"""Private (and not-so-public) instance attributes the path reads or replaces."""

MODULE_NAMES: tuple[str, ...] = (
    "pynetdicom.dul._PDU_TYPES",
    "pynetdicom._config.STORE_RECV_CHUNKED_DATASET",
    "pynetdicom._globals.MODE_ACCEPTOR",
    "pynetdicom._handlers.standard_dimse_recv_handler",
    "pynetdicom._handlers.standard_dimse_sent_handler",
    "pynetdicom._handlers.standard_pdu_recv_handler",
    "pynetdicom._handlers.standard_pdu_sent_handler",
)
"""Private module-level names the path imports."""


def _resolve(dotted: str) -> Any:
    """The object at ``dotted`` (module, then attributes); raises AttributeError/ImportError."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = inspect.getattr_static(target, name)
        return target
    raise ImportError(dotted)


def fingerprint(dotted: str) -> str:
    """SHA-256 of the source of the function, method or property at ``dotted``."""
    target = _resolve(dotted)
    if isinstance(target, property):
        target = target.fget
    if isinstance(target, staticmethod | classmethod):
        target = target.__func__
    source = textwrap.dedent(inspect.getsource(target))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _instance(dotted: str) -> Any:
    from pynetdicom import AE  # noqa: PLC0415 - only when checking
    from pynetdicom._globals import MODE_ACCEPTOR  # noqa: PLC0415
    from pynetdicom.association import Association  # noqa: PLC0415

    assoc = Association(AE(), MODE_ACCEPTOR)
    return {
        "pynetdicom.association.Association": assoc,
        "pynetdicom.dul.DULServiceProvider": assoc.dul,
        "pynetdicom.dimse.DIMSEServiceProvider": assoc.dimse,
    }[dotted]


@functools.cache
def differences() -> tuple[str, ...]:
    """Every way the installed pynetdicom differs from what the fast path mirrors."""
    found: list[str] = []
    for dotted, (expected, ours) in METHODS.items():
        try:
            actual = fingerprint(dotted)
        except (AttributeError, ImportError, OSError, TypeError) as exc:
            found.append(f"{dotted} is gone ({type(exc).__name__}); {ours} relies on it")
            continue
        if actual != expected:
            found.append(
                f"{dotted} changed (source sha256 {actual[:12]}, expected {expected[:12]}); "
                f"review {ours}"
            )
    for dotted, names in ATTRIBUTES.items():
        try:
            instance = _instance(dotted)
        except Exception as exc:
            found.append(f"cannot build a {dotted} to check: {type(exc).__name__}: {exc}")
            continue
        found.extend(
            f"{dotted} has no attribute {name!r}"
            for name in names
            if not hasattr(instance, name)
        )
    for dotted in MODULE_NAMES:
        try:
            _resolve(dotted)
        except (AttributeError, ImportError):
            found.append(f"{dotted} is gone")
    return tuple(found)


def is_supported() -> bool:
    """Whether the installed pynetdicom is exactly what the fast path was written against."""
    return not differences()


def _print_table() -> None:
    for dotted, (_, ours) in METHODS.items():
        try:
            print(f"{fingerprint(dotted)}  {dotted}  ({ours})")
        except (AttributeError, ImportError, OSError) as exc:
            print(f"gone  {dotted}: {exc}")


if __name__ == "__main__":
    _print_table()
