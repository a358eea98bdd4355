"""Typed dependencies of the admin API: the app's context and a database session per request.

Everything a route needs is put on ``app.state`` by :func:`dafne_node.api.create_app` and
reached through these dependencies, never through module globals, so two apps (two test
databases, two nodes in one process) never see each other's state and importing the package
does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import FederationSection
from dafne_node.learning.windows import TrainingWindow
from dafne_node.status import ModelInfo

__all__ = [
    "AppContext",
    "ContextDep",
    "ModelDep",
    "SessionDep",
    "get_context",
    "get_model",
    "get_session",
]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppContext:
    """What the routes of one app share: the database, the model in use, readiness, metrics.

    ``model_info`` and ``ready`` are callables, asked at request time, because the model is
    hot-swapped when a new generation arrives and readiness changes while the node starts.
    """

    session_factory: sessionmaker[Session]
    model_info: Callable[[], tuple[str, int]]
    ready: Callable[[], bool] | None
    registry: CollectorRegistry
    windows: tuple[TrainingWindow, ...] = ()
    """The node's training windows, for ``/status``."""
    data_dir: Path | None = None
    """The node's data directory, for the disk use in ``/status``."""
    federation: FederationSection | None = None
    """The node's ``[federation]`` settings, for ``/status``."""


def get_context(request: Request) -> AppContext:
    """The :class:`AppContext` of the app serving ``request``."""
    context: AppContext = request.app.state.dafne
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """A session for one request, closed (and anything uncommitted rolled back) afterwards.

    It does not commit on exit: a route that changes something commits itself before it
    answers, so a failed commit becomes an error response instead of a success already sent.
    """
    session = context.session_factory()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_model(context: ContextDep) -> ModelInfo:
    """The model in use now (name and generation)."""
    name, generation = context.model_info()
    return ModelInfo(name=name, generation=int(generation))


ModelDep = Annotated[ModelInfo, Depends(get_model)]
