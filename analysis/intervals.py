"""Intervals for forgetting pooled over seeds and examples: a cluster bootstrap. Pure numpy, everything in pp.

A seed's forgetting of a group is the mean over its eval examples of ``d_i = 1`` (right at the trained stage, wrong
at the last: forgotten), ``-1`` (learned) or ``0``, so its counts of forgotten and learned examples (``metrics.
example_forgetting``) are all a resample needs. Each resample draws the seeds with replacement (the spread between
retrained runs), then each drawn seed's examples with replacement (the spread of a finite eval set): a multinomial
over its (forgotten, learned, unchanged) counts. The statistic is the mean over the drawn seeds, so the interval
pools both sources of noise and, being a mean of values in [-100, +100], never leaves the range F can take; BF_g =
F_g - F draws the group's examples and the task's other examples separately and takes the difference within each
seed. With one seed it is that run's example bootstrap.
"""

from __future__ import annotations

import numpy as np

from chainforget.metrics import PP


def draw_forgetting(counts: np.ndarray, picks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For seed indices ``picks`` (resamples x slots) into ``counts`` (seeds x 3: examples, forgotten, learned), one
    multinomial draw of each picked seed's examples: the drawn (forgotten - learned) and the examples, per slot."""
    n, forgotten, learned = (counts[picks, i] for i in range(3))
    shares = np.stack([forgotten, learned, n - forgotten - learned], axis=-1) / np.maximum(n, 1)[..., None]
    drawn = rng.multinomial(n.astype(np.int64), shares)
    return drawn[..., 0] - drawn[..., 1], n


def cluster_interval(
    group: np.ndarray, rest: np.ndarray | None = None, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals (pp) of F_g and, given ``rest``, of BF_g = F_g - F, by the cluster bootstrap.

    Args:
        group: per seed, the group's eval examples, forgotten and learned counts (seeds x 3).
        rest: per seed, the same counts for the task's other eval examples (its ``all`` row less the group's).
    """
    group = np.asarray(group, dtype=np.int64)
    rng = np.random.default_rng(seed)
    seeds = len(group)
    picks = rng.integers(0, seeds, size=(resamples, seeds))
    net, n = draw_forgetting(group, picks, rng)
    f_group = PP * net / np.maximum(n, 1)
    tail = (1 - level) / 2 * 100
    out = {"F": tuple(float(v) for v in np.percentile(f_group.mean(axis=1), [tail, 100 - tail]))}
    if rest is not None:
        net_rest, n_rest = draw_forgetting(np.asarray(rest, dtype=np.int64), picks, rng)
        f_all = PP * (net + net_rest) / np.maximum(n + n_rest, 1)
        out["BF"] = tuple(float(v) for v in np.percentile((f_group - f_all).mean(axis=1), [tail, 100 - tail]))
    return out
