"""Benchmark: how small a federation update is, and what the compression costs in Dice.

A node uploads a weight delta (fine-tuned minus base) encoded by
``dafne_node.learning.update.encode_update``; the server decodes it and adds it to the base.
This script makes a real delta and measures, for each encoding, the bytes on the wire
against the full fp32 model and the Dice of ``base + decode(encode(delta))`` against the
Dice of the uncompressed (fp32) delta:

1. fine-tunes the bundled model (generation 1, site A) with
   ``dafne_node.learning.finetune.finetune`` on ``--new`` corrected site-C phantoms
   (seeds 2000, ...) plus replayed site-A phantoms (seeds 3000, ...), in ``--windows``
   training windows of ``--steps`` steps each, each window starting from the last one's
   model (as a node does between two generations);
2. the delta is the final model minus the base, in fp32; each encoding (``fp16``,
   ``int8``, ``topk-int8`` at every ``--densities``) goes through encode -> bytes ->
   decode -> base + delta;
3. every model is scored as the server's gate scores (``federation.gate.score_state``, fp32)
   on ``--heldout`` site-C and site-A subjects (seeds 0 .. N-1, never trained on).

Error feedback (what ``topk-int8`` drops is kept in a residual and added to the next
upload) shows only over several uploads, so the script also plays the windows as rounds:
after each window the node uploads that window's change (the delta against the previous
generation), the server applies it and promotes the result. The rounds are compared at
``--ef-density`` with and without the residual, against the exact (fp32) trajectory. The
node here trains along the exact trajectory; how training would react to the slightly
different generation it pulls is left out.

    .venv/bin/python bench/update_size.py                    # the documented run (~5 min)
    .venv/bin/python bench/update_size.py --windows 1 --steps 20 --heldout 2   # quick

Prints Markdown tables for docs/benchmarks.md and the command; ``--json OUT`` also writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.finetune import phantoms  # noqa: E402 - path set up above
from dafne_node.learning.delta import DeltaMetadata  # noqa: E402
from dafne_node.learning.finetune import FinetuneSettings, finetune  # noqa: E402
from dafne_node.learning.update import Encoding, decode_update, encode_update  # noqa: E402
from dafne_node.model.manifest import (  # noqa: E402
    WEIGHTS_FILE,
    LoadedModel,
    default_model_dir,
    load_model_dir,
)
from federation.aggregate import add_scaled, l2_norm  # noqa: E402
from federation.gate import Scores, score_state  # noqa: E402
from federation.validation import ValidationCase  # noqa: E402

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    """One model of the result table."""

    name: str
    size_bytes: int | None
    error: float | None
    scores: Scores


def fp32(state: State) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in state.items()}


def difference(a: State, b: State) -> dict[str, torch.Tensor]:
    """``a - b`` per tensor, fp32."""
    return {k: a[k].float() - b[k].float() for k in b}


def relative_error(approx: State, exact: State) -> float:
    """``||approx - exact|| / ||exact||`` over all tensors together."""
    return l2_norm(difference(approx, exact)) / l2_norm(exact)


def train_windows(args: argparse.Namespace, work: Path) -> list[LoadedModel]:
    """The base model and the model after each training window."""
    new = phantoms("C", range(2000, 2000 + args.new), args.slices, "corrections")
    replay = phantoms("A", range(3000, 3000 + args.replay_pool), args.slices, "replay pool")
    root = default_model_dir()
    models = [load_model_dir(root)]
    for window in range(1, args.windows + 1):
        settings = FinetuneSettings(steps=args.steps, threads=args.threads, seed=window,
                                    lr=args.lr)
        outcome = finetune(models[-1].path, new, replay, [], settings,
                           out_dir=work / f"window{window}", checkpoint_dir=work / "checkpoint",
                           root_dir=root if window > 1 else None, local_round=window)
        if outcome.model_dir is None:
            raise SystemExit(f"window {window} not accepted: {outcome.reason}")
        print(f"window {window}: {outcome.report.steps} steps in {outcome.report.seconds:.0f} s "
              f"({outcome.report.precision}, {outcome.report.threads} threads), "
              f"{outcome.num_new} new + {outcome.num_replay} replayed series", flush=True)
        models.append(load_model_dir(outcome.model_dir))
    return models


def encodings(densities: Sequence[float]) -> list[tuple[str, Encoding, float]]:
    out = [("fp16", Encoding.FP16, 1.0), ("int8", Encoding.INT8, 1.0)]
    out += [(f"topk-int8, density {d:g}", Encoding.TOPK_INT8, d) for d in densities]
    return out


def metadata_for(base: LoadedModel, samples: int) -> DeltaMetadata:
    return DeltaMetadata(model_name=base.manifest.name,
                         architecture=base.manifest.architecture.id,
                         base_generation=base.manifest.generation,
                         base_sha256=base.manifest.weights.sha256, num_samples=samples,
                         num_slices=0)


def send(delta: State, meta: DeltaMetadata, encoding: Encoding, density: float,
         residual: State | None = None) -> tuple[dict[str, torch.Tensor], int,
                                                 dict[str, torch.Tensor]]:
    """What the server gets: decoded tensors, the payload size, and the node's residual."""
    encoded = encode_update(delta, meta, encoding=encoding, density=density, residual=residual)
    return decode_update(encoded.payload).tensors, len(encoded.payload), encoded.residual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=4, help="corrected site-C series")
    parser.add_argument("--replay-pool", type=int, default=4, help="site-A replay series")
    parser.add_argument("--slices", type=int, default=24, help="slices per series")
    parser.add_argument("--windows", type=int, default=3,
                        help="training windows (each continues the last one's model)")
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--lr", type=float, default=FinetuneSettings().lr)
    parser.add_argument("--heldout", type=int, default=4,
                        help="held-out subjects per site (C and A) to score on")
    parser.add_argument("--densities", default="0.05,0.1,0.2",
                        help="topk-int8 densities to measure (comma-separated)")
    parser.add_argument("--ef-density", type=float, default=0.1,
                        help="topk-int8 density of the error-feedback rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="dafne-update-size-"))
    models = train_windows(args, work)
    base = models[0]
    cases = [ValidationCase(site=site, name=f"{site}{i}", example=example)
             for site in ("C", "A")
             for i, example in enumerate(phantoms(site, range(args.heldout), args.slices,
                                                  "held out"))]
    evaluated: dict[str, Scores] = {}

    def score(name: str, state: State) -> Scores:
        """The gate's scores of ``state``, computed once per name."""
        if name not in evaluated:
            evaluated[name] = score_state(base.manifest, state, cases, threads=args.threads)
        return evaluated[name]

    states = [fp32(m.model.state_dict()) for m in models]
    delta = difference(states[-1], states[0])
    meta = metadata_for(base, args.new + args.replay_pool)
    model_bytes = (base.path / WEIGHTS_FILE).stat().st_size
    numel = sum(t.numel() for t in delta.values())
    rows = [Row("base (generation 1)", None, None, score("base", states[0])),
            Row("fine-tuned, uncompressed (fp32 delta)", 4 * numel, 0.0,
                score("fp32", states[-1]))]
    for name, encoding, density in tqdm(encodings([float(d) for d in args.densities.split(",")]),
                                        desc="encodings", unit="encoding"):
        decoded, size, _ = send(delta, meta, encoding, density)
        rows.append(Row(name, size, relative_error(decoded, delta),
                        score(name, add_scaled(states[0], decoded))))

    rounds = ef_rounds(args, states, meta, score)
    seconds = time.perf_counter() - started

    print(f"\nbundled model: {numel:,} parameters, weights file {model_bytes:,} bytes (fp32); "
          f"fine-tuned in {args.windows} window(s) of {args.steps} steps on {args.new} "
          f"site-C + {args.replay_pool} replayed site-A series of {args.slices} slices; "
          f"scored on {args.heldout} held-out subjects per site ({args.slices} slices), fp32, "
          f"{args.threads} threads; whole run {seconds:.0f} s (load average at the start "
          f"{load:.1f})\n")
    print("| model | update bytes | % of fp32 model | delta error (rel. L2) | site-C Dice "
          "| site-A Dice | site-C Dice vs fp32 delta |")
    print("|---|---|---|---|---|---|---|")
    reference = rows[1].scores.sites["C"]
    for row in rows:
        size = "" if row.size_bytes is None else f"{row.size_bytes:,}"
        share = "" if row.size_bytes is None else f"{100 * row.size_bytes / model_bytes:.1f} %"
        error = "" if row.error is None else f"{row.error:.3f}"
        print(f"| {row.name} | {size} | {share} | {error} | {row.scores.sites['C']:.3f} "
              f"| {row.scores.sites['A']:.3f} | {row.scores.sites['C'] - reference:+.3f} |")
    if rounds:
        print(f"\nerror feedback: {args.windows} uploads (one per window) at density "
              f"{args.ef_density:g}; error = rel. L2 distance of the server's model change "
              "from the exact one\n")
        print("| after upload | exact: site-C / site-A | without residual: site-C / site-A "
              "(error) | with residual: site-C / site-A (error) |")
        print("|---|---|---|---|")
        for r in rounds:
            print(f"| {r['round']} | {r['exact_C']:.3f} / {r['exact_A']:.3f} | "
                  f"{r['plain_C']:.3f} / {r['plain_A']:.3f} ({r['plain_error']:.3f}) | "
                  f"{r['feedback_C']:.3f} / {r['feedback_A']:.3f} "
                  f"({r['feedback_error']:.3f}) |")
    print(f"\ncommand: .venv/bin/python {shlex.join(['bench/update_size.py', *sys.argv[1:]])}")
    if args.json:
        args.json.write_text(json.dumps({
            "model_bytes": model_bytes, "parameters": numel, "seconds": round(seconds, 1),
            "rows": [{"name": r.name, "size_bytes": r.size_bytes, "error": r.error,
                      "scores": r.scores.to_json()} for r in rows],
            "error_feedback": rounds, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=2))


def ef_rounds(args: argparse.Namespace, states: list[dict[str, torch.Tensor]],
              meta: DeltaMetadata, score: Callable[[str, State], Scores]
              ) -> list[dict[str, float]]:
    """Upload each window's change at ``--ef-density``, with and without the residual."""
    if len(states) < 3:
        return []
    plain = fp32(states[0])
    feedback = fp32(states[0])
    residual: dict[str, torch.Tensor] | None = None
    out = []
    for k in tqdm(range(1, len(states)), desc="error-feedback rounds", unit="upload"):
        change = difference(states[k], states[k - 1])
        sent, _, _ = send(change, meta, Encoding.TOPK_INT8, args.ef_density)
        plain = add_scaled(plain, sent)
        sent, _, residual = send(change, meta, Encoding.TOPK_INT8, args.ef_density, residual)
        feedback = add_scaled(feedback, sent)
        exact_change = difference(states[k], states[0])
        exact = score("fp32" if k == len(states) - 1 else f"exact {k}", states[k])
        p, f = score(f"plain {k}", plain), score(f"feedback {k}", feedback)
        out.append({"round": k, "exact_C": exact.sites["C"], "exact_A": exact.sites["A"],
                    "plain_C": p.sites["C"], "plain_A": p.sites["A"],
                    "feedback_C": f.sites["C"], "feedback_A": f.sites["A"],
                    "plain_error": relative_error(difference(plain, states[0]), exact_change),
                    "feedback_error": relative_error(difference(feedback, states[0]),
                                                     exact_change)})
        if not all(math.isfinite(v) for v in out[-1].values()):
            raise SystemExit(f"round {k}: a score is not a number: {out[-1]}")
    return out


if __name__ == "__main__":
    main()
