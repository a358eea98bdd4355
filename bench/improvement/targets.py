"""The run's targets, checked on its own results: what a reader of the report looks for.

Dafne's paper measured +0.0073 Dice per generation (p < 0.001) over 13 generations. The
multi-hospital run claims at least that, and more, for our arm:

* slope >= 0.007 Dice per generation over >= 10 generations, p < 0.001, with at least half
  of the generations promoted (a rise that is one jump does not count);
* final mean Dice >= 0.90 on every site;
* our arm's final mean Dice above the Dafne-rule arm's;
* no promoted generation lowers mean validation Dice by more than 0.01;
* with a poisoned hospital, final mean Dice within 0.01 of the clean run's.

:func:`check_targets` measures each one on the records and outcomes of a run (and, for the
last, on the clean run's records) and says whether it holds. A target that the run cannot
measure (the Dafne arm was not run, no clean run to compare with) is left out, not passed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.improvement.stats import DiceRecord, SlopeFit, mean_dice

__all__ = ["Target", "check_targets"]

MIN_SLOPE = 0.007
MAX_P = 0.001
MIN_GENERATIONS = 10
MIN_FINAL_DICE = 0.90
MAX_PROMOTED_DROP = 0.01
MAX_POISON_GAP = 0.01


@dataclass(frozen=True)
class Target:
    """One target: what it asks, what the run measured, and whether that meets it."""

    name: str
    required: str
    measured: str
    met: bool

    def format(self) -> str:
        """One line for the report."""
        return f"[{'met' if self.met else 'MISSED'}] {self.name}: {self.measured} " \
               f"(required {self.required})"


def _means(records: Sequence[DiceRecord], arm: str, site: str | None = None) -> dict[int, float]:
    return {g: m.mean for g, m in mean_dice(records, arm=arm, site=site).items()}


def check_targets(records: Sequence[DiceRecord], *, arm: str, fit: SlopeFit,
                  promoted: Sequence[bool], baseline_arm: str | None = None,
                  clean: Sequence[DiceRecord] | None = None) -> list[Target]:
    """The targets of ``arm``, measured on ``records`` (every arm of one run).

    Parameters
    ----------
    fit:
        ``arm``'s slope fit over all validation datasets.
    promoted:
        Whether each generation (1, 2, ...) of ``arm`` was promoted.
    baseline_arm:
        The arm to beat (Dafne's rule), if the run has it.
    clean:
        The records of the same run without the poisoned hospital, if this run had one.
    """
    means = _means(records, arm)
    last = max(means)
    generations = len(promoted)
    targets = [
        Target("slope per generation", f">= {MIN_SLOPE} Dice, p < {MAX_P}, >= "
               f"{MIN_GENERATIONS} generations", f"{fit.slope:+.4f} Dice, p = "
               f"{fit.p_value:.2g}, {generations} generations",
               fit.slope >= MIN_SLOPE and fit.p_value < MAX_P
               and generations >= MIN_GENERATIONS),
        Target("generations promoted", f">= half of {generations}",
               f"{sum(promoted)} of {generations}", 2 * sum(promoted) >= generations > 0),
    ]
    finals: Mapping[str, float] = {
        site: _means(records, arm, site)[last]
        for site in sorted({r.site for r in records if r.arm == arm})}
    targets.append(Target(
        "final mean Dice on every site", f">= {MIN_FINAL_DICE:.2f}",
        ", ".join(f"{site} {value:.3f}" for site, value in finals.items()),
        min(finals.values()) >= MIN_FINAL_DICE))
    if baseline_arm is not None and any(r.arm == baseline_arm for r in records):
        baseline = _means(records, baseline_arm)
        targets.append(Target(
            f"final mean Dice above the {baseline_arm} arm's", f"> {baseline[last]:.3f}",
            f"{means[last]:.3f}", means[last] > baseline[last]))
    drops = [(g, means[g - 1] - means[g]) for g, kept in enumerate(promoted, start=1)
             if kept and g in means and g - 1 in means]
    worst = max(drops, key=lambda d: d[1], default=(0, 0.0))
    targets.append(Target(
        "largest drop of mean Dice in a promoted generation", f"<= {MAX_PROMOTED_DROP}",
        f"{max(worst[1], 0.0):.3f} (generation {worst[0]})" if drops else "no promoted one",
        worst[1] <= MAX_PROMOTED_DROP))
    if clean is not None:
        clean_final = _means(clean, arm)[max(_means(clean, arm))]
        targets.append(Target(
            "final mean Dice with the poisoned hospital", f"within {MAX_POISON_GAP} of the "
            f"clean run's {clean_final:.3f}", f"{means[last]:.3f}",
            abs(means[last] - clean_final) <= MAX_POISON_GAP))
    return targets
