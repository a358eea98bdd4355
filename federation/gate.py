"""The validation gate: score a candidate generation and decide whether to promote it.

:func:`score_state` runs a set of weights over the server's validation set
(:mod:`federation.validation`) and gives the mean Dice overall and per site; a
:class:`Gate` compares the candidate's :class:`Scores` with the current generation's and
returns a :class:`GateDecision` whose reason names the figures, so that the generation's
row records why it was promoted or rejected.

Two gates:

* :class:`RelativeGate` (the default) - the rule of the design: the candidate may not lose
  more than a small epsilon of mean Dice, and no site may lose more than a (larger)
  epsilon. The per-site check is what makes the gate federated: an aggregate that helps
  three hospitals at the cost of the fourth can keep the mean and still be wrong for a
  quarter of the patients.
* :class:`AbsoluteGate` - the original Dafne server's rule, for comparison.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from dafne_node.model.architectures import build_model
from dafne_node.model.infer import Segmenter
from dafne_node.model.manifest import ModelManifest
from dafne_node.model.metrics import json_safe
from dafne_node.model.train import evaluate
from federation.validation import ValidationCase

LOGGER = logging.getLogger(__name__)

__all__ = [
    "GATES",
    "AbsoluteGate",
    "Gate",
    "GateDecision",
    "RelativeGate",
    "Scores",
    "make_gate",
    "score_state",
]

# A drop equal to the allowance passes even when float subtraction overshoots it
# (0.812 - 0.802 = 0.010000000000000009).
_TOLERANCE = 1e-9


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _number(value: Any, where: str) -> float:
    """A JSON number (or null for NaN) as float; ValueError naming ``where`` otherwise."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"scores: {where} must be a number or null, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Scores:
    """Mean Dice on the validation set, overall and per site (NaN: nothing scored)."""

    mean: float
    sites: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """``{"mean": .., "sites": {"A": .., ..}}`` as strict JSON takes it (NaN -> null)."""
        return json_safe({"mean": self.mean, "sites": dict(sorted(self.sites.items()))})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scores:
        """Read what :meth:`to_json` wrote (a generation's ``validation`` column).

        Raises
        ------
        ValueError
            If a key is missing or a value is not a number.
        """
        if not isinstance(data, Mapping) or "mean" not in data or "sites" not in data:
            raise ValueError(f"scores must be an object with 'mean' and 'sites', got {data!r}")
        sites = data["sites"]
        if not isinstance(sites, Mapping):
            raise ValueError(f"scores: 'sites' must be an object, got {sites!r}")
        return cls(mean=_number(data["mean"], "'mean'"),
                   sites={str(site): _number(value, f"site {site!r}")
                          for site, value in sites.items()})


def score_state(
    manifest: ModelManifest,
    state: Mapping[str, Tensor],
    cases: Sequence[ValidationCase],
    *,
    threads: int | None = None,
) -> Scores:
    """Mean Dice of the weights ``state`` on the validation ``cases``.

    The network is built from the manifest's architecture and runs in fp32, whatever the
    CPU: bf16 moves a few boundary voxels, and two scores that decide a promotion must
    differ only because the weights differ. Each case scores the mean Dice over the
    manifest's labels; a site scores the mean over its cases, and the overall mean is over
    all cases (a site with more cases weighs more). Cases with no label in prediction or
    truth (NaN) are left out of the means.

    Parameters
    ----------
    manifest:
        The generation's manifest (architecture, preprocessing, labels).
    state:
        A state dict that fits the architecture exactly.
    cases:
        The validation set, see :func:`federation.validation.load_validation_set`.
    threads:
        Torch threads (process-wide); default: every core this process may use.

    Raises
    ------
    ValueError
        If there are no cases or the state does not fit the architecture.
    """
    if not cases:
        raise ValueError("cannot score on an empty validation set")
    spec = manifest.architecture
    model = build_model(spec.id, spec.params)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights do not fit architecture {spec.id!r}: {exc}") from None
    model.eval()
    segmenter = Segmenter(model, manifest.preprocessing.to_config(), manifest=manifest,
                          precision="fp32", num_threads=threads)
    labels = manifest.to_labels()
    per_site: dict[str, list[float]] = {}
    every: list[float] = []
    for case in cases:
        dice = evaluate(segmenter, [case.example], labels).mean_dice
        LOGGER.debug("validation case %s (site %s): Dice %.4f", case.name, case.site, dice)
        per_site.setdefault(case.site, []).append(dice)
        every.append(dice)
    scores = Scores(mean=_finite_mean(every),
                    sites={site: _finite_mean(values) for site, values in sorted(per_site.items())})
    LOGGER.info("scored %r on %d validation cases: mean Dice %.4f (%s)", manifest.name,
                len(cases), scores.mean,
                ", ".join(f"{site} {value:.4f}" for site, value in scores.sites.items()))
    return scores


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote the candidate, and why (recorded with the generation)."""

    promote: bool
    reason: str


class Gate(ABC):
    """Decides on a candidate generation from its scores and the current generation's."""

    @abstractmethod
    def decide(self, current: Scores, candidate: Scores) -> GateDecision:
        """Promote or reject ``candidate``; the reason names the figures compared."""


def _digits(*values: float) -> int:
    """Decimals (3 to 6) that tell the given values apart, so no message reads 0.010 > 0.010."""
    for digits in range(3, 7):
        if len({f"{v:.{digits}f}" for v in values}) == len(set(values)):
            return digits
    return 6


def _change(what: str, before: float, after: float, allowed: float) -> tuple[bool, str]:
    """Whether the drop from ``before`` to ``after`` is within ``allowed``, and the words."""
    delta = after - before
    ok = -delta <= allowed + _TOLERANCE
    d = _digits(-delta, allowed) if not ok else 3
    verdict = "within" if ok else ">"
    return ok, (f"{what} {before:.{d}f} -> {after:.{d}f} ({delta:+.{d}f} {verdict} "
                f"{allowed:.{d}f} allowed)")


def _check_allowance(name: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class RelativeGate(Gate):
    """Promote unless the mean Dice, or any site's, drops by more than its allowance.

    Parameters
    ----------
    max_mean_drop:
        The largest loss of overall mean Dice accepted (the design's epsilon).
    max_site_drop:
        The largest loss of any one site's mean Dice accepted. Larger than the overall
        one, because a site has fewer cases and so noisier scores.
    """

    def __init__(self, *, max_mean_drop: float = 0.01, max_site_drop: float = 0.03) -> None:
        self.max_mean_drop = _check_allowance("max_mean_drop", max_mean_drop)
        self.max_site_drop = _check_allowance("max_site_drop", max_site_drop)

    def __repr__(self) -> str:
        """The rule, for logs."""
        return (f"RelativeGate(max_mean_drop={self.max_mean_drop}, "
                f"max_site_drop={self.max_site_drop})")

    def decide(self, current: Scores, candidate: Scores) -> GateDecision:
        """Compare the overall mean and every site; all failures are named in the reason."""
        problems: list[str] = []
        if not math.isfinite(candidate.mean):
            problems.append("candidate mean Dice is not a number (no label was scored)")
        if not math.isfinite(current.mean):
            problems.append("current mean Dice is not a number; nothing to compare with")
        for site in sorted(set(current.sites) - set(candidate.sites)):
            problems.append(f"site {site} has a current score but no candidate score")
        for site in sorted(set(candidate.sites) - set(current.sites)):
            problems.append(f"site {site} has a candidate score but no current score "
                            "(the validation set changed)")
        if problems:
            return self._decision(False, problems)

        ok, mean_words = _change("mean Dice", current.mean, candidate.mean, self.max_mean_drop)
        if not ok:
            problems.append(mean_words)
        worst: tuple[float, str] | None = None
        for site in sorted(current.sites):
            before, after = current.sites[site], candidate.sites[site]
            if not (math.isfinite(before) and math.isfinite(after)):
                problems.append(f"site {site} Dice {before:.3f} -> {after:.3f} is not a number")
                continue
            site_ok, words = _change(f"site {site} Dice", before, after, self.max_site_drop)
            if not site_ok:
                problems.append(words)
            elif worst is None or after - before < worst[0]:
                worst = (after - before, words)
        if problems:
            return self._decision(False, problems)
        words = [mean_words] + ([f"worst {worst[1]}"] if worst is not None else [])
        return self._decision(True, words)

    @staticmethod
    def _decision(promote: bool, parts: Sequence[str]) -> GateDecision:
        reason = "; ".join(parts)
        LOGGER.info("gate: %s - %s", "promote" if promote else "reject", reason)
        return GateDecision(promote=promote, reason=reason)


class AbsoluteGate(Gate):
    """Promote if the candidate's mean Dice reaches ``min_dice``: the original Dafne rule.

    The Dafne federation server merges an upload into the model and keeps the result if
    its Dice on the test data is not below ``dice_threshold``, which its configuration
    sets to -0.001. A Dice is never negative, so with that default this gate rejects
    nothing that was scored at all (only a NaN mean); it is here to reproduce Dafne's
    behaviour as a baseline for the relative gate, and a positive ``min_dice`` makes it a
    plain floor.
    """

    def __init__(self, *, min_dice: float = -0.001) -> None:
        if not math.isfinite(min_dice):
            raise ValueError(f"min_dice must be a finite number, got {min_dice!r}")
        self.min_dice = float(min_dice)

    def __repr__(self) -> str:
        """The rule, for logs."""
        return f"AbsoluteGate(min_dice={self.min_dice})"

    def decide(self, current: Scores, candidate: Scores) -> GateDecision:
        """Look at the candidate's mean only; ``current`` is ignored by design."""
        mean = candidate.mean
        if not math.isfinite(mean):
            decision = GateDecision(False, "candidate mean Dice is not a number "
                                           "(no label was scored)")
        elif mean >= self.min_dice:
            decision = GateDecision(True, f"mean Dice {mean:.3f} >= {self.min_dice:.3f} "
                                          "required")
        else:
            d = _digits(mean, self.min_dice)
            decision = GateDecision(False, f"mean Dice {mean:.{d}f} < {self.min_dice:.{d}f} "
                                           "required")
        LOGGER.info("gate: %s - %s", "promote" if decision.promote else "reject",
                    decision.reason)
        return decision


GATES: dict[str, type[Gate]] = {"relative": RelativeGate, "absolute": AbsoluteGate}


def make_gate(name: str, **options: float) -> Gate:
    """The gate called ``name`` ("relative" or "absolute") with its keyword options.

    Raises
    ------
    ValueError
        For an unknown name, an unknown option or an invalid value.
    """
    try:
        cls = GATES[name]
    except KeyError:
        raise ValueError(f"unknown gate {name!r}; choose one of "
                         f"{', '.join(sorted(GATES))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"gate {name!r}: {exc}") from None
