"""The multi-hospital run's command line: what a flag asks for is what the run gets."""

from __future__ import annotations

from bench.federated_improvement import build_parser, run_config
from bench.improvement.run import RunConfig


def train_every(config: RunConfig) -> dict[str, int]:
    return {plan.site: plan.train_every for plan in config.hospitals}


def test_defaults_are_the_documented_full_run() -> None:
    assert run_config(build_parser().parse_args([])) == RunConfig()
    assert train_every(RunConfig()) == {"A": 3, "B": 1, "C": 1, "D": 1}


def test_the_slow_hospital_is_chosen_by_site() -> None:
    args = build_parser().parse_args(["--slow-site", "D", "--slow-every", "2", "--steps", "30",
                                      "--arms", "ours, dafne", "--poison", "label-flip"])
    config = run_config(args)
    assert train_every(config) == {"A": 1, "B": 1, "C": 1, "D": 2}
    assert (config.steps, config.arms, config.poison) == (30, ("ours", "dafne"), "label-flip")
    # the poisoned hospital trains every generation whichever site is slow
    assert config.plans()[-1].train_every == 1
