"""A small multi-hospital run: the federation's root model gets better with the generations.

The same driver as ``bench/federated_improvement.py`` (real server process, one real node
process per hospital, DICOM in and out, a simulated radiologist's corrections, training,
upload, aggregation, gate, pull), scaled down to fit the test suite: four hospitals (sites
A-D, site D training every second generation), two generations, small studies, a weak root
trained on one site-A subject with half the product's network width on a grid of 3 mm
(64 x 128, the product's field of view): each step of the run, training, segmenting and
scoring, costs about a twelfth of the product model's, so the run fits the suite on CPUs
without bf16 too. It asserts what the full run measures: mean validation Dice
on subjects no hospital saw rises, through promoted generations (with the server lifting
the weakest site, so that the option is exercised through a real worker process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.improvement.hospital import HospitalPlan
from bench.improvement.root import weak_root
from bench.improvement.run import RunConfig, evaluation_set, run_arm
from dafne_node.model.preprocess import PreprocessConfig

COARSE_GRID = PreprocessConfig(target_spacing_mm=3.0, input_shape=(64, 128))
"""The product's field of view (192 x 384 mm) at 3 mm, near the small studies' 2.5 mm."""


def test_validation_dice_rises_over_generations(tmp_path: Path) -> None:
    config = RunConfig(
        hospitals=(HospitalPlan("hospital-a", "A"), HospitalPlan("hospital-b", "B"),
                   HospitalPlan("hospital-c", "C"), HospitalPlan("hospital-d", "D",
                                                                 train_every=2)),
        generations=2, studies_per_round=2, slices=8, matrix=128, steps=16,
        # a root of 80 steps is barely trained: the from-scratch rate moves it fastest
        learning_rate=2e-3, server_lr=1.0,
        eval_per_site=1, eval_slices=8, gate_slices=8, arms=("ours",), base_port=12300,
        lift_weakest_site=(2,),
        compile=False)  # 16-step runs: a compile would cost more than it saves
    root = weak_root(tmp_path / "cache", subjects=1, steps=80, width=8,
                     val_subjects=0, preprocessing=COARSE_GRID)
    result = run_arm("ours", config, tmp_path / "ours", root, evaluation_set(config))

    def mean(generation: int) -> float:
        return float(np.mean([r.dice for r in result.records if r.generation == generation]))

    assert [o.promoted for o in result.outcomes].count(True) >= 1, result.outcomes
    first = result.outcomes[0]
    assert first.updates + len(first.refused) == 4  # every hospital trained and uploaded
    assert mean(2) > mean(0) + 0.01, [(g, mean(g)) for g in range(3)]
    # The run keeps the worker's log, and the worker process took the lift from its config.
    worker_log = (tmp_path / "ours" / "server" / "worker.log").read_text()
    assert "model leg: candidate" in worker_log
    assert "counted 2x for site" in worker_log or "nothing to lift" in worker_log
