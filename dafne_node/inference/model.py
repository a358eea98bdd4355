"""The model a node process segments with, switched atomically when a new one is activated.

The ``models`` table names the active model; the trainer process activates a locally
fine-tuned one there (and the federation sync client a new root generation). Each node
process checks the table every few seconds, loads and verifies the new model beside the
old, and swaps one reference: a job that already took the old model finishes with it, the
next one uses the new. A model that fails verification is logged and the old one kept.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.config import NodeConfig
from dafne_node.inference.segmenter import SeriesSegmenter
from dafne_node.model.manifest import ModelError, default_model_dir
from dafne_node.model_registry import FEDERATION_SOURCE, active_model, register_active_model
from db.node_models import Model

__all__ = ["ActiveModel"]

LOGGER = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0
"""How often a process looks for a newly activated model."""


class ActiveModel:
    """The node's current :class:`SeriesSegmenter`, following the database's active model.

    At start the configured root model (``model.dir`` or the bundled one) is verified and
    registered; a local model fine-tuned from that same root generation and active in the
    database stays active across restarts when ``training.activate_local_model`` is on,
    and so does a newer generation pulled from the federation (or a local model of it).

    Parameters
    ----------
    session_factory:
        Sessions on the node database.
    config:
        ``model.dir``, ``model.precision`` and ``training.activate_local_model``.
    check_every_s:
        Seconds between looks at the database.
    """

    def __init__(self, session_factory: sessionmaker[Session], config: NodeConfig, *,
                 check_every_s: float = CHECK_EVERY_S) -> None:
        self._sessions = session_factory
        self._config = config
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self.root_dir = config.model.dir or default_model_dir()
        root = SeriesSegmenter(self.root_dir, precision=config.model.precision)
        self._current = self._start_with(root)

    @property
    def segmenter(self) -> SeriesSegmenter:
        """The model in use now, without looking at the database."""
        return self._current

    def current(self) -> SeriesSegmenter:
        """The model to segment the next series with (switched if another was activated)."""
        if time.monotonic() - self._checked_at >= self._check_every_s:
            with self._lock:
                if time.monotonic() - self._checked_at >= self._check_every_s:
                    self._checked_at = time.monotonic()
                    self._follow_database()
        return self._current

    def _start_with(self, root: SeriesSegmenter) -> SeriesSegmenter:
        manifest = root.manifest
        with self._sessions() as session, session.begin():
            row = active_model(session, manifest.name)
            if row is not None and self._keeps(session, row, manifest.generation):
                kept = self._load(Path(row.path), row.sha256, keeping=manifest.version_label)
                if kept is not None:
                    LOGGER.info("continuing with the model %s", kept.manifest.version_label)
                    return kept
            register_active_model(
                session, name=manifest.name, generation=manifest.generation,
                path=str(self.root_dir), sha256=manifest.weights.sha256,
                source="local" if self._config.model.dir else "bundled",
                manifest=manifest.model_dump(mode="json"),
            )
        return root

    def _keeps(self, session: Session, row: Model, root_generation: int) -> bool:
        """Whether the active ``row`` stays active over the configured root at start.

        A local model fine-tuned from the configured root does (when local models are
        activated); so does a newer generation pulled from the federation, and a local model
        fine-tuned from one: restarting must not fall back to an older root generation.
        """
        local_ok = row.local_round == 0 or self._config.training.activate_local_model
        if row.generation == root_generation:
            return row.local_round > 0 and local_ok
        if row.generation < root_generation or not local_ok:
            return False
        source = row.source if row.local_round == 0 else session.scalar(
            select(Model.source).where(Model.name == row.name,
                                       Model.generation == row.generation,
                                       Model.local_round == 0))
        return source == FEDERATION_SOURCE

    def _follow_database(self) -> None:
        with self._sessions() as session:
            row = active_model(session, self._current.manifest.name)
            if row is None or row.sha256 == self._current.manifest.weights.sha256:
                return
            path, sha256 = Path(row.path), row.sha256
        loaded = self._load(path, sha256, keeping=self._current.manifest.version_label)
        if loaded is not None:
            LOGGER.info("switched to model %s %s", loaded.manifest.name,
                        loaded.manifest.version_label)
            self._current = loaded

    def _load(self, path: Path, sha256: str, *, keeping: str) -> SeriesSegmenter | None:
        """Load and verify ``path``; None (logged, naming the model kept) if it fails."""
        try:
            loaded = SeriesSegmenter(path, precision=self._config.model.precision)
        except ModelError as exc:
            LOGGER.error("the active model %s cannot be loaded (%s); keeping %s", path, exc,
                         keeping)
            return None
        if loaded.manifest.weights.sha256 != sha256:
            LOGGER.error("model %s on disk is not the one the database names; keeping %s",
                         path, keeping)
            return None
        return loaded
