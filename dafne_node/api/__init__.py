"""The node's admin HTTP API: ``/health``, ``/status``, ``/jobs``, ``/corrections``, ``/metrics``.

Built by :func:`create_app` from what the running node already has (its session factory,
the model it loaded, its readiness), so importing this package does no I/O and creates no
engine; ``dafne-node serve`` calls it once and hands the app to uvicorn on
``http.host:http.port`` (127.0.0.1:8765 by default: the API has no authentication and is
meant for the host itself or a monitoring network).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dafne_node import __version__
from dafne_node.api.deps import AppContext
from dafne_node.api.routes import corrections, health, jobs, metrics, status
from dafne_node.api.routes.metrics import NodeCollector
from dafne_node.config import FederationSection
from dafne_node.learning.windows import TrainingWindow

__all__ = ["AppContext", "NodeCollector", "create_app"]

LOGGER = logging.getLogger(__name__)


def create_app(
    *,
    session_factory: sessionmaker[Session],
    model_info: Callable[[], tuple[str, int]],
    ready: Callable[[], bool] | None = None,
    windows: Sequence[TrainingWindow] = (),
    data_dir: Path | None = None,
    federation: FederationSection | None = None,
) -> FastAPI:
    """Build the admin API of one node.

    Parameters
    ----------
    session_factory : sessionmaker
        Sessions on the node's database (see :func:`db.session.make_session_factory`).
    model_info : callable
        Returns the model in use as ``(name, generation)``; called per request, so a
        hot-swapped generation shows at once.
    ready : callable, optional
        Returns whether the node is ready to receive (``/health`` answers 503 while not);
        ``None`` means ready whenever the database answers.
    windows : sequence of TrainingWindow
        The node's training windows, shown by ``/status``.
    data_dir : Path, optional
        The node's data directory, whose disk use ``/status`` shows.
    federation : FederationSection, optional
        The node's ``[federation]`` settings, whose sync ``/status`` shows.

    Returns
    -------
    FastAPI
        An app with its own Prometheus registry (never the process-global one).
    """
    registry = CollectorRegistry()
    registry.register(NodeCollector(session_factory=session_factory, model_info=model_info))
    app = FastAPI(
        title="Dafne Node admin API",
        version=__version__,
        description="Health, status, jobs and metrics of a Dafne DICOM node.",
    )
    app.state.dafne = AppContext(
        session_factory=session_factory,
        model_info=model_info,
        ready=ready,
        registry=registry,
        windows=tuple(windows),
        data_dir=data_dir,
        federation=federation,
    )
    for module in (health, status, jobs, corrections, metrics):
        app.include_router(module.router)
    return app
