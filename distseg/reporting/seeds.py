"""The spread of a stage's best score over seeds, and whether two stages differ by more than it.

A study's conclusion ("fine-tuning beats training from scratch") is only as good as its margin over the
seed-to-seed noise. Each compared stage gets the mean and the sample standard deviation (n - 1) of its seeds'
best scores, and every later compared stage is tested against the first with Welch's t-test (unequal
variances; scipy.stats.ttest_ind), its statistic, degrees of freedom and two-sided p-value stated with the
verdict in words, so a reader can check it from the per-seed scores the same table prints.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from distseg.errors import UserError
from distseg.inference.metrics import percent

ALPHA = 0.05  # the verdict's significance level (two-sided)


@dataclass(frozen=True)
class Spread:
    """One stage's best scores over seeds."""

    scores: dict[int, float]  # seed -> best score (a fraction)

    @property
    def n(self) -> int:
        """How many seeds finished."""
        return len(self.scores)

    @property
    def mean(self) -> float:
        """The mean of the seeds' best scores."""
        return statistics.fmean(self.scores.values())

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1); None with fewer than two seeds."""
        return statistics.stdev(self.scores.values()) if self.n >= 2 else None

    def text(self) -> str:
        """`41.23 ± 1.05%` (in points of the score), or the mean alone for one seed."""
        if self.std is None:
            return percent(self.mean, unit="%")
        return f"{percent(self.mean)} ± {percent(self.std, unit='%')}"

    def record(self) -> dict:
        """The JSON form: fractions, as every distseg JSON keeps scores."""
        return {"n": self.n, "mean": self.mean, "std": self.std,
                "scores": {str(s): v for s, v in self.scores.items()}}


@dataclass(frozen=True)
class Verdict:
    """Stage b against stage a: the difference of their means and Welch's test of it."""

    a: str
    b: str
    difference: float  # mean(b) - mean(a), a fraction
    t: float | None
    df: float | None
    p: float | None
    significant: bool | None  # None: not testable (fewer than two seeds, or no spread at all)
    text: str

    def record(self) -> dict:
        """The JSON form (fractions; None where not tested)."""
        return asdict(self)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t statistic of mean(b) - mean(a), its Welch-Satterthwaite degrees of freedom and the two-sided
    p-value (scipy.stats.ttest_ind with equal_var=False)."""
    try:
        from scipy import stats
    except ImportError:
        raise UserError("the seeds' t-test needs scipy: pip install 'distseg[report]'") from None
    res = stats.ttest_ind(b, a, equal_var=False)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(res.statistic), df, float(res.pvalue)


def verdict(a_name: str, a: Spread, b_name: str, b: Spread) -> Verdict:
    """Whether b's mean differs from a's by more than the seeds' spread, in words a reader can check."""
    diff = b.mean - a.mean
    head = (f"{b_name} vs {a_name}: difference of means {100 * diff:+.2f} points ({b.text()} vs {a.text()}, "
            f"{b.n} and {a.n} seeds)")
    if a.n < 2 or b.n < 2:
        return Verdict(a_name, b_name, diff, None, None, None, None,
                       f"{head}; not tested: the t-test needs at least 2 seeds per stage")
    if a.std == 0 and b.std == 0:
        return Verdict(a_name, b_name, diff, None, None, None, None,
                       f"{head}; not tested: every seed of each stage scored the same, there is no spread")
    t, df, p = welch(list(a.scores.values()), list(b.scores.values()))
    significant = p < ALPHA
    words = (f"significant at the {ALPHA:.0%} level: the difference exceeds the seeds' spread" if significant
             else f"not significant at the {ALPHA:.0%} level: the difference is within the seeds' spread")
    return Verdict(a_name, b_name, diff, t, df, p, significant,
                   f"{head}; Welch's t-test: t = {t:.2f}, df = {df:.1f}, p = {p:.3g} — {words}")


def finite(v: float | None) -> bool:
    """A score that counts toward a spread (a run with no validation has best_score -1 or NaN)."""
    return v is not None and not math.isnan(v) and v >= 0
