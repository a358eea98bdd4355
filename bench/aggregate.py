"""Benchmark: aggregating and validating a buffer of 10 updates, stage by stage.

Sets up a federation server the way an operator does (``dafne-federation init``,
``model init``, ``node add``; SQLite, artifacts on disk, the default validation set of
4 sites x 2 subjects x 24 slices that ``init`` makes) with two models seeded from the
bundled model: ``leg`` aggregated with FedBuff (norm clipping, relative gate) and
``leg-dafne`` with Dafne's merge rule (absolute gate). Each round, ``--updates`` nodes
upload one update each through the API (``topk-int8`` noise deltas against generation 1;
timing does not depend on their content), then the real aggregation worker
(``federation.worker.Aggregator``) aggregates that model once. The worker's own calls are
timed in place:

* decode: ``decode_update`` of every buffered update (read from the artifact store);
* strategy: the strategy's ``aggregate`` (for Dafne's rule this includes loading the
  generation each update was trained from, which the rule needs);
* store: writing the candidate's weights (safetensors, fsynced);
* scoring: the candidate on the validation set (``federation.gate.score_state``);
* rest: the rest of the total (lease, loading the current generation and checking its
  sha256, the database transaction, signing the manifest when promoted).

The first round of each model also scores the seed generation once (its scores are kept),
so it is shown apart and the table gives the median of the ``--rounds`` rounds after it.

    .venv/bin/python bench/aggregate.py               # 10 updates, 3 measured rounds each
    .venv/bin/python bench/aggregate.py --rounds 1    # quicker

Prints a Markdown table for docs/benchmarks.md and the command; ``--json OUT`` also writes
the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from db.session import make_engine, make_session_factory  # noqa: E402 - path set up above
from federation import worker  # noqa: E402
from federation.app import create_app  # noqa: E402
from federation.config import FederationConfig  # noqa: E402
from federation.signing import load_signing_key  # noqa: E402
from federation.storage import open_store  # noqa: E402
from federation.validation import load_validation_set, make_validation_set  # noqa: E402
from tests.federation.server import (  # noqa: E402
    FederationSetup,
    bundled_model,
    make_update,
    run_cli,
    set_up,
)

F = TypeVar("F", bound=Callable[..., Any])
STAGES = ("decode", "strategy", "store", "scoring")
MODELS = {"leg": "fedbuff", "leg-dafne": "dafne"}
LABELS = {"fedbuff": "FedBuff (clip 20, relative gate)", "dafne": "Dafne's rule (absolute gate)"}


class Stopwatch:
    """Seconds spent in wrapped callables, summed per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, function: F) -> F:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - started
        return timed  # type: ignore[return-value]


@contextlib.contextmanager
def timing(watch: Stopwatch) -> Iterator[None]:
    """Time the worker's stages: its module-level calls, wrapped for the duration."""
    make_strategy_for = worker.make_strategy_for

    def timed_strategy(config: FederationConfig, name: str) -> Any:
        strategy = make_strategy_for(config, name)
        strategy.aggregate = watch.wrap("strategy", strategy.aggregate)  # type: ignore[method-assign]
        return strategy

    with contextlib.ExitStack() as stack:
        for stage, name in (("decode", "decode_update"), ("store", "store_weights"),
                            ("scoring", "score_state")):
            stack.enter_context(mock.patch.object(worker, name,
                                                  watch.wrap(stage, getattr(worker, name))))
        stack.enter_context(mock.patch.object(worker, "make_strategy_for", timed_strategy))
        yield


def build_server(work: Path, nodes: int, threads: int | None) -> FederationSetup:
    """A server as ``init`` makes it, both models, ``nodes`` nodes that may push to both."""
    validation = work / "validation"
    make_validation_set(validation)  # the set `dafne-federation init` makes by default
    sections: dict[str, dict[str, Any]] = {"gate": {"validation_dir": validation}}
    if threads is not None:
        sections["gate"]["threads"] = threads
    setup = set_up(work, sections=sections, nodes=(), model="leg", strategy="fedbuff")
    run_cli("model", "init", "leg-dafne", "--strategy", "dafne",
            "--config", str(setup.config_path))
    for i in tqdm(range(nodes), desc="node add", unit="node"):
        setup.add_node(f"hospital-{i:02d}", ",".join(MODELS))
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=10,
                        help="updates in the buffer (one per node)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured aggregations per strategy, after the first")
    parser.add_argument("--threads", type=int, default=None,
                        help="[gate] threads of the scoring (default: every core)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    from fastapi.testclient import TestClient  # noqa: PLC0415 - keeps --help quiet and quick

    work = Path(tempfile.mkdtemp(prefix="dafne-aggregate-"))
    setup = build_server(work, args.updates, args.threads)
    config = setup.config
    cases = load_validation_set(config.validation_dir)
    aggregator = worker.Aggregator(
        config, make_session_factory(make_engine(config.database_url)),
        open_store(config.storage_location), load_signing_key(config.key_file), cases)
    base = bundled_model()
    payloads = [make_update(base, seed=i, num_samples=2 + i % 8)
                for i in tqdm(range(args.updates), desc="encoding updates", unit="update")]

    results: dict[str, list[dict[str, Any]]] = {}
    with TestClient(create_app(config)) as client:
        for model, strategy in MODELS.items():
            results[strategy] = []
            for round_ in tqdm(range(args.rounds + 1), desc=f"{strategy} aggregations",
                               unit="round"):
                for i, payload in enumerate(payloads):
                    answer = client.post(f"/v1/models/{model}/updates", content=payload, headers={
                        "Authorization": f"Bearer {setup.tokens[f'hospital-{i:02d}']}",
                        "Idempotency-Key": f"{model}-{round_}-{i}"})
                    if answer.status_code != 202:
                        raise SystemExit(f"upload refused: {answer.status_code} {answer.text}")
                watch = Stopwatch()
                started = time.perf_counter()
                with timing(watch):
                    outcome = aggregator.aggregate(model, force=True)
                total = time.perf_counter() - started
                if outcome is None or len(outcome.update_ids) != args.updates:
                    raise SystemExit(f"{model}: expected one aggregation of {args.updates} "
                                     f"updates, got {outcome}")
                results[strategy].append({
                    **{stage: watch.seconds[stage] for stage in STAGES}, "total": total,
                    "rest": total - sum(watch.seconds[stage] for stage in STAGES),
                    "promoted": outcome.promoted, "number": outcome.number,
                    "reason": outcome.reason})
    print_table(args, results, len(cases), load)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]],
                cases: int, load: float) -> None:
    print(f"\n{args.updates} buffered updates per aggregation, SQLite, validation set of "
          f"{cases} cases (4 sites x 2 x 24 slices), scoring threads "
          f"{args.threads or 'all cores'} of {os.cpu_count()} (load average at the start "
          f"{load:.1f}); median of {args.rounds} aggregation(s) after the first\n")
    strategies = list(results)
    print("| seconds | " + " | ".join(LABELS[s] for s in strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    for stage in (*STAGES, "rest", "total"):
        cells = []
        for s in strategies:
            values = [r[stage] for r in results[s][1:]]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        label = f"**{stage}**" if stage == "total" else stage
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| first aggregation (also scores the seed), total | "
          + " | ".join(f"{results[s][0]['total']:.2f}" for s in strategies) + " |")
    for s in strategies:
        decided = ", ".join(f"generation {r['number']}" if r["promoted"] else "rejected"
                            for r in results[s])
        print(f"\n{LABELS[s]}: {decided}; last reason: {results[s][-1]['reason']}")
    print(f"\ncommand: .venv/bin/python {shlex.join(['bench/aggregate.py', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
