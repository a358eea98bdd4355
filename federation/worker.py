"""The aggregation worker: buffered updates become candidate generations, gated, signed.

``dafne-federation worker`` runs this loop. Any number of workers may run against one
database: for each model, only the worker holding the model's lease (a conditional UPDATE
on its row, :func:`db.federation.acquire_lease`) aggregates, so two candidates are never
built from the same updates, and a worker that dies loses its lease after ``lease_s``.

One aggregation, FedBuff-style (no node ever waits for another):

1. It is due when ``buffer_size`` updates wait, or the oldest has waited
   ``flush_interval_s`` (a hospital that trains once a month still counts).
2. The strategy (:mod:`federation.strategies`) builds the candidate from the current
   generation and up to ``max_buffer`` waiting updates, each clipped to ``clip_norm``.
   For FedBuff, a node's cumulative updates count once (:mod:`federation.lineage`): an
   update a later one contains is superseded, and one that continues an applied update
   contributes only the difference.
3. The gate (:mod:`federation.gate`) scores the candidate on the validation set and
   compares it with the current generation's scores; a rejected FedBuff candidate is
   tried again at shorter steps (:mod:`federation.backtrack`).
4. In one transaction the candidate is recorded with the updates it contains and either
   promoted (next number, signed manifest) or rejected with the reason; its weights are
   kept for audit either way. Until that commit the updates stay pending, so a worker
   killed half way loses nothing and applies nothing twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from dafne_node.learning.update import UpdateFormatError, decode_update
from dafne_node.model.manifest import ModelManifest
from db import federation as repo
from db.fed_models import FedGeneration, FedUpdate, GenerationState
from federation.backtrack import backtrack
from federation.config import FederationConfig
from federation.fairness import lift_weakest_site
from federation.gate import Gate, GateDecision, Scores, make_gate, score_state
from federation.lineage import Lineage, UpdateRecord, resolve_lineage
from federation.registry import (
    generation_manifest,
    load_weights,
    store_generation_manifest,
    store_weights,
)
from federation.screening import screen
from federation.storage import ArtifactStore
from federation.strategies import AggregationResult, BufferedUpdate, Strategy, make_strategy
from federation.validation import ValidationCase

__all__ = ["AggregationOutcome", "Aggregator", "make_gate_for", "make_strategy_for"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregationOutcome:
    """What one aggregation did (also logged)."""

    model: str
    candidate_id: int
    promoted: bool
    number: int | None
    reason: str
    update_ids: tuple[str, ...]
    scores: Scores
    seconds: float
    refused: tuple[str, ...] = field(default=())
    superseded: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Waiting:
    """A waiting update as the worker reads it, outside the session."""

    update_id: str
    artifact_key: str | None
    base_generation: int | None
    num_samples: int
    applied_id: str | None
    """The applied update it continues, whose delta is subtracted from its own."""
    applied_key: str | None
    """That applied update's stored upload."""


def make_strategy_for(config: FederationConfig, name: str) -> Strategy:
    """Strategy ``name`` with the configured options.

    FedBuff is wrapped in norm clipping when ``clip_norm`` is set; Dafne's rule stays as
    Dafne has it (no clipping), since it is the baseline our strategy is compared with.
    """
    if name == "dafne":
        return make_strategy(name)
    return make_strategy(name, max_norm=config.aggregation.clip_norm,
                         server_lr=config.aggregation.server_lr)


def make_gate_for(config: FederationConfig, strategy: str) -> Gate:
    """The configured promotion rule, or the one that goes with ``strategy``."""
    if config.gate_rule_for(strategy) == "absolute":
        return make_gate("absolute", min_dice=config.gate.min_dice)
    return make_gate("relative", max_mean_drop=config.gate.max_mean_drop,
                     max_site_drop=config.gate.max_site_drop)


def default_owner() -> str:
    """A worker's name in leases: host, process and a random part (unique per process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Aggregator:
    """Builds, gates and records candidate generations for every model that is due.

    Parameters
    ----------
    config:
        The server configuration (aggregation and gate sections).
    sessions:
        Session factory of the federation database.
    store:
        Artifact store (weights, updates, manifests).
    signing_key:
        The server's Ed25519 key; every promoted manifest is signed with it.
    validation:
        The validation cases the gate scores on.
    clock:
        Returns the current UTC time (tests pass a controlled one).
    """

    def __init__(self, config: FederationConfig, sessions: sessionmaker[Session],
                 store: ArtifactStore, signing_key: Ed25519PrivateKey,
                 validation: list[ValidationCase], *, owner: str | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if not validation:
            raise ValueError("the gate needs at least one validation case")
        self._config = config
        self._sessions = sessions
        self._store = store
        self._key = signing_key
        self._validation = validation
        self._owner = owner or default_owner()
        self._clock = clock

    def run(self, stop: threading.Event) -> None:
        """Aggregate whatever is due every ``check_every_s`` until ``stop`` is set."""
        LOGGER.info("aggregation worker %s: K=%d, flush after %.0f s",
                    self._owner, self._config.aggregation.buffer_size,
                    self._config.aggregation.flush_interval_s)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad round must not stop the worker; it is logged
                LOGGER.exception("aggregation failed; retrying in %.0f s",
                                 self._config.aggregation.check_every_s)
            stop.wait(self._config.aggregation.check_every_s)

    def tick(self, *, force: bool = False) -> list[AggregationOutcome]:
        """Aggregate every model that is due (``force``: every model with waiting updates)."""
        with self._sessions() as session:
            names = [m.name for m in repo.list_models(session)]
        outcomes = []
        for name in names:
            outcome = self.aggregate(name, force=force)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _due(self, session: Session, model_name: str, force: bool) -> bool:
        count, oldest = repo.pending_summary(session, model_name)
        if count == 0:
            return False
        if force or count >= self._config.aggregation.buffer_size:
            return True
        flush = timedelta(seconds=self._config.aggregation.flush_interval_s)
        return oldest is not None and self._clock() - oldest >= flush

    def aggregate(self, model_name: str, *, force: bool = False) -> AggregationOutcome | None:
        """One aggregation of ``model_name`` if it is due and this worker gets the lease."""
        with self._sessions() as session, session.begin():
            if not self._due(session, model_name, force):
                return None
            if not repo.acquire_lease(session, model_name, self._owner,
                                      self._config.aggregation.lease_s, self._clock()):
                LOGGER.debug("model %s is being aggregated by another worker", model_name)
                return None
        try:
            return self._aggregate_locked(model_name, force)
        finally:
            with self._sessions() as session, session.begin():
                repo.release_lease(session, model_name, self._owner)

    def _aggregate_locked(self, model_name: str, force: bool) -> AggregationOutcome | None:
        started = time.perf_counter()
        with self._sessions() as session, session.begin():
            if not self._due(session, model_name, force):  # another worker just did it
                return None
            model = repo.get_model(session, model_name)
            current = repo.latest_generation(session, model_name)
            if model is None or current is None or current.number is None:
                raise RuntimeError(f"model {model_name!r} has no promoted generation")
            seed = ModelManifest.model_validate(model.manifest)
            model_strategy = model.strategy
            strategy = make_strategy_for(self._config, model_strategy)
            gate = make_gate_for(self._config, model_strategy)
            current_number, current_id = current.number, current.id
            current_key, current_sha = current.weights_key, current.sha256
            current_scores = Scores.from_json(current.validation) if current.validation \
                else None
            rows = repo.pending_updates(session, model_name, self._config.aggregation.max_buffer)
            lineage, artifacts = self._lineage(session, model_name, rows) \
                if self._follows_chains(model_strategy) else (Lineage({}, {}), {})
            waiting = []
            for u in rows:
                if u.id not in lineage.superseded:
                    applied = lineage.subtract.get(u.id)
                    waiting.append(_Waiting(u.id, u.artifact_key, u.base_generation,
                                            u.num_samples, applied,
                                            artifacts.get(applied) if applied else None))
            buffer = {u.id for u in rows}
        state = load_weights(self._store, current_key, current_sha)
        if current_scores is None:
            current_scores = self._score_current(seed, current_id, state)
        updates, refused = self._load_updates(model_name, waiting)
        if not updates:
            return None
        bases: dict[int, Mapping[str, torch.Tensor]] = {current_number: state}

        def build(chosen: Sequence[BufferedUpdate]) -> AggregationResult:
            return strategy.aggregate(state, current_number, chosen,
                                      lambda n: self._base_weights(model_name, n, bases))

        def score(weights: Mapping[str, torch.Tensor]) -> Scores:
            return self._score_holding_lease(model_name, seed, weights)

        screens = self._screens(model_strategy)
        screening = screen(updates, build=build, score=score,
                           max_influence_drop=self._config.gate.max_influence_drop
                           if screens else None)
        lift = None
        if screens and self._config.gate.lift_weakest_site:
            screening, lift = lift_weakest_site(
                screening, build=build, score=score,
                factors=self._config.gate.lift_weakest_site,
                max_mean_cost=self._config.gate.lift_max_mean_cost)
        result, scores, updates = screening.candidate, screening.scores, screening.kept
        weights = result.state
        decision = gate.decide(current_scores, scores)
        if not decision.promote and self._backtracks(model_strategy):
            shorter = backtrack(
                state, weights, current_scores=current_scores, gate=gate,
                fractions=self._config.gate.step_fractions,
                score=score)
            if shorter is not None:
                weights, scores = shorter.state, shorter.scores
                decision = GateDecision(promote=True, reason=(
                    f"at {shorter.fraction:g} of the aggregated step: "
                    f"{shorter.decision.reason} (the full step: {decision.reason})"))
        if lift is not None:
            decision = GateDecision(promote=decision.promote,
                                    reason=f"{decision.reason}; {lift.describe()}")
        stored = store_weights(self._store, f"models/{model_name}/candidates/"
                                            f"{uuid.uuid4().hex}.safetensors", weights)
        ids = [u.update_id for u in updates]
        clipped = set(result.notes.get("clipped", []))
        # Superseded for good only when what contains it counts: aggregated now, or applied
        # before. If that one was refused meanwhile, the earlier update waits for the next
        # aggregation, where it is its node's newest again.
        superseded = {update_id: container for update_id, container in lineage.superseded.items()
                      if container in ids or container not in buffer}
        with self._sessions() as session, session.begin():
            for update_id, reason in screening.refused.items():
                repo.refuse_update(session, update_id, reason)
            for update_id, container in superseded.items():
                repo.supersede_update(session, update_id, f"contained in update {container} "
                                      "of the same node (a cumulative delta against the "
                                      "same generation), which counts instead")
            candidate = repo.add_generation(
                session, model_name=model_name, state=GenerationState.CANDIDATE, number=None,
                parent_number=current_number, strategy=model_strategy,
                weights_key=stored.key, sha256=stored.sha256, size_bytes=stored.size_bytes)
            assigned = repo.assign_updates(session, ids, candidate)
            if assigned != len(ids):
                raise RuntimeError(f"only {assigned} of {len(ids)} updates were still pending; "
                                   "another aggregator ran: this candidate is dropped")
            for update in candidate.updates:
                update.clipped = update.id in clipped
            number = current_number + 1 if decision.promote else None
            if number is not None:
                manifest = generation_manifest(seed, number, stored)
                artifacts = store_generation_manifest(self._store, self._key, model_name,
                                                      manifest)
                repo.promote(session, candidate, number=number,
                             manifest_key=artifacts.manifest_key,
                             signature=artifacts.signature, validation=scores.to_json(),
                             reason=decision.reason)
            else:
                repo.reject(session, candidate, validation=scores.to_json(),
                            reason=decision.reason)
            candidate_id = candidate.id
        outcome = AggregationOutcome(
            model=model_name, candidate_id=candidate_id, promoted=decision.promote,
            number=number, reason=decision.reason, update_ids=tuple(ids), scores=scores,
            seconds=time.perf_counter() - started,
            refused=(*refused, *screening.refused), superseded=tuple(superseded))
        LOGGER.info("model %s: candidate %d from %d updates (%d superseded) %s: %s "
                    "(mean Dice %.4f) in %.1f s", model_name, candidate_id, len(ids),
                    len(superseded),
                    f"promoted to generation {number}" if number else "rejected",
                    decision.reason, scores.mean, outcome.seconds,
                    extra={"model": model_name, "candidate": candidate_id,
                           "generation": number, "updates": ids})
        return outcome

    def _score_holding_lease(self, model_name: str, seed: ModelManifest,
                             weights: Mapping[str, torch.Tensor]) -> Scores:
        """Score ``weights`` on the validation set, renewing the lease first.

        Screening scores once per update, so a large buffer can take longer than one lease;
        renewing before each scoring keeps a second worker from taking the model meanwhile.
        """
        with self._sessions() as session, session.begin():
            if not repo.acquire_lease(session, model_name, self._owner,
                                      self._config.aggregation.lease_s, self._clock()):
                raise RuntimeError(f"lost the aggregation lease of {model_name!r} while "
                                   "scoring; this candidate is dropped")
        return score_state(seed, weights, self._validation, threads=self._config.gate.threads)

    def _screens(self, strategy: str) -> bool:
        """Screening is on for FedBuff; Dafne's rule stays the baseline as Dafne has it."""
        return self._config.gate.screen_updates and strategy != "dafne"

    def _follows_chains(self, strategy: str) -> bool:
        """Whether cumulative updates are resolved (:mod:`federation.lineage`).

        FedBuff adds deltas, so a cumulative one must count once; Dafne's rule merges whole
        models, where the newer model replacing the older is the rule itself.
        """
        return strategy != "dafne"

    @staticmethod
    def _lineage(session: Session, model_name: str, rows: list[FedUpdate]
                 ) -> tuple[Lineage, dict[str, str | None]]:
        """The lineage of the waiting ``rows``, and the stored uploads on their chains.

        The stored uploads, by update id, are what an applied update's delta is read from
        to be subtracted.
        """
        records = repo.node_updates(session, model_name, {u.node_id for u in rows},
                                    {u.base_generation for u in rows
                                     if u.base_generation is not None})
        lineage = resolve_lineage(
            [u.id for u in rows],
            [UpdateRecord(update_id=u.id, node_id=u.node_id, idempotency_key=u.idempotency_key,
                          continues_key=u.continues_key, base_generation=u.base_generation,
                          state=u.state) for u in records])
        return lineage, {u.id: u.artifact_key for u in records}

    def _backtracks(self, strategy: str) -> bool:
        """Shorter steps for FedBuff; Dafne's rule stays the baseline as Dafne has it."""
        return bool(self._config.gate.step_fractions) and strategy != "dafne"

    def _score_current(self, seed: ModelManifest, generation_id: int,
                       state: Mapping[str, torch.Tensor]) -> Scores:
        """Score the current generation once (the seed is scored on first aggregation)."""
        scores = score_state(seed, state, self._validation, threads=self._config.gate.threads)
        with self._sessions() as session, session.begin():
            generation = session.get(FedGeneration, generation_id)
            if generation is not None and generation.validation is None:
                generation.validation = scores.to_json()
        return scores

    def _load_updates(self, model_name: str, waiting: list[_Waiting]
                      ) -> tuple[list[BufferedUpdate], list[str]]:
        """Decode the waiting updates; one whose artifact is unreadable is refused, not lost.

        An update that continues an applied one becomes the difference between the two.
        """
        updates: list[BufferedUpdate] = []
        refused: list[str] = []
        for item in waiting:
            try:
                if item.artifact_key is None or item.base_generation is None:
                    raise UpdateFormatError("the update has no stored artifact")
                delta = decode_update(self._store.get(item.artifact_key)).tensors
                if item.applied_id is not None:
                    if item.applied_key is None:
                        raise UpdateFormatError(f"the applied update {item.applied_id} it "
                                                "continues has no stored artifact")
                    applied = decode_update(self._store.get(item.applied_key)).tensors
                    delta = {name: tensor - applied[name] for name, tensor in delta.items()}
            except (UpdateFormatError, KeyError, OSError) as exc:
                reason = f"stored update unreadable at aggregation: {exc}"
                LOGGER.error("model %s: update %s refused: %s", model_name, item.update_id,
                             reason)
                with self._sessions() as session, session.begin():
                    repo.refuse_update(session, item.update_id, reason)
                refused.append(item.update_id)
                continue
            updates.append(BufferedUpdate(update_id=item.update_id, delta=delta,
                                          base_generation=item.base_generation,
                                          num_samples=item.num_samples))
        return updates, refused

    def _base_weights(self, model_name: str, number: int,
                      cache: dict[int, Mapping[str, torch.Tensor]]
                      ) -> Mapping[str, torch.Tensor]:
        if number not in cache:
            with self._sessions() as session:
                generation = repo.get_generation(session, model_name, number)
                if generation is None:
                    raise RuntimeError(f"generation {number} of {model_name!r} is gone")
                key, sha = generation.weights_key, generation.sha256
            cache[number] = load_weights(self._store, key, sha)
        return cache[number]


