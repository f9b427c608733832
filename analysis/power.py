"""Power before data: the minimum detectable effect (MDE) of forgetting F, biased forgetting BF_g = F_g - F and the
order asymmetry, and the seeds or eval examples an MDE needs. Pure functions (numpy/scipy), everything in pp.

The MDE is the smallest true effect that a two-sided test of "no effect" at level ``alpha`` detects with probability
``power`` (80 % at alpha = 0.05 here):

- when the spread comes from k >= 2 seeds (sample sd s of the per-seed values): SE = s / sqrt(k) and the test is
  the one-sample t-test over seeds (for the asymmetry the paired t-test of ``analysis.tables.order_asymmetry``,
  whose per-seed values are the paired differences); the MDE is the effect at which its exact power (noncentral t
  on k - 1 degrees of freedom, ``power_at``) is 80 %, a little above the textbook ``(t(1 - alpha/2) + t(power)) *
  SE``, which gives only 73 % power with 2 seeds and 77 % with 3;
- from one run the spread over seeds is unknown: SE is the sampling SE over the run's eval examples and
  ``MDE = (z(1 - alpha/2) + z(power)) * SE`` (hundreds of examples: the normal test). It leaves out how much a
  retrained run would differ, so from the run's own flips it understates the MDE of an effect that should hold
  across seeds.
"""

from __future__ import annotations

import math

from scipy import optimize, stats

ALPHA, POWER = 0.05, 0.8
SEEDS, EXAMPLES, BOUND = "seeds", "examples", "binomial bound"  # where an SE comes from


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _quantile(p: float, df):
    return stats.norm.ppf(p) if df is None else stats.t.ppf(p, df)


def mde(se: float, df: float | None = None, alpha: float = ALPHA, power: float = POWER) -> float:
    """The effect with ``power_at(effect, se, df) = power`` (noncentral t on ``df`` degrees of freedom); with ``df``
    None the normal ``(z(1 - alpha/2) + z(power)) * se`` (exact but for the far tail, under 1e-5 of power)."""
    textbook = (_quantile(1 - alpha / 2, df) + _quantile(power, df)) * se
    if df is None or se == 0:
        return float(textbook)
    # the textbook value falls short of the power asked for (on few df), and four times it exceeds it on any df >= 1
    return float(optimize.brentq(lambda effect: power_at(effect, se, df, alpha) - power, textbook / 2, 4 * textbook))


def power_at(effect: float, se: float, df=None, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided test at a true ``effect``: ``P(|T| > q(1 - alpha/2))`` with T noncentral t on
    ``df`` degrees of freedom and noncentrality ``effect / se`` (normal with mean ``effect / se`` when df is None)."""
    shift, critical = effect / se, _quantile(1 - alpha / 2, df)
    if df is None:
        return float(stats.norm.sf(critical - shift) + stats.norm.sf(critical + shift))
    # the lower tail as the upper tail of the mirrored law: scipy's nct.cdf far out in the tail returns NaN
    return float(stats.nct(df, shift).sf(critical) + stats.nct(df, -shift).sf(critical))


def example_sd(forgotten: float | None = None, learned: float | None = None) -> tuple[float, str]:
    """Per-example sd (pp) of ``d_i = correct_i(trained stage) - correct_i(last stage)``, and its source.

    d_i is 1 with probability f (the share ``forgotten``), -1 with l (``learned``) and 0 otherwise, so
    ``Var d = f + l - (f - l)^2``. Without per-example rows (records written before them) the binomial bound
    ``Var d <= 2 * 0.25``: two accuracies with p(1 - p) <= 1/4 each, whose answers are not negatively correlated
    between the stages (the same examples tend to stay easy or hard); anticorrelated answers could reach 1."""
    if _missing(forgotten) or _missing(learned):
        return 100.0 * math.sqrt(2 * 0.25), BOUND
    gone, gained = forgotten / 100.0, learned / 100.0
    return 100.0 * math.sqrt(gone + gained - (gone - gained) ** 2), EXAMPLES


def _mde(seeds: int, spread: float | None, sampling_se: float, source: str) -> tuple[float, str]:
    """From the spread over seeds where there are several (t, seeds - 1 df), else from one run's sampling SE."""
    if seeds >= 2 and not _missing(spread):
        return float(mde(spread / math.sqrt(seeds), seeds - 1)), SEEDS
    return float(mde(sampling_se)), source


def mde_forgetting(n: float, seeds: int = 1, spread=None, forgotten=None, learned=None) -> tuple[float, str]:
    """(a) MDE of F and the SE's source. k = ``seeds`` >= 2: ``SE = spread / sqrt(k)``, ``spread`` the sd of F over
    the seeds, t on k - 1 df. One run: the paired difference of two proportions on the same n examples,
    ``SE = sqrt((f + l - (f - l)^2) / n)`` (``example_sd``; f, l the run's ``forgotten``, ``learned`` shares),
    normal quantiles."""
    sd, source = example_sd(forgotten, learned)
    return _mde(seeds, spread, sd / math.sqrt(n), source)


def mde_biased_forgetting(
    group_n: float, n: float, seeds: int = 1, spread=None, forgotten=None, learned=None
) -> tuple[float, str]:
    """(b) MDE of ``BF_g = F_g - F`` for a group of ``group_n`` of the task's ``n`` eval examples. k >= 2 seeds:
    ``SE = spread / sqrt(k)``, ``spread`` the sd of BF_g over seeds, t on k - 1 df. One run: with w = n_g / n,
    ``F_g - F = (1 - w)(F_g - F_rest)`` over disjoint examples, so taking the task's per-example variance
    ``s^2 = f + l - (f - l)^2`` (``example_sd``) in and outside the group,
    ``Var = (1 - w)^2 s^2 (1/n_g + 1/(n - n_g)) = s^2 (1/n_g - 1/n)``; normal quantiles."""
    sd, source = example_sd(forgotten, learned)
    return _mde(seeds, spread, sd * math.sqrt(1 / group_n - 1 / n), source)


def mde_asymmetry(seeds: int = 1, spread=None, sides: tuple = ()) -> tuple[float, str]:
    """(c) MDE of the order asymmetry ``F_S(S→C) - F_C(C→S)``, paired by seed. k >= 2 paired seeds:
    ``SE = spread / sqrt(k)``, ``spread`` the sd of the per-seed differences, t on k - 1 df (the paired t-test).
    One pair of runs: ``sides`` = ``(n, forgotten, learned)`` of S in S→C and of C in C→S; the sides are two tasks'
    examples in two runs, with independent sampling errors, so ``SE = sqrt(SE_S^2 + SE_C^2)`` with each side's SE
    as in ``mde_forgetting``, normal quantiles."""
    variance, source = 0.0 if sides else math.nan, EXAMPLES
    for n, forgotten, learned in sides:
        sd, side_source = example_sd(forgotten, learned)
        variance, source = variance + sd**2 / n, BOUND if side_source == BOUND else source
    return _mde(seeds, spread, math.sqrt(variance), source)


def seeds_needed(spread: float, target: float, cap: int = 100) -> int | None:
    """The fewest seeds k (>= 2) whose MDE, ``mde(spread / sqrt(k), k - 1)``, is at most ``target``, taking
    ``spread`` (sd over seeds, of F or of the per-seed asymmetry) as known; None when more than ``cap``."""
    return next((k for k in range(2, cap + 1) if mde(spread / math.sqrt(k), k - 1) <= target), None)


def examples_needed(sd: float, target: float, cap: int = 100_000) -> int | None:
    """The fewest eval examples n with ``(z(1 - alpha/2) + z(power)) * sd / sqrt(n) <= target`` for one run, i.e.
    ``n = ceil(((z(1 - alpha/2) + z(power)) * sd / target)^2)``; ``sd`` per example (``example_sd``; for the
    asymmetry of two runs of n examples each, ``sqrt(sd_S^2 + sd_C^2)``). None when more than ``cap``."""
    n = max(1, math.ceil((mde(sd) / target) ** 2 - 1e-9))  # the tolerance keeps a float round-off from adding one
    return n if n <= cap else None
