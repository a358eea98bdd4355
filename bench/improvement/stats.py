"""Validation Dice per model generation: the table, and a slope fit like Dafne's.

The run records, after every model generation (0 = the root) and for each arm, the Dice of
the root model on every validation dataset (one phantom subject of one site, never trained
on) as a ``DiceRecord``. A dataset is identified by its site and its name together, so two
sites may both call a subject ``"0"``.

Dafne's paper reports +0.0073 Dice per generation (95 % CI 0.0034-0.011, p < 0.001) from a
linear mixed model with a random slope per validation dataset. ``fit_slope`` fits that model,
``dice ~ generation`` with a random intercept and a random slope of generation per dataset
(statsmodels ``MixedLM``, REML), and reports the fixed effect of generation: its estimate,
Wald 95 % CI and two-sided p-value (normal reference distribution, as statsmodels gives it).

A small run often cannot support that model: too few datasets or generations, a random-effects
covariance estimated at the boundary (a random slope variance of zero), an optimiser that does
not converge, or data with no noise at all. ``fit_slope`` then falls back, in this order, and
returns the first fit that is usable (converged, a positive-definite Hessian, a non-singular
random-effects covariance, a finite slope standard error of at least ``MIN_SE``):

1. ``mixedlm-random-slope``: the paper's model. Needs >= 3 datasets and >= 3 generations.
2. ``mixedlm-random-intercept``: the same without the random slope, what one fits when the
   slope variance is estimated at zero. Needs >= 3 datasets and >= 2 generations.
3. ``ols-cluster-robust``: ordinary least squares with standard errors clustered by dataset
   and a t reference distribution with (datasets - 1) degrees of freedom; needs >= 2 datasets
   and >= 2 generations. With few datasets its CI is wide, as it should be.
4. ``ols``: ordinary least squares with independent errors, for a single dataset only (with
   several, independent errors would overstate the evidence); needs >= 3 generations.
5. ``none``: the least-squares slope (NaN with fewer than 2 generations) and no CI or p-value
   (NaN): too little data, or values with no noise at all (a slope standard error below
   ``MIN_SE``), for which a CI would be rounding error.

"Singular" follows lme4's ``isSingular``: a diagonal element of the Cholesky factor of the
random-effects covariance relative to the residual variance below 1e-4. (statsmodels' own
"MLE may be on the boundary" warning compares absolute variances with 0.01, which every
Dice-scale fit trips, so it is not used.) ``SlopeFit.method`` names the fit returned and
``SlopeFit.notes`` says why each earlier one was rejected; both are also logged.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from numbers import Integral

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.regression.mixed_linear_model import MixedLM

LOGGER = logging.getLogger(__name__)

SINGULAR_TOL = 1e-4
"""lme4's default tolerance for a singular random-effects covariance (relative Cholesky factor)."""

MIN_DATASETS_MIXED = 3
"""Fewer datasets than this cannot estimate a between-dataset variance worth the name."""

MIN_SE = 1e-10
"""A slope standard error below this (Dice per generation) is rounding error: no noise."""

_IGNORED_WARNINGS = ("Retrying MixedLM", "Maximum Likelihood optimization failed",
                     "MixedLM optimization failed", "The MLE may be on the boundary")


class FitMethod(StrEnum):
    """How ``fit_slope`` estimated the slope, in fallback order."""

    RANDOM_SLOPE = "mixedlm-random-slope"
    RANDOM_INTERCEPT = "mixedlm-random-intercept"
    OLS_CLUSTER = "ols-cluster-robust"
    OLS = "ols"
    NONE = "none"


@dataclass(frozen=True)
class DiceRecord:
    """The Dice of one arm's root model of ``generation`` on one validation dataset."""

    arm: str
    generation: int
    site: str
    dataset: str
    dice: float

    def __post_init__(self) -> None:
        if not self.arm:
            raise ValueError("arm: must not be empty")
        integral = isinstance(self.generation, Integral) and not isinstance(self.generation, bool)
        if not integral or self.generation < 0:
            raise ValueError(f"generation: expected an int >= 0, got {self.generation!r}")
        # numpy scalars from the driver become plain numbers (hashable, printable, JSON).
        object.__setattr__(self, "generation", int(self.generation))
        object.__setattr__(self, "dice", float(self.dice))
        if not self.site or not self.dataset:
            raise ValueError(f"site and dataset must not be empty: {self.site!r}, "
                             f"{self.dataset!r}")
        if not (0.0 <= self.dice <= 1.0):  # also refuses NaN
            raise ValueError(f"dice: expected a number in [0, 1], got {self.dice!r}")

    @property
    def key(self) -> str:
        """The dataset's identity across sites: ``"site/dataset"``."""
        return f"{self.site}/{self.dataset}"


@dataclass(frozen=True)
class MeanDice:
    """Mean Dice over datasets at one generation, its standard error and the dataset count."""

    mean: float
    sem: float
    """Standard error of the mean (sample sd / sqrt(n)); NaN for a single dataset."""
    n: int


@dataclass(frozen=True)
class SlopeFit:
    """The fixed effect of generation on validation Dice, and how it was estimated."""

    slope: float
    """Dice per generation."""
    ci_low: float
    ci_high: float
    """The 95 % confidence interval of ``slope``."""
    p_value: float
    """Two-sided, against a slope of zero."""
    n_datasets: int
    n_generations: int
    method: str
    """A ``FitMethod`` value: the model actually fitted (see the module docstring)."""
    notes: tuple[str, ...] = ()
    """Why each model before ``method`` was rejected, in fallback order."""

    def format(self) -> str:
        """One line for reports, e.g. ``+0.0073 Dice/generation (95 % CI ...)``."""
        if math.isnan(self.slope):
            return (f"no slope ({self.method}; {self.n_datasets} datasets, "
                    f"{self.n_generations} generations)")
        ci = ("no CI" if math.isnan(self.ci_low)
              else f"95 % CI {self.ci_low:+.4f} to {self.ci_high:+.4f}")
        p = ("p n/a" if math.isnan(self.p_value)
             else "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}")
        return (f"{self.slope:+.4f} Dice/generation ({ci}, {p}; {self.method}, "
                f"{self.n_datasets} datasets, {self.n_generations} generations)")


def arms(records: Iterable[DiceRecord]) -> list[str]:
    """The arms in the order they first appear."""
    return list(dict.fromkeys(r.arm for r in records))


def mean_dice(records: Iterable[DiceRecord], *, arm: str,
              site: str | None = None) -> dict[int, MeanDice]:
    """Mean Dice over the datasets (of ``site``, or all) of ``arm``, per generation."""
    values: dict[int, list[float]] = {}
    for r in _select(records, arm=arm, site=site):
        values.setdefault(r.generation, []).append(r.dice)
    out = {}
    for generation in sorted(values):
        v = np.asarray(values[generation], dtype=float)
        sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        out[generation] = MeanDice(float(v.mean()), sem, int(v.size))
    return out


def table(records: Iterable[DiceRecord], *, digits: int = 3) -> str:
    """A Markdown table: one row per generation, mean Dice per site and overall, per arm.

    Columns come in one group per arm (in the order the arms first appear): each site
    (sorted), then ``mean``, the mean over all that arm's datasets (each dataset weighs the
    same, as in the slope fit). A generation an arm has no records for shows ``-``.
    """
    records = list(records)
    _check_unique(records)
    if not records:
        raise ValueError("records: nothing to tabulate")
    sites = sorted({r.site for r in records})
    generations = sorted({r.generation for r in records})
    columns: list[tuple[str, dict[int, MeanDice]]] = []
    for arm in arms(records):
        arm_sites = {r.site for r in records if r.arm == arm}
        for site in sites:
            means = mean_dice(records, arm=arm, site=site) if site in arm_sites else {}
            columns.append((f"{arm} {site}", means))
        columns.append((f"{arm} mean", mean_dice(records, arm=arm)))
    lines = ["| generation | " + " | ".join(name for name, _ in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for g in generations:
        cells = [f"{means[g].mean:.{digits}f}" if g in means else "-" for _, means in columns]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_slope(records: Iterable[DiceRecord], *, arm: str, site: str | None = None) -> SlopeFit:
    """Dice per generation for ``arm`` (on ``site``'s datasets, or all), like Dafne's paper.

    Never raises for data that a small run produces; see the module docstring for the models
    tried in turn. Raises ``ValueError`` only when no record matches ``arm`` and ``site`` or
    when a (arm, generation, site, dataset) appears twice.
    """
    selected = _select(records, arm=arm, site=site)
    frame = pd.DataFrame({"dice": [r.dice for r in selected],
                          "generation": [float(r.generation) for r in selected],
                          "dataset": [r.key for r in selected]})
    n_datasets = int(frame["dataset"].nunique())
    n_generations = int(frame["generation"].nunique())
    notes: list[str] = []
    attempts = ((FitMethod.RANDOM_SLOPE, _fit_random_slope),
                (FitMethod.RANDOM_INTERCEPT, _fit_random_intercept),
                (FitMethod.OLS_CLUSTER, _fit_ols_cluster),
                (FitMethod.OLS, _fit_ols))
    for method, attempt in attempts:
        try:
            slope, ci, p = attempt(frame, n_datasets, n_generations)
        except _FitError as exc:
            notes.append(f"{method}: {exc}")
            continue
        except Exception as exc:  # statsmodels/numpy failures of any kind: try the next model
            notes.append(f"{method}: {type(exc).__name__}: {exc}")
            continue
        fit = SlopeFit(slope, ci[0], ci[1], p, n_datasets, n_generations, str(method),
                       tuple(notes))
        break
    else:
        slope = _lstsq_slope(frame) if n_generations >= 2 else math.nan
        fit = SlopeFit(slope, math.nan, math.nan, math.nan, n_datasets, n_generations,
                       str(FitMethod.NONE), tuple(notes))
    label = f"arm {arm!r}" + ("" if site is None else f", site {site!r}")
    if fit.notes:
        LOGGER.warning("%s: fitted with %s; %s", label, fit.method, "; ".join(fit.notes))
    LOGGER.info("%s: %s", label, fit.format())
    return fit


def per_site_fits(records: Iterable[DiceRecord], arm: str) -> dict[str, SlopeFit]:
    """``fit_slope`` for each site of ``arm`` (sorted by site) on that site's datasets only."""
    records = list(records)
    sites = sorted({r.site for r in records if r.arm == arm})
    if not sites:
        raise ValueError(f"arm: no records for {arm!r}")
    return {site: fit_slope(records, arm=arm, site=site) for site in sites}


class _FitError(Exception):
    """A model was fitted (or not attempted) but its result is not usable; the text says why."""


Estimate = tuple[float, tuple[float, float], float]
"""slope, (CI low, CI high), p-value."""


def _select(records: Iterable[DiceRecord], *, arm: str, site: str | None) -> list[DiceRecord]:
    records = list(records)
    _check_unique(records)
    out = [r for r in records if r.arm == arm and (site is None or r.site == site)]
    if not out:
        where = "" if site is None else f" at site {site!r}"
        raise ValueError(f"arm: no records for {arm!r}{where}")
    return out


def _check_unique(records: Sequence[DiceRecord]) -> None:
    seen: set[tuple[str, int, str]] = set()
    for r in records:
        key = (r.arm, r.generation, r.key)
        if key in seen:
            raise ValueError(f"records: two Dice values for arm {r.arm!r}, generation "
                             f"{r.generation}, dataset {r.key!r}")
        seen.add(key)


def _fit_random_slope(frame: pd.DataFrame, n_datasets: int, n_generations: int) -> Estimate:
    if n_generations < 3:
        raise _FitError(f"needs >= 3 generations, has {n_generations}")
    return _fit_mixed(frame, n_datasets, re_formula="~generation")


def _fit_random_intercept(frame: pd.DataFrame, n_datasets: int,
                          n_generations: int) -> Estimate:
    if n_generations < 2:
        raise _FitError(f"needs >= 2 generations, has {n_generations}")
    return _fit_mixed(frame, n_datasets, re_formula="1")


def _fit_mixed(frame: pd.DataFrame, n_datasets: int, *, re_formula: str) -> Estimate:
    if n_datasets < MIN_DATASETS_MIXED:
        raise _FitError(f"needs >= {MIN_DATASETS_MIXED} datasets, has {n_datasets}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MixedLM.from_formula("dice ~ generation", groups="dataset",
                                     re_formula=re_formula, data=frame)
        result = model.fit(reml=True)
    # Unique messages, less the optimiser's retry chatter and the absolute boundary test.
    messages = [m for m in dict.fromkeys(str(w.message) for w in caught)
                if not m.startswith(_IGNORED_WARNINGS)]
    if not result.converged:
        raise _FitError("did not converge: " + "; ".join(messages))
    for message in messages:
        if "not positive definite" in message or "covariance matrix is singular" in message:
            raise _FitError(message)
    relative = np.atleast_2d(np.asarray(result.cov_re_unscaled, dtype=float))
    if not np.all(np.isfinite(relative)):
        raise _FitError("random-effects covariance is not finite")
    try:
        factor = np.linalg.cholesky(relative)
    except np.linalg.LinAlgError:
        message = "random-effects covariance is singular (not positive definite)"
        raise _FitError(message) from None
    if np.min(np.abs(np.diag(factor))) < SINGULAR_TOL:
        diagonal = ", ".join(f"{d:.2g}" for d in np.diag(factor))
        raise _FitError("random-effects covariance is singular (a variance or a correlation "
                        f"at the boundary; relative Cholesky diagonal {diagonal})")
    ci = result.conf_int().loc["generation"]
    return _checked(float(result.fe_params["generation"]), float(result.bse_fe["generation"]),
                    (float(ci.iloc[0]), float(ci.iloc[1])), float(result.pvalues["generation"]))


def _design(frame: pd.DataFrame) -> np.ndarray:
    return sm.add_constant(frame["generation"].to_numpy(dtype=float), has_constant="add")


def _fit_ols_cluster(frame: pd.DataFrame, n_datasets: int, n_generations: int) -> Estimate:
    if n_datasets < 2:
        raise _FitError(f"needs >= 2 datasets, has {n_datasets}")
    if n_generations < 2:
        raise _FitError(f"needs >= 2 generations, has {n_generations}")
    groups = pd.factorize(frame["dataset"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 on exact data: checked below
        result = sm.OLS(frame["dice"].to_numpy(dtype=float), _design(frame)).fit(
            cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
    return _ols_estimate(result)


def _fit_ols(frame: pd.DataFrame, n_datasets: int, n_generations: int) -> Estimate:
    if n_datasets != 1:
        raise _FitError(f"only for a single dataset, has {n_datasets}")
    if n_generations < 3:
        raise _FitError(f"needs >= 3 generations, has {n_generations}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = sm.OLS(frame["dice"].to_numpy(dtype=float), _design(frame)).fit()
    return _ols_estimate(result)


def _ols_estimate(result: sm.regression.linear_model.RegressionResults) -> Estimate:
    ci = np.asarray(result.conf_int())[1]
    return _checked(float(result.params[1]), float(result.bse[1]),
                    (float(ci[0]), float(ci[1])), float(result.pvalues[1]))


def _checked(slope: float, se: float, ci: tuple[float, float], p: float) -> Estimate:
    if not (math.isfinite(slope) and math.isfinite(se)):
        raise _FitError(f"no usable standard error (slope {slope:.4g}, SE {se:.3g})")
    if se < MIN_SE:
        raise _FitError(f"standard error {se:.3g}: the values lie exactly on lines of one slope")
    if not (all(math.isfinite(c) for c in ci) and math.isfinite(p)):
        raise _FitError(f"no usable CI or p-value (CI {ci}, p {p})")
    return slope, ci, p


def _lstsq_slope(frame: pd.DataFrame) -> float:
    x = frame["generation"].to_numpy(dtype=float)
    y = frame["dice"].to_numpy(dtype=float)
    return float(np.polyfit(x, y, 1)[0])


__all__ = ["DiceRecord", "FitMethod", "MeanDice", "SlopeFit", "arms", "fit_slope", "mean_dice",
           "per_site_fits", "table"]
