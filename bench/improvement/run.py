"""The multi-hospital run: real server, real nodes, real DICOM, generation after generation.

For each arm (``ours``: FedBuff with the relative gate; ``dafne``: Dafne's merge rule with its
absolute threshold), with the same data and seeds:

1. A federation server (``dafne-federation serve``, its own process, real HTTP) seeded with
   the weak root model, and one node per hospital (``dafne-node serve`` with its trainer).
2. Every generation, each hospital due to train receives new studies of its own protocol
   over DICOM; its node segments them and sends the SEGs to the hospital's PACS; the
   simulated radiologist corrects each SEG and sends the correction back as a viewer would;
   the node trains in its (always open) window and uploads its delta.
3. When every due upload has arrived, ``dafne-federation worker --once`` aggregates and
   gates them into the next generation, and the nodes pull it.
4. Before the first and after every generation the root model is scored on a fixed
   evaluation set per site that is never used for training.

A hospital that trains only every k-th generation pulls only right after its own rounds,
so its next update is k-1 generations stale. A poisoned hospital either permutes the muscle
labels of its corrections (``label-flip``: its node trains on them and uploads an honestly
computed, harmful delta) or uploads scaled noise with its token (``noise``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from bench.improvement.hospital import ArmStoppedError, Hospital, HospitalPlan, NodeSettings
from bench.improvement.radiologist import (
    correct,
    poison_label_flip,
    read_seg_labels,
    write_correction,
)
from bench.improvement.stats import DiceRecord
from dafne_node.model.architectures import build_model
from dafne_node.model.infer import Segmenter
from dafne_node.model.manifest import ModelManifest, load_manifest
from dafne_node.model.train import TrainingExample, evaluate
from dafne_node.phantom import make_study
from dafne_node.phantom.study import write_study
from tests.federation.server import (
    FederationSetup,
    bundled_model,
    make_update,
    set_up,
    start_api,
)

LOGGER = logging.getLogger(__name__)

ARMS = {"ours": "fedbuff", "dafne": "dafne"}
"""Arm name -> the strategy its server's model is created with."""

_SETUP_LOCK = threading.Lock()
"""Arms that run at once set their servers up one at a time: ``set_up`` runs the
``dafne-federation`` commands in this process, and their migrations and redirected output
are process-wide."""

EVAL_SEED = 70_000
STUDY_SEED = 20_000
NOISE_SCALE = 0.05


@dataclass(frozen=True)
class RunConfig:
    """Sizes of a run; the defaults are the full run (see docs/federated-improvement.md)."""

    hospitals: tuple[HospitalPlan, ...] = (
        HospitalPlan("hospital-a", "A", train_every=3), HospitalPlan("hospital-b", "B"),
        HospitalPlan("hospital-c", "C"), HospitalPlan("hospital-d", "D"))
    """Hospital A trains every third generation; runs before the night of 2026-12-04 made
    hospital D (the only fat-infiltrated protocol) the slow one. It changed little: site D
    ended at 0.884 when slow and 0.875 when not (docs/federated-improvement.md)."""
    generations: int = 10
    studies_per_round: int = 3
    slices: int = 24
    matrix: int | None = None
    steps: int = 120
    """Optimiser steps of each node's run per generation: 30 left the shared model too little
    trained after ten generations (final mean Dice 0.816); 90 reached 0.922 but left site C
    at 0.886; 120 ended every site at 0.918 or above (mean 0.938) in 68 minutes for both arms
    (docs/federated-improvement.md)."""
    learning_rate: float = 5e-4
    """The nodes' learning rate (product default 1e-3): from the weak root, a fresh optimiser
    at 1e-3 first makes the model worse (site A's own 20-step run lowered site A's Dice)."""
    server_lr: float = 2.0
    """Our arm's FedBuff server learning rate (product default 1.0)."""
    contrast_fold: float = 0.3
    """The nodes' ``[training] contrast_fold`` (product default 0): folded T1 slices look like
    site C's Dixon water, so site C's updates stop fighting those of A, B and D
    (``bench/federated_round.py``, three rounds: site C's update alone cost site B 0.25-0.34
    without it, at most 0.12 with it)."""
    replay_fraction: float = 0.75
    """The nodes' ``[training] replay_fraction`` (product default 0.5): a run trains on
    three earlier corrections per new one. From the shipped root, both arms, 0.75 ended site
    D at 0.914 where 0.5 left it at 0.875-0.891, the mean at 0.919 against 0.913-0.915, at
    no cost in node steps (docs/federated-improvement.md)."""
    threads: int = 1
    compile: bool = True
    """The nodes' ``[training] compile`` (product default off): compiled bf16 steps are
    1.2x faster at 16 base channels and 1.4x at 24 (``bench/train_step.py``);
    ignored where the CPU trains in fp32."""
    eval_per_site: int = 8
    """Evaluation subjects per site: 8 gives 32 datasets, near Dafne's 38. With 2, one
    subject decided a site's final mean (site C's two ended 0.869 and 0.907 in the wider
    network's run)."""
    eval_slices: int = 24
    gate_slices: int = 16
    max_site_drop: float = 0.15
    """The relative gate's per-site allowance (product default 0.03): learning site C's
    contrast costs the other sites up to about 0.11 at first (see docs/federated-improvement.md)."""
    lift_weakest_site: tuple[int, ...] = ()
    """Our arm's ``[gate] lift_weakest_site`` factors (product default: off): after
    screening, count the update that helps the lowest validation site more
    (:mod:`federation.fairness`)."""
    lift_max_mean_cost: float = 0.005
    """Our arm's ``[gate] lift_max_mean_cost`` (the product's default): how much mean
    validation Dice a lift may cost."""
    slice_dice_threshold: float | None = None
    arms: tuple[str, ...] = ("ours", "dafne")
    poison: str | None = None
    """``label-flip`` or ``noise``: adds hospital ``hospital-x`` (site A) that poisons."""
    seed: int = 0
    base_port: int = 12100

    def plans(self) -> tuple[HospitalPlan, ...]:
        """The hospitals, with the poisoned one when asked for."""
        if self.poison is None:
            return self.hospitals
        return (*self.hospitals, HospitalPlan("hospital-x", "A", poison=self.poison))


@dataclass
class GenerationOutcome:
    """What the server did with one generation's updates."""

    round: int
    number: int | None
    promoted: bool
    reason: str
    updates: int
    seconds: float
    refused: list[str] = field(default_factory=list)
    """``node: reason`` of each update the server refused at this aggregation (screening)."""


@dataclass
class ArmResult:
    """Everything one arm produced."""

    arm: str
    records: list[DiceRecord] = field(default_factory=list)
    outcomes: list[GenerationOutcome] = field(default_factory=list)
    seconds: float = 0.0


def evaluation_set(config: RunConfig) -> dict[str, list[tuple[str, TrainingExample]]]:
    """The fixed evaluation datasets per site (subjects no hospital ever sees)."""
    sites = sorted({plan.site for plan in config.hospitals})
    out: dict[str, list[tuple[str, TrainingExample]]] = {}
    for s, site in enumerate(sites):
        out[site] = []
        for i in range(config.eval_per_site):
            study = make_study(site=site, seed=EVAL_SEED + 100 * s + i,
                               slices=config.eval_slices, matrix=config.matrix)
            out[site].append((f"{site}{i}", TrainingExample(
                study.pixels, study.labels, tuple(study.pixel_spacing))))
    return out


def score(manifest: ModelManifest, state: dict[str, torch.Tensor], arm: str, generation: int,
          datasets: dict[str, list[tuple[str, TrainingExample]]]) -> list[DiceRecord]:
    """Dice of a root model on every evaluation dataset (fp32, as the server's gate scores)."""
    network = build_model(manifest.architecture.id, manifest.architecture.params)
    network.load_state_dict(state)
    segmenter = Segmenter(network, manifest.preprocessing.to_config(), manifest=manifest,
                          precision="fp32")
    records = []
    for site, cases in datasets.items():
        result = evaluate(segmenter, [example for _, example in cases], manifest.to_labels())
        records.extend(DiceRecord(arm=arm, generation=generation, site=site, dataset=name,
                                  dice=float(dice))
                       for (name, _), dice in zip(cases, result.per_example, strict=True))
    return records


class _Server:
    """The arm's federation server as the driver and the nodes see it."""

    def __init__(self, setup: FederationSetup, url: str) -> None:
        self.setup = setup
        self.url = url
        self._admin = {"Authorization": f"Bearer {setup.admin_token}"}

    def latest(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/models/leg/generations/latest",
                         headers=self._admin, timeout=30).json()

    def root(self) -> dict[str, torch.Tensor]:
        """The weights of the latest promoted generation."""
        latest = self.latest()
        return load_safetensors(httpx.get(f"{self.url}{latest['weights_url']}",
                                          headers=self._admin, timeout=60).content)

    def refused(self) -> dict[str, str]:
        """The newest refused updates: id -> ``node: reason``."""
        status = httpx.get(f"{self.url}/v1/admin/status", headers=self._admin,
                           timeout=30).json()
        return {str(r["id"]): f"{r['node']}: {r['reason']}"
                for r in status["models"][0]["refused"]}

    def aggregate(self) -> tuple[dict[str, Any] | None, list[str]]:
        """``dafne-federation worker --once``: the newest candidate it recorded, if any, and
        the updates it refused (``node: reason``).

        The worker's log (screening, lifts tried, the gate) is appended to ``worker.log``
        beside the server's configuration.
        """
        before, refused_before = self._history(), self.refused()
        with (self.setup.config_path.parent / "worker.log").open("a") as log:
            subprocess.run([_federation_cli(), "--log-level", "info", "worker", "--once",
                            "--config", str(self.setup.config_path)],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        after = self._history()
        refused = [why for uid, why in self.refused().items() if uid not in refused_before]
        return (after[-1] if len(after) > len(before) else None), refused

    def _history(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/v1/models/leg/generations", headers=self._admin,
                         timeout=30).json()


def _federation_cli() -> str:
    return str(Path(sys.executable).with_name("dafne-federation"))


def _train_round(hospital: Hospital, config: RunConfig, round_: int, folder: Path,
                 labels: Sequence[int]) -> None:
    """New studies in, SEGs out, corrections back: the hospital's part of one generation."""
    plan = hospital.plan
    studies = []
    for i in range(config.studies_per_round):
        seed = STUDY_SEED + 1000 * config.seed + 100 * round_ + 10 * \
            config.plans().index(plan) + i
        study = make_study(site=plan.site, seed=seed, slices=config.slices, matrix=config.matrix)
        files = write_study(study, folder / f"{plan.name}-r{round_}-s{i}")
        hospital.send(files.images, "MODALITY")
        studies.append((study, files))
    segs = hospital.wait_segs([s.series_instance_uid for s, _ in studies], timeout=600)
    for n, (study, files) in enumerate(studies):
        predicted = read_seg_labels(segs[study.series_instance_uid], files.images)
        label_map = correct(predicted, np.asarray(study.labels), labels=labels,
                            slice_dice_threshold=config.slice_dice_threshold).label_map
        if plan.poison == "label-flip":
            label_map = poison_label_flip(label_map, labels=labels, seed=config.seed)
        out = write_correction(files.images, label_map,
                               folder / f"{plan.name}-r{round_}-c{n}.dcm")
        hospital.send([out], "VIEWER")


def _last_run_id(status: dict[str, Any]) -> int:
    run = status.get("training", {}).get("last_run") or {}
    return int(run.get("job_id") or 0)


def run_arms(config: RunConfig, work: Path, root_dir: Path,
             datasets: dict[str, list[tuple[str, TrainingExample]]], *, parallel: bool,
             progress: Callable[[str], None] = LOGGER.info,
             runner: Callable[..., ArmResult] | None = None) -> list[ArmResult]:
    """Every arm of ``config`` (each in ``work/<arm>``), at once or one after the other.

    The first arm to fail stops the others and its error is logged when it happens: arms
    at once share only the machine, and an arm running on for an hour beside a dead one
    ends in a run without results. The error raised is the failure itself, not another
    arm's :class:`ArmStoppedError`. Ctrl-C (or SIGTERM, which the script turns into it)
    stops every arm the same way, and returns once their nodes and servers have stopped:
    a node left behind keeps training and holds its ports. ``runner`` replaces
    :func:`run_arm` (tests).
    """
    stop = threading.Event()
    run = runner or run_arm

    def one(arm: str) -> ArmResult:
        if stop.is_set():  # one after the other: an arm after a failed one does not start
            raise ArmStoppedError(f"{arm}: not started: the run is stopping")
        try:
            return run(arm, config, work / arm, root_dir, datasets, progress=progress,
                       stop=stop)
        except ArmStoppedError:
            raise
        except Exception:
            LOGGER.exception("%s arm failed; stopping the run", arm)
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=len(config.arms) if parallel else 1) as pool:
        futures = [pool.submit(one, arm) for arm in config.arms]
        try:
            wait(futures)
        except KeyboardInterrupt:
            LOGGER.warning("interrupted: stopping every arm's nodes and servers")
            stop.set()
            raise  # once the pool has waited for the arms to stop what they started
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, ArmStoppedError)), errors[0])
    return [f.result() for f in futures]


def run_arm(arm: str, config: RunConfig, work: Path, root_dir: Path,
            datasets: dict[str, list[tuple[str, TrainingExample]]],
            progress: Callable[[str], None] = LOGGER.info,
            stop: threading.Event | None = None) -> ArmResult:
    """One arm of the run, from the weak root to ``config.generations`` generations.

    ``stop``, once set, ends the arm within a second while it waits on a node, else before
    its next generation (:class:`ArmStoppedError`).
    """
    started = time.perf_counter()
    result = ArmResult(arm=arm)
    plans = config.plans()
    seed_manifest = load_manifest(root_dir)
    labels = [label.value for label in seed_manifest.labels]
    with _SETUP_LOCK:
        setup = set_up(work / "server", nodes=tuple(p.name for p in plans),
                       strategy=ARMS[arm], model_dir=root_dir, validation_sites="A,B,C,D",
                       validation_per_site=1, validation_slices=config.gate_slices,
                       sections={"gate": {"max_site_drop": config.max_site_drop,
                                          "lift_weakest_site": list(config.lift_weakest_site),
                                          "lift_max_mean_cost": config.lift_max_mean_cost},
                                 "aggregation": {"server_lr": config.server_lr}})
    offset = config.base_port + 20 * list(ARMS).index(arm)
    with start_api(setup) as url:
        server = _Server(setup, url)
        hospitals = [Hospital(
            plan, work / plan.name, dicom_port=offset + 2 * i, http_port=offset + 2 * i + 1,
            federation={"url": url, "model": "leg", "token": setup.tokens[plan.name],
                        "public_key": setup.public_key},
            settings=NodeSettings(model_dir=root_dir, min_new_examples=config.studies_per_round,
                                  steps=config.steps, learning_rate=config.learning_rate,
                                  contrast_fold=config.contrast_fold,
                                  replay_fraction=config.replay_fraction,
                                  threads=config.threads, compile=config.compile,
                                  poll_interval_s=1.0 if plan.train_every == 1 else 3600.0),
            stop=stop)
            for i, plan in enumerate(plans)]
        with contextlib.ExitStack() as running:
            # every hospital is stopped on the way out, also when another's stop raises or
            # a start fails half-way: a node left behind keeps its ports and its trainer
            # busy for whatever runs next on the machine
            for hospital in hospitals:
                running.callback(hospital.stop)
            # at once: one after the other, four nodes took 45 s to start on a CPU without
            # bf16 (10-13 s each, mostly imports)
            with ThreadPoolExecutor(max_workers=len(hospitals)) as starting:
                for started_node in [starting.submit(h.start) for h in hospitals]:
                    started_node.result()
            # A generation's root is scored while the next generation runs (the driver's
            # scoring held every hospital up for half a minute a generation).
            with ThreadPoolExecutor(max_workers=1) as scorer:
                scored = [scorer.submit(score, seed_manifest, server.root(), arm, 0, datasets)]
                for round_ in range(1, config.generations + 1):
                    if stop is not None and stop.is_set():
                        raise ArmStoppedError(f"{arm}: stopped before generation {round_}: "
                                              "the run is stopping")
                    outcome = _generation(arm, config, round_, hospitals, server, work, labels)
                    result.outcomes.append(outcome)
                    scored.append(scorer.submit(score, seed_manifest, server.root(), arm,
                                                round_, datasets))
                    scored[-1].add_done_callback(functools.partial(
                        _report, progress, arm, config, outcome, started))
            result.records = [record for done in scored for record in done.result()]
    result.seconds = time.perf_counter() - started
    return result


def _report(progress: Callable[[str], None], arm: str, config: RunConfig,
            outcome: GenerationOutcome, started: float,
            scored: Future[list[DiceRecord]]) -> None:
    """The progress line of a generation, once its root is scored."""
    if scored.exception() is not None:
        return  # raised where the arm collects its records
    records = scored.result()
    mean = float(np.mean([record.dice for record in records]))
    sites = ", ".join(f"{site} {np.mean([r.dice for r in records if r.site == site]):.3f}"
                      for site in sorted({r.site for r in records}))
    elapsed = time.perf_counter() - started
    left = elapsed / outcome.round * (config.generations - outcome.round)
    verdict = f"promoted g{outcome.number}" if outcome.promoted else "rejected"
    refused = f", {len(outcome.refused)} refused" if outcome.refused else ""
    progress(f"{arm}: generation {outcome.round}/{config.generations}: {verdict} "
             f"({outcome.updates} updates{refused}, {outcome.seconds:.0f} s), "
             f"mean Dice {mean:.3f} ({sites}); {elapsed / 60:.0f} min so far, about "
             f"{left / 60:.0f} min to go")


def _generation(arm: str, config: RunConfig, round_: int, hospitals: list[Hospital],
                server: _Server, work: Path, labels: Sequence[int]) -> GenerationOutcome:
    started = time.perf_counter()
    due = [h for h in hospitals if (round_ - 1) % h.plan.train_every == 0]
    honest = [h for h in due if h.plan.poison != "noise"]
    before = {h.plan.name: _last_run_id(h.status()) for h in honest}
    sent_before = {h.plan.name: h.status()["federation"]["uploads"]["sent"] for h in honest}
    studies = work / "studies"
    with ThreadPoolExecutor(max_workers=len(honest) or 1) as pool:  # hospitals are parallel
        for done in [pool.submit(_train_round, hospital, config, round_, studies, labels)
                     for hospital in honest]:
            done.result()
    expected = 0
    for hospital in honest:
        status = hospital.wait_status(
            "its training run", lambda s, h=hospital: _last_run_id(s) > before[h.plan.name]
            and (s["training"]["last_run"] or {}).get("finished_at") is not None, 1800)
        if status["training"]["last_run"]["outcome"] == "accepted":
            expected += 1
            hospital.wait_status("its upload", lambda s, h=hospital: s["federation"]["uploads"]
                                 ["sent"] > sent_before[h.plan.name], 300)
        else:
            LOGGER.warning("%s: %s: local run %s: %s", arm, hospital.plan.name,
                           status["training"]["last_run"]["outcome"],
                           status["training"]["last_run"].get("reason"))
    for hospital in due:
        if hospital.plan.poison == "noise":
            _upload_noise(server, hospital.plan.name, round_)
            expected += 1
    candidate, refused = server.aggregate() if expected else (None, [])
    number = candidate["number"] if candidate else None
    promoted = bool(candidate and candidate["state"] == "promoted")
    if promoted:
        for hospital in hospitals:
            if hospital.plan.train_every == 1 and hospital.plan.poison != "noise":
                hospital.wait_status(f"generation {number}", lambda s: s["federation"]
                                     ["generation_in_use"] == number, 300)
            elif hospital in due and hospital.plan.poison != "noise":
                hospital.restart_node()  # a slow hospital pulls only after its own rounds
                hospital.wait_status(f"generation {number}", lambda s: s["federation"]
                                     ["generation_in_use"] == number, 300)
    return GenerationOutcome(round=round_, number=number, promoted=promoted,
                             reason=candidate["reason"] if candidate else "no update",
                             updates=len(candidate["updates"]) if candidate else 0,
                             seconds=time.perf_counter() - started, refused=refused)


def _upload_noise(server: _Server, name: str, round_: int) -> None:
    """The ``noise`` poison: scaled Gaussian noise against the latest generation."""
    latest = server.latest()
    body = make_update(bundled_model(), seed=round_, scale=NOISE_SCALE,
                       base_generation=int(latest["number"]), base_sha256=latest["sha256"])
    answer = httpx.post(f"{server.url}/v1/models/leg/updates", content=body, timeout=60,
                        headers={"Authorization": f"Bearer {server.setup.tokens[name]}",
                                 "Idempotency-Key": f"noise-{round_}"})
    LOGGER.info("poisoned upload from %s: %d %s", name, answer.status_code,
                answer.json().get("detail", ""))
