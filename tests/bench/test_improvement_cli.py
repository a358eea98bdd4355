"""The multi-hospital run's command line: what a flag asks for is what the run gets."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from bench.federated_improvement import build_parser, run_config
from bench.improvement.run import (
    ArmResult,
    ArmStoppedError,
    GenerationOutcome,
    RunConfig,
    _report,
    run_arms,
)
from bench.improvement.stats import DiceRecord


def train_every(config: RunConfig) -> dict[str, int]:
    return {plan.site: plan.train_every for plan in config.hospitals}


def test_defaults_are_the_documented_full_run() -> None:
    assert run_config(build_parser().parse_args([])) == RunConfig()
    assert train_every(RunConfig()) == {"A": 3, "B": 1, "C": 1, "D": 1}


def test_the_slow_hospital_is_chosen_by_site() -> None:
    args = build_parser().parse_args(["--slow-site", "D", "--slow-every", "2", "--steps", "30",
                                      "--arms", "ours, dafne", "--poison", "label-flip",
                                      "--replay-fraction", "0.5"])
    config = run_config(args)
    assert train_every(config) == {"A": 1, "B": 1, "C": 1, "D": 2}
    assert (config.steps, config.arms, config.poison) == (30, ("ours", "dafne"), "label-flip")
    assert config.replay_fraction == 0.5
    # the poisoned hospital trains every generation whichever site is slow
    assert config.plans()[-1].train_every == 1


def test_lifting_the_weakest_site_takes_factors_or_off() -> None:
    assert run_config(build_parser().parse_args(["--lift-weakest-site", "2,3"])
                      ).lift_weakest_site == (2, 3)
    assert run_config(build_parser().parse_args(["--lift-weakest-site", "off"])
                      ).lift_weakest_site == ()
    config = run_config(build_parser().parse_args(["--lift-max-mean-cost", "0.01"]))
    assert config.lift_max_mean_cost == 0.01


@pytest.mark.parametrize("value", ["1,2", "two", "2;3"])
def test_a_factor_that_makes_no_sense_is_refused_by_the_parser(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--lift-weakest-site", value])
    assert exit_info.value.code == 2
    assert "--lift-weakest-site" in capsys.readouterr().err


def test_a_failing_arm_stops_the_other_and_its_error_is_the_one_raised(tmp_path: Path) -> None:
    """Before, the Dafne arm died in generation 1 and ours trained on for an hour, to a run
    that then ended without results."""
    finished: list[str] = []

    def runner(arm: str, config: RunConfig, work: Path, root_dir: Path, datasets: Any, *,
               progress: Any, stop: threading.Event) -> ArmResult:
        if arm == "dafne":
            raise RuntimeError("hospital-d: 1 file(s) not stored after 3 attempts")
        for _ in range(config.generations):  # ours: a generation is 0.1 s here
            if stop.wait(0.1):
                raise ArmStoppedError("ours: stopped")
        finished.append(arm)
        return ArmResult(arm=arm)

    config = RunConfig(generations=300)
    with pytest.raises(RuntimeError, match="not stored"):
        run_arms(config, tmp_path, tmp_path, {}, parallel=True, runner=runner)
    assert finished == []  # stopped long before its 30 s of generations


def test_arms_that_succeed_return_in_order(tmp_path: Path) -> None:
    def runner(arm: str, *args: Any, **kwargs: Any) -> ArmResult:
        return ArmResult(arm=arm, seconds=1.0)

    results = run_arms(RunConfig(), tmp_path, tmp_path, {}, parallel=False, runner=runner)
    assert [r.arm for r in results] == ["ours", "dafne"]


def test_one_after_the_other_an_arm_after_a_failed_one_does_not_start(tmp_path: Path) -> None:
    started: list[str] = []

    def runner(arm: str, *args: Any, **kwargs: Any) -> ArmResult:
        started.append(arm)
        raise RuntimeError(f"{arm}: the node exited")

    with pytest.raises(RuntimeError, match="ours: the node exited"):
        run_arms(RunConfig(), tmp_path, tmp_path, {}, parallel=False, runner=runner)
    assert started == ["ours"]


def test_ctrl_c_stops_every_arm_before_the_run_returns(tmp_path: Path) -> None:
    """Before, Ctrl-C waited for both arms to finish every generation, and SIGTERM left
    their nodes and servers running."""
    stopped: list[str] = []

    def runner(arm: str, config: RunConfig, work: Path, root_dir: Path, datasets: Any, *,
               progress: Any, stop: threading.Event) -> ArmResult:
        for _ in range(200):  # at most 10 s: without the stop, the run returns and fails
            if stop.wait(0.05):
                stopped.append(arm)
                raise ArmStoppedError(f"{arm}: stopped")
        return ArmResult(arm=arm)

    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run_arms(RunConfig(), tmp_path, tmp_path, {}, parallel=True, runner=runner)
    assert sorted(stopped) == ["dafne", "ours"]


def test_a_generations_progress_line_gives_every_sites_mean(tmp_path: Path) -> None:
    """Site C is the one that lags: someone watching an hour-long run wants to see it."""
    scored: Future[list[DiceRecord]] = Future()
    scored.set_result([DiceRecord("ours", 3, site, f"{site}{i}", dice)
                       for site, dices in {"A": (0.9, 0.8), "C": (0.6, 0.7)}.items()
                       for i, dice in enumerate(dices)])
    lines: list[str] = []
    outcome = GenerationOutcome(round=3, number=4, promoted=True, reason="", updates=4,
                                seconds=400.0)
    _report(lines.append, "ours", RunConfig(), outcome, time.perf_counter() - 1200, scored)
    assert "mean Dice 0.750 (A 0.850, C 0.650)" in lines[0]
    assert lines[0].startswith("ours: generation 3/10: promoted g4 (4 updates, 400 s)")
