"""Minimum detectable effects (analysis.power) on numbers worked out by hand, checked against simulated tests, and
the power table over hand-made run records."""

import math

import numpy as np
import pandas as pd
import pytest
from test_tables import record, with_example_forgetting

from analysis.power import (
    examples_needed,
    mde,
    mde_asymmetry,
    mde_biased_forgetting,
    mde_forgetting,
    power_at,
    seeds_needed,
)
from analysis.tables import power_table


def t1(p):  # Student t quantile on 1 degree of freedom (Cauchy)
    return math.tan(math.pi * (p - 0.5))


def t2(p):  # ... and on 2: (2p - 1) / sqrt(2p(1 - p))
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


Z = 1.959963985 + 0.841621234  # standard normal quantiles 0.975 and 0.8
T3 = t2(0.975) + t2(0.8)  # 4.30265 + 1.06066: three seeds
MDE_SD2_K3 = mde(2 / math.sqrt(3), 2)  # sd 2 over three seeds: 80 % power (first test), above T3 * 2 / sqrt(3)


def test_mde_uses_t_quantiles_on_seeds_and_normal_ones_otherwise():
    # the textbook (t(0.975) + t(0.8)) * se falls short of 80 % power with few seeds: 73 % on 1 df, 77 % on 2
    assert power_at(t1(0.975) + t1(0.8), 1.0, df=1) == pytest.approx(0.731, abs=1e-3)
    assert power_at(2 * T3, 2.0, df=2) == pytest.approx(0.766, abs=1e-3)
    for df in (1, 2, 19):  # the MDE is where the exact power is 80 %, a little above the textbook value
        assert power_at(mde(1.0, df=df), 1.0, df=df) == pytest.approx(0.8, abs=1e-9)
    assert t1(0.975) + t1(0.8) < mde(1.0, df=1) and 2 * T3 < mde(2.0, df=2)
    assert mde(1.0) == pytest.approx(Z) and mde(1.0, df=10**6) == pytest.approx(Z, rel=1e-5)
    assert mde(1.0, alpha=0.01, power=0.9) == pytest.approx(2.575829304 + 1.281551566)
    assert power_at(mde(1.0), 1.0) == pytest.approx(0.8, abs=1e-5)


def test_mde_of_forgetting_from_seeds_from_one_runs_examples_or_from_the_binomial_bound():
    # F over three seeds with sd 2: SE = 2 / sqrt(3), t on 2 df
    assert mde_forgetting(360, seeds=3, spread=2.0) == (pytest.approx(MDE_SD2_K3), "seeds")
    # one run of 400 examples, 12 % forgotten and 4 % learned: Var d = 0.16 - 0.08^2 = 0.1536
    assert mde_forgetting(400, forgotten=12.0, learned=4.0) == (
        pytest.approx(Z * 100 * math.sqrt(0.1536 / 400)),
        "examples",
    )
    # without the shares: sqrt(2 * 0.25 / 200) = 5 pp
    assert mde_forgetting(200) == (pytest.approx(Z * 5), "binomial bound")
    assert mde_forgetting(200, seeds=3, spread=float("nan"), forgotten=float("nan")) == (
        pytest.approx(Z * 5),
        "binomial bound",
    )


def test_mde_of_biased_forgetting_shrinks_with_the_group_size_and_is_zero_for_the_whole_task():
    # 100 of 400 examples, f = l = 10 %: SE^2 = 0.2 * (1/100 - 1/400) = 0.0015
    value, source = mde_biased_forgetting(100, 400, forgotten=10.0, learned=10.0)
    assert (value, source) == (pytest.approx(Z * 100 * math.sqrt(0.0015)), "examples")
    assert mde_biased_forgetting(400, 400, forgotten=10.0, learned=10.0)[0] == 0.0
    assert mde_biased_forgetting(25, 400)[0] > mde_biased_forgetting(100, 400)[0]
    assert mde_biased_forgetting(100, 400, seeds=3, spread=2.0) == (pytest.approx(MDE_SD2_K3), "seeds")


def test_the_sampling_se_of_bf_matches_a_simulation():
    rng = np.random.default_rng(0)
    d = rng.choice([1, -1, 0], p=[0.1, 0.1, 0.8], size=(4000, 400))
    bf = 100 * (d[:, :100].mean(axis=1) - d.mean(axis=1))  # a group of the first 100 examples
    assert bf.std() == pytest.approx(100 * math.sqrt(0.0015), rel=0.04)  # sd of an sd over 4000 draws: 1.1 %


def test_mde_of_the_order_asymmetry_paired_by_seed_or_from_one_pair_of_runs():
    assert mde_asymmetry(3, 2.0) == (pytest.approx(MDE_SD2_K3), "seeds")
    # one pair: the two runs' eval sets are independent, SE^2 = 0.1536 / 400 + 0.5 / 200 (in fractions)
    value, source = mde_asymmetry(1, None, [(400, 12.0, 4.0), (200, None, None)])
    assert (value, source) == (pytest.approx(Z * 100 * math.sqrt(0.1536 / 400 + 0.0025)), "binomial bound")
    assert mde_asymmetry(1, None, [(400, 12.0, 4.0), (400, 12.0, 4.0)])[1] == "examples"


def test_seeds_and_examples_needed_for_a_target_mde():
    # sd 2: 3 seeds give more than the textbook 6.19 pp; 4 give 4.16 pp by the textbook, under 5 pp exactly too
    assert seeds_needed(2.0, 5.0) == 4 and 3.182446 + 0.978472 < mde(2.0 / 2, df=3) <= 5.0 < mde(2 / math.sqrt(3), 2)
    assert seeds_needed(0.0, 5.0) == 2 and seeds_needed(100.0, 5.0, cap=10) is None
    # the binomial bound's sd sqrt(0.5) = 70.71 pp: n = (2.8016 * 70.71 / 5)^2 = 1569.8 -> 1570
    assert examples_needed(100 * math.sqrt(0.5), 5.0) == 1570
    assert mde_forgetting(1570)[0] <= 5.0 < mde_forgetting(1569)[0]
    assert examples_needed(100 * math.sqrt(0.5), 0.1, cap=10_000) is None


def t_test_power(draws: np.ndarray, critical: float) -> float:
    """Share of rows of ``draws`` whose one-sample t statistic against 0 exceeds ``critical`` in absolute value."""
    t = draws.mean(axis=1) / (draws.std(axis=1, ddof=1) / math.sqrt(draws.shape[1]))
    return float((np.abs(t) > critical).mean())


@pytest.mark.parametrize("seeds", [3, 20])
def test_at_the_mde_the_t_test_over_seeds_has_the_stated_power(seeds):
    from scipy import stats

    rng = np.random.default_rng(seeds)
    effect = mde(2.0 / math.sqrt(seeds), seeds - 1)
    power = t_test_power(rng.normal(effect, 2.0, size=(20_000, seeds)), stats.t.ppf(0.975, seeds - 1))
    expected = power_at(effect, 2.0 / math.sqrt(seeds), seeds - 1)
    assert power == pytest.approx(expected, abs=4 * math.sqrt(0.8 * 0.2 / 20_000))  # four Monte Carlo SEs
    assert expected == pytest.approx(0.8, abs=1e-9)


def test_at_the_mde_of_one_run_the_paired_test_over_its_examples_has_80_percent_power():
    # shares whose own MDE equals their F: x = f - l with x = Z * sqrt((s - x^2) / n), s = f + l
    n, s = 400, 0.2
    x = Z * math.sqrt(s / (n + Z**2))
    forgotten, learned = (s + x) / 2, (s - x) / 2
    assert mde_forgetting(n, forgotten=100 * forgotten, learned=100 * learned)[0] == pytest.approx(100 * x)
    d = np.random.default_rng(1).choice([1, -1, 0], p=[forgotten, learned, 1 - s], size=(10_000, n))
    assert t_test_power(d, 1.959963985) == pytest.approx(0.8, abs=4 * math.sqrt(0.8 * 0.2 / 10_000))


def chain(order, seed, forgetting, n=400, groups=()):
    """``record`` with F of the first task over ``n`` eval examples and group rows ``(kind, group, n, BF)``."""
    run = record(order, seed, forgetting)
    (whole,) = run["metrics"]["forgetting"]
    whole["n"] = n
    run["metrics"]["forgetting"] += [
        whole | {"group_kind": kind, "group": group, "n": size, "F": forgetting + bf, "BF": bf, "small": size < 20}
        for kind, group, size, bf in groups
    ]
    return run


def test_power_table_over_three_seeds():
    per_seed = [(0, 1.0, 0.0, 0.0, 50.0), (1, 3.0, 2.0, 4.0, -50.0), (2, 5.0, 4.0, 8.0, 0.0)]  # seed, F, BF of a, b, c
    groups = [("category", "a", 100), ("category", "b", 60), ("category", "c", 5)]
    records = [
        chain(["bbq", "csqa"], seed, f, groups=[(*group, bf) for group, bf in zip(groups, bfs)])
        for seed, f, *bfs in per_seed
    ] + [chain(["csqa", "bbq"], seed, -7.0, n=200) for seed in range(3)]
    table = power_table(records).set_index("task")
    bbq, csqa = table.loc["bbq"], table.loc["csqa"]
    assert (bbq["condition"], bbq["seeds"], bbq["n"], bbq["F"], bbq["F_sd"]) == ("bbq → csqa", 3, 400, 3.0, 2.0)
    assert (bbq["se_source"], bbq["mde_F"]) == ("seeds", pytest.approx(MDE_SD2_K3))
    assert csqa["mde_F"] == 0.0  # seeds that agree
    # asymmetry 8, 10, 12 pp: sd 2, shown on both tasks' rows; 4 seeds would bring its MDE under 5 pp
    for row in (bbq, csqa):
        assert (row["asymmetry_seeds"], row["asymmetry_sd"], row["asymmetry_se_source"]) == (3, 2.0, "seeds")
        assert (row["mde_asymmetry"], row["seeds_for_asymmetry_mde_5pp"]) == (pytest.approx(MDE_SD2_K3), 4)
    # groups a (100 examples, sd 2) and b (60, sd 4); c is too small to count: median size 80, median sd 3
    assert bbq["n_group (category)"] == 80  # and sd 3 over 3 seeds:
    assert bbq["mde_BF (category)"] == pytest.approx(mde(3 / math.sqrt(3), 2))
    assert list(table.columns[-2:]) == ["n_group (category)", "mde_BF (category)"]
    spread_out = [chain(["csqa", "bbq"], seed, -30.0 * seed) for seed in range(3)]  # asymmetry 1, 33, 65: sd 32
    hard = power_table(records[:3] + spread_out).set_index("task")
    assert hard.loc["bbq", "seeds_for_asymmetry_mde_5pp"] == "beyond 100"  # about 324 seeds


def test_power_table_of_single_runs_uses_their_examples_and_says_so():
    shares = with_example_forgetting(
        chain(["bbq", "csqa"], 0, 8.0, groups=[("category", "a", 100, 1.0)]), [("all", "all", 12.0, 4.0)]
    )
    records = [shares, chain(["csqa", "bbq"], 0, 2.0, n=200)]  # a record without per-example forgetting
    table = power_table(records).set_index("task")
    bbq, csqa = table.loc["bbq"], table.loc["csqa"]
    assert (bbq["seeds"], bbq["se_source"]) == (1, "examples") and pd.isna(bbq["F_sd"])
    assert bbq["mde_F"] == pytest.approx(Z * 100 * math.sqrt(0.1536 / 400))
    # BF of a group of 100 among 400: SE^2 = 0.1536 * (1/100 - 1/400)
    assert bbq["mde_BF (category)"] == pytest.approx(Z * 100 * math.sqrt(0.1536 * 0.0075))
    assert (csqa["se_source"], csqa["mde_F"]) == ("binomial bound", pytest.approx(Z * 5))
    assert csqa["asymmetry_se_source"] == "binomial bound" and pd.isna(csqa["seeds_for_asymmetry_mde_5pp"])
    assert csqa["mde_asymmetry"] == pytest.approx(Z * 100 * math.sqrt(0.1536 / 400 + 0.0025))
    alone = power_table(records[:1])  # one order only: no asymmetry
    assert alone[["asymmetry_seeds", "mde_asymmetry"]].isna().all(axis=None)
