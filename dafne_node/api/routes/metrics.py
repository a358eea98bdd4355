"""``GET /metrics``: the node's numbers for Prometheus, read from the database at scrape time.

Why a collector that queries the database instead of counters kept in memory: a node runs
as several processes (receiver, workers, API), possibly on several hosts sharing one
PostgreSQL database. In-memory counters would each see a part and reset on restart; the
database sees everything, so every process's ``/metrics`` reports the same consistent values.
The queries are the grouped counts of :mod:`dafne_node.status`.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (never the global one),
so two apps in one process (tests, or two nodes) do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response, status
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.api.deps import ContextDep
from dafne_node.status import (
    correction_counts,
    count_instances,
    count_jobs,
    count_outbox,
    count_outbox_by_destination,
    count_series,
    upload_counts,
)
from db.node_models import FederationSync, Series, Study

__all__ = ["NodeCollector", "router"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])


class NodeCollector(Collector):
    """Prometheus collector whose samples are counted in the node's database per scrape.

    Parameters
    ----------
    session_factory : sessionmaker
        Sessions on the node's database (only read from).
    model_info : callable
        Returns the model in use as ``(name, generation)``, asked at each scrape because the
        model is hot-swapped.
    """

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        model_info: Callable[[], tuple[str, int]],
    ) -> None:
        self._session_factory = session_factory
        self._model_info = model_info

    @staticmethod
    def _families() -> dict[str, Metric]:
        return {
            "instances": CounterMetricFamily(
                "dafne_instances_received", "Instances received and indexed (each SOP once)."
            ),
            "studies": GaugeMetricFamily("dafne_studies", "Studies with a received instance."),
            "series": GaugeMetricFamily(
                "dafne_series", "Series by assembly state.", labels=["state"]
            ),
            "last_received": GaugeMetricFamily(
                "dafne_last_received_timestamp_seconds",
                "Unix time of the last received instance.",
            ),
            "jobs": GaugeMetricFamily(
                "dafne_jobs", "Jobs by state and kind.", labels=["state", "kind"]
            ),
            "outbox": GaugeMetricFamily(
                "dafne_outbox", "Outbox items (files to send) by state.", labels=["state"]
            ),
            "outbox_destination": GaugeMetricFamily(
                "dafne_outbox_undelivered",
                "Undelivered outbox items by destination (AE@host:port) and state.",
                labels=["destination", "state"],
            ),
            "corrections": GaugeMetricFamily(
                "dafne_corrections", "Corrections (SEGs sent back from viewers) by state.",
                labels=["state"],
            ),
            "model": GaugeMetricFamily(
                "dafne_model_generation", "Generation of the model in use.", labels=["model"]
            ),
            "uploads": GaugeMetricFamily(
                "dafne_federation_uploads",
                "Weight deltas for the federation server by state (pending, sent, refused).",
                labels=["state"],
            ),
            "federation_success": GaugeMetricFamily(
                "dafne_federation_last_success_timestamp_seconds",
                "Unix time the federation server last answered a poll.",
            ),
        }

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registering does no database query."""
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        """Count everything in one short read-only session.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            If the database cannot be read (the route answers 503).
        """
        families = self._families()
        with self._session_factory() as session:
            families["instances"].add_metric([], count_instances(session))
            studies = session.scalar(select(func.count()).select_from(Study)) or 0
            families["studies"].add_metric([], int(studies))
            for state, count in count_series(session).items():
                families["series"].add_metric([state], count)
            last = session.scalar(select(func.max(Series.last_received_at)))
            for state, count in upload_counts(session).items():
                families["uploads"].add_metric([state], count)
            synced = session.scalar(select(func.max(FederationSync.last_success_at)))
            for kind, states in count_jobs(session).items():
                for state, count in states.items():
                    families["jobs"].add_metric([state, kind], count)
            for state, count in count_outbox(session).items():
                families["outbox"].add_metric([state], count)
            for state, count in correction_counts(session).items():
                families["corrections"].add_metric([state], count)
            for dest in count_outbox_by_destination(session, errors_scanned=0):
                for state in ("pending", "sending", "failed"):
                    families["outbox_destination"].add_metric(
                        [dest.destination, state], getattr(dest, state)
                    )
        if last is not None:
            families["last_received"].add_metric([], last.timestamp())
        if synced is not None:
            families["federation_success"].add_metric([], synced.timestamp())
        name, generation = self._model_info()
        families["model"].add_metric([name], float(generation))
        yield from families.values()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        503: {"content": {"text/plain": {}}, "description": "database unreachable"},
    },
)
def metrics(request: Request, context: ContextDep) -> Response:
    """Prometheus exposition (text, or OpenMetrics if the scraper asks for it)."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    try:
        body = encoder(context.registry)
    except SQLAlchemyError as error:
        LOGGER.warning("metrics scrape failed: database unreachable: %s", error)
        return Response(
            f"database unreachable: {type(error).__name__}\n",
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            media_type="text/plain",
        )
    return Response(body, media_type=content_type)
