"""The receive path's association machinery on top of pynetdicom, one seam a module.

* :mod:`~dicom_scp.reactor.sockets` — socket tuning: quick ACKs, whole-PDU reads.
* :mod:`~dicom_scp.reactor.dul` — the DUL loop: waits in ``select()``, answers every fault.
* :mod:`~dicom_scp.reactor.association` — the association loop, woken by events.
* :mod:`~dicom_scp.reactor.direct` — C-STOREs served straight from the received bytes.
* :mod:`~dicom_scp.reactor.server` — admission at accept, then a thread per association.
* :mod:`~dicom_scp.reactor.contract` — what all this mirrors of pynetdicom, checked.

The hooks are pynetdicom's own extension points (``AE.make_server(server_class=…,
request_handler=…)``); what the loops mirror of its private methods is pinned in
:mod:`~dicom_scp.reactor.contract`, and the server falls back to pynetdicom's loops
when the installed version differs.
"""

from dicom_scp.reactor.association import EventDrivenAssociation, EventDrivenRequestHandler
from dicom_scp.reactor.contract import differences, is_supported
from dicom_scp.reactor.direct import DirectStoreHandler
from dicom_scp.reactor.server import StorageAssociationServer, make_server

__all__ = [
    "DirectStoreHandler",
    "EventDrivenAssociation",
    "EventDrivenRequestHandler",
    "StorageAssociationServer",
    "differences",
    "is_supported",
    "make_server",
]
