"""pynetdicom event handlers: thin adapters from events to the store service and policy.

They run on the association's thread and hold up its response, so they only translate: the
work is in :class:`dicom_scp.store.StoreService`. A handler never lets an exception escape:
a failure becomes a DIMSE failure status with an Error Comment and a log line, and the
association carries on.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from dicom_scp.codec import StoreRequestCommand
from dicom_scp.policy import CallerPolicy
from dicom_scp.reactor.direct import DirectStoreHandler
from dicom_scp.store import STATUS_BAD_DATASET, StoreRequest, StoreService, error_comment

__all__ = [
    "direct_store_handler",
    "event_handlers",
    "handle_echo",
    "handle_requested",
    "handle_store",
    "store_status",
]

LOGGER = logging.getLogger(__name__)

_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03


def _peer(event: Event) -> tuple[str, str | None]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), requestor.address


def handle_echo(event: Event) -> int:
    """C-ECHO: always success (the association itself was already vetted)."""
    return 0x0000


def store_status(service: StoreService, request: StoreRequest) -> tuple[int, str | None]:
    """Run ``service`` on one C-STORE; return its status and Error Comment, logging failures.

    Shared by the ``EVT_C_STORE`` handler and the direct path of :mod:`dicom_scp.reactor`,
    so a C-STORE is answered and logged the same whichever way it came in.
    """
    try:
        result = service.store(request)
    except Exception as exc:  # a bug must not take the association down
        LOGGER.error(
            "C-STORE %s from %s@%s failed unexpectedly: %s: %s",
            request.sop_instance_uid,
            request.calling_ae,
            request.peer_address,
            type(exc).__name__,
            exc,
        )
        LOGGER.debug("the failure in detail", exc_info=exc)
        return STATUS_BAD_DATASET, error_comment("internal error", type(exc).__name__)
    if result.ok:
        if result.duplicate:
            LOGGER.info(
                "C-STORE %s from %s@%s: already stored, answered success",
                request.sop_instance_uid,
                request.calling_ae,
                request.peer_address,
            )
        return result.status, None
    LOGGER.warning(
        "C-STORE %s from %s@%s refused with 0x%04X: %s",
        request.sop_instance_uid,
        request.calling_ae,
        request.peer_address,
        result.status,
        result.reason,
    )
    return result.status, result.error_comment


def handle_store(event: Event, service: StoreService) -> int | Dataset:
    """C-STORE through pynetdicom: hand the raw data set to ``service``, answer its status."""
    calling_ae, address = _peer(event)
    request = event.request
    dataset = request.DataSet.getbuffer()
    try:
        status, comment = store_status(
            service,
            StoreRequest(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                dataset=dataset,
                calling_ae=calling_ae,
                called_ae=str(event.assoc.acceptor.ae_title).strip(),
                peer_address=address,
            ),
        )
    finally:
        dataset.release()
    if comment is None:
        return status
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment
    return answer


def direct_store_handler(service: StoreService) -> DirectStoreHandler:
    """The handler for the direct C-STORE path of :mod:`dicom_scp.reactor`."""

    def serve(
        assoc: Association,
        command: StoreRequestCommand,
        transfer_syntax_uid: str,
        dataset: bytes | memoryview,
    ) -> tuple[int, str | None]:
        requestor = assoc.requestor
        return store_status(
            service,
            StoreRequest(
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=command.sop_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                dataset=dataset,
                calling_ae=str(requestor.ae_title).strip(),
                called_ae=str(assoc.acceptor.ae_title).strip(),
                peer_address=requestor.address,
            ),
        )

    return serve


def handle_requested(event: Event, policy: CallerPolicy) -> None:
    """A-ASSOCIATE-RQ: reject callers outside the allow list, logging why."""
    calling_ae, address = _peer(event)
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    if primitive is not None and primitive.calling_ae_title:
        calling_ae = str(primitive.calling_ae_title).strip()
    reason = policy.check(calling_ae, address)
    if reason is None:
        return
    LOGGER.warning("Association from %s@%s rejected: %s", calling_ae, address, reason)
    assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _log_established(event: Event) -> None:
    calling_ae, address = _peer(event)
    LOGGER.info("Association from %s@%s established", calling_ae, address)
    refused = sorted({
        UID(context.abstract_syntax).name for context in event.assoc.rejected_contexts
        if context.abstract_syntax
    })
    if not refused:
        return
    # The sender gets "no presentation context" for these and may not say why; the PACS
    # administrator reading our log should see what was turned away. Senders often
    # propose every storage class they know, so that is only worth a warning when
    # nothing they proposed was accepted.
    accepted = [context for context in event.assoc.accepted_contexts
                if context.abstract_syntax != "1.2.840.10008.1.1"]
    level = logging.INFO if accepted else logging.WARNING
    shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
    LOGGER.log(level, "Association from %s@%s: refused %s (not accepted by this node)",
               calling_ae, address, shown)


def _log_ended(event: Event) -> None:
    calling_ae, address = _peer(event)
    outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
    LOGGER.info("Association from %s@%s %s", calling_ae, address, outcome)


def event_handlers(service: StoreService, policy: CallerPolicy) -> list[Any]:
    """The ``evt_handlers`` list for the node's storage SCP."""
    return [
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [service]),
        (evt.EVT_ESTABLISHED, _log_established),
        (evt.EVT_RELEASED, _log_ended),
        (evt.EVT_ABORTED, _log_ended),
    ]
