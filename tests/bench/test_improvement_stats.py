"""The multi-hospital run's analysis: Dice table, Dafne-style slope fit, plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.improvement.plot import plot_dice
from bench.improvement.stats import (
    DiceRecord,
    FitMethod,
    fit_slope,
    mean_dice,
    per_site_fits,
    table,
)
from bench.improvement.targets import Target, check_targets

SITES = "ABCD"


def synthetic(*, arm: str = "ours", slope: float = 0.01, slope_sd: float = 0.002,
              intercept_sd: float = 0.03, noise: float = 0.005, sites: str = SITES,
              per_site: int = 3, generations: int = 11, seed: int = 0) -> list[DiceRecord]:
    """Dice = a + b * generation + noise, with a and b drawn per dataset around 0.7 and slope."""
    rng = np.random.default_rng(seed)
    out = []
    for site in sites:
        for d in range(per_site):
            a = 0.7 + rng.normal(0, intercept_sd)
            b = slope + rng.normal(0, slope_sd)
            out += [DiceRecord(arm, g, site, str(d), float(a + b * g + rng.normal(0, noise)))
                    for g in range(generations)]
    return out


def test_known_slope_is_recovered_by_the_papers_model() -> None:
    fit = fit_slope(synthetic(), arm="ours")
    assert fit.method == FitMethod.RANDOM_SLOPE
    assert fit.notes == ()
    assert abs(fit.slope - 0.01) < 0.002
    assert fit.ci_low < 0.01 < fit.ci_high
    assert fit.p_value < 0.001
    assert (fit.n_datasets, fit.n_generations) == (12, 11)
    assert "p < 0.001" in fit.format()


def test_flat_series_has_no_significant_slope() -> None:
    fit = fit_slope(synthetic(slope=0.0, slope_sd=0.0), arm="ours")
    assert abs(fit.slope) < 0.001
    assert fit.p_value > 0.05
    assert fit.ci_low < 0 < fit.ci_high
    # No true slope variance: the random-slope model is rejected, and the fit says so.
    assert fit.method in {FitMethod.RANDOM_SLOPE, FitMethod.RANDOM_INTERCEPT}
    if fit.method != FitMethod.RANDOM_SLOPE:
        assert fit.notes[0].startswith(FitMethod.RANDOM_SLOPE)


def test_degenerate_input_falls_back_instead_of_raising() -> None:
    records = synthetic(sites="A", per_site=2, generations=3, noise=0.0, slope_sd=0.0)
    fit = fit_slope(records, arm="ours")
    assert fit.method not in {FitMethod.RANDOM_SLOPE, FitMethod.RANDOM_INTERCEPT}
    assert len(fit.notes) >= 2
    assert all(any(n.startswith(m) for n in fit.notes)
               for m in (FitMethod.RANDOM_SLOPE, FitMethod.RANDOM_INTERCEPT))
    assert fit.slope == pytest.approx(0.01)
    # Values on exact lines: no noise, so no CI or p-value rather than rounding error.
    assert fit.method == FitMethod.NONE
    assert math.isnan(fit.ci_low) and math.isnan(fit.p_value)
    assert "no CI" in fit.format()


def test_two_noisy_datasets_use_cluster_robust_ols() -> None:
    fit = fit_slope(synthetic(sites="A", per_site=2, generations=5), arm="ours")
    assert fit.method == FitMethod.OLS_CLUSTER
    assert fit.ci_low < fit.slope < fit.ci_high


def test_one_dataset_uses_ols_and_one_generation_has_no_slope() -> None:
    one = synthetic(sites="A", per_site=1, generations=6)
    assert fit_slope(one, arm="ours").method == FitMethod.OLS
    root_only = synthetic(sites="A", per_site=3, generations=1)
    fit = fit_slope(root_only, arm="ours")
    assert fit.method == FitMethod.NONE and math.isnan(fit.slope)


def test_per_site_fits() -> None:
    records = synthetic(per_site=4) + synthetic(arm="dafne", slope=0.0)
    fits = per_site_fits(records, "ours")
    assert list(fits) == list(SITES)
    for site, fit in fits.items():
        assert fit.n_datasets == 4, site
        assert abs(fit.slope - 0.01) < 0.003, site
        assert fit.p_value < 0.001, site


def test_table_has_every_generation_site_and_arm() -> None:
    records = synthetic() + synthetic(arm="dafne", slope=0.005, generations=9)
    text = table(records)
    lines = text.splitlines()
    header = lines[0]
    for arm in ("ours", "dafne"):
        for column in [*SITES, "mean"]:
            assert f"| {arm} {column} |" in header
    assert header.index("ours A") < header.index("dafne A")
    rows = lines[2:]
    assert [row.split("|")[1].strip() for row in rows] == [str(g) for g in range(11)]
    # dafne stopped at generation 8: its cells are empty, not zero.
    assert rows[10].rstrip(" |").endswith("| -")
    overall = mean_dice(records, arm="ours")[10].mean
    assert f"| {overall:.3f} |" in rows[10]


def test_records_are_validated() -> None:
    with pytest.raises(ValueError, match="dice"):
        DiceRecord("ours", 0, "A", "0", 1.5)
    with pytest.raises(ValueError, match="dice"):
        DiceRecord("ours", 0, "A", "0", math.nan)
    with pytest.raises(ValueError, match="generation"):
        DiceRecord("ours", -1, "A", "0", 0.5)
    twice = [DiceRecord("ours", 0, "A", "0", 0.5), DiceRecord("ours", 0, "A", "0", 0.6)]
    with pytest.raises(ValueError, match="two Dice values"):
        table(twice)
    with pytest.raises(ValueError, match="no records"):
        fit_slope(synthetic(), arm="dafne")


def test_plot_writes_the_same_png_twice(tmp_path: Path) -> None:
    records = synthetic(generations=6) + synthetic(arm="dafne", slope=0.004, generations=6)
    first = plot_dice(records, tmp_path / "a" / "dice.png", title="synthetic")
    second = plot_dice(records, tmp_path / "dice.png", title="synthetic")
    data = first.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert data == second.read_bytes()


def test_numpy_scalars_become_plain_numbers() -> None:
    record = DiceRecord("ours", np.int64(3), "A", "0", np.float32(0.5))
    assert type(record.generation) is int and type(record.dice) is float


def _by_name(targets: list[Target]) -> dict[str, Target]:
    return {t.name: t for t in targets}


def test_targets_of_a_run_that_rises_steadily_to_090_are_met() -> None:
    # 0.60 at the root, +0.031 per generation: above 0.90 on every site after 10.
    rng = np.random.default_rng(1)
    ours = [DiceRecord("ours", g, site, str(d), 0.6 + 0.031 * g + rng.normal(0, 0.002))
            for site in SITES for d in range(3) for g in range(11)]
    dafne = synthetic(arm="dafne", slope=0.02, generations=11)
    targets = _by_name(check_targets(
        ours + dafne, arm="ours", fit=fit_slope(ours, arm="ours"), promoted=[True] * 10,
        baseline_arm="dafne", clean=ours))
    assert all(t.met for t in targets.values()), [t.format() for t in targets.values()]
    assert set(targets) == {
        "slope per generation", "generations promoted", "final mean Dice on every site",
        "final mean Dice above the dafne arm's",
        "largest drop of mean Dice in a promoted generation",
        "final mean Dice with the poisoned hospital"}


def test_targets_name_what_a_run_missed() -> None:
    rising = synthetic(slope=0.01, slope_sd=0.0, intercept_sd=0.0, noise=0.002,
                       generations=11)
    # generation 5 falls by 0.05 on every dataset and is promoted all the same
    records = [DiceRecord(r.arm, r.generation, r.site, r.dataset,
                          r.dice - (0.05 if r.generation == 5 else 0.0)) for r in rising]
    better_baseline = [DiceRecord("dafne", r.generation, r.site, r.dataset, r.dice + 0.05)
                       for r in rising]
    clean = [DiceRecord(r.arm, r.generation, r.site, r.dataset, r.dice + 0.03) for r in rising]
    promoted = [True] * 4 + [True] + [False] * 5

    targets = _by_name(check_targets(
        records + better_baseline, arm="ours", fit=fit_slope(records, arm="ours"),
        promoted=promoted, baseline_arm="dafne", clean=clean))

    assert targets["slope per generation"].met  # 0.01 a generation, p < 0.001
    assert not targets["final mean Dice on every site"].met  # about 0.80
    assert not targets["final mean Dice above the dafne arm's"].met
    drop = targets["largest drop of mean Dice in a promoted generation"]
    assert not drop.met and "(generation 5)" in drop.measured
    assert targets["generations promoted"].met  # 5 of 10 is half
    assert not targets["final mean Dice with the poisoned hospital"].met  # 0.03 below clean
    assert "MISSED" in drop.format()


def test_targets_leave_out_what_the_run_cannot_measure() -> None:
    ours = synthetic(generations=11)
    targets = _by_name(check_targets(ours, arm="ours", fit=fit_slope(ours, arm="ours"),
                                     promoted=[False] * 10, baseline_arm="dafne"))
    assert "final mean Dice above the dafne arm's" not in targets
    assert "final mean Dice with the poisoned hospital" not in targets
    assert not targets["generations promoted"].met
    assert targets["largest drop of mean Dice in a promoted generation"].measured \
        == "no promoted one"
