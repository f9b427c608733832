"""The cluster bootstrap of forgetting over seeds and examples, on counts whose intervals are known."""

import numpy as np
import pandas as pd
import pytest

from analysis.intervals import cluster_interval
from analysis.tables import pooled_intervals, seed_summary


def test_one_seed_is_the_example_bootstrap_of_the_flips():
    # d = +1 (30 of 100), -1 (10), 0 (60): mean 0.2, sd 0.6, so the mean's SE is 0.06: about 20 -+ 11.8 pp
    lo, hi = cluster_interval(np.array([[100, 30, 10]]), resamples=20000)["F"]
    assert lo == pytest.approx(20 - 11.8, abs=1.0) and hi == pytest.approx(20 + 11.8, abs=1.0)


def test_intervals_stay_where_forgetting_can_be_even_when_seeds_disagree():
    assert cluster_interval(np.array([[5, 5, 0]]))["F"] == (100.0, 100.0)  # every example forgotten, every draw
    # two seeds, one forgot everything and one nothing: resampled means 0, 50 or 100 pp (a t-interval: 50 -+ 635)
    lo, hi = cluster_interval(np.array([[50, 50, 0], [50, 0, 0]]), resamples=4000)["F"]
    assert (lo, hi) == (0.0, 100.0)


def test_biased_forgetting_of_a_group_like_the_rest_straddles_zero_and_of_a_group_apart_does_not():
    like = cluster_interval(np.array([[40, 8, 4]] * 3), np.array([[160, 32, 16]] * 3), resamples=4000)["BF"]
    assert like[0] < 0 < like[1]
    apart = cluster_interval(np.array([[40, 30, 0]] * 3), np.array([[160, 16, 16]] * 3), resamples=4000)["BF"]
    assert apart[0] > 40  # F_g = 30 / 40 = 75 pp, F = (30 + 16 - 16) / 200 = 15 pp: BF_g = 60 pp


def test_pooled_intervals_replace_the_t_interval_where_every_seed_has_its_flips():
    def rows(seed, forgotten):
        return [
            {
                "condition": "c",
                "task": "t",
                "seed": seed,
                "group_kind": "all",
                "group": "all",
                "n": 100,
                "forgotten": forgotten,
                "learned": 10.0,
            },
            {
                "condition": "c",
                "task": "t",
                "seed": seed,
                "group_kind": "g",
                "group": "x",
                "n": 20,
                "forgotten": forgotten,
                "learned": 10.0,
            },
        ]

    flips = pd.DataFrame(rows(0, 30.0) + rows(1, 50.0))
    forgetting = flips.assign(
        F=flips["forgotten"] - flips["learned"],
        BF=0.0,
        F_lo=None,
        F_hi=None,
        BF_lo=None,
        BF_hi=None,
        run_name="r" + flips["seed"].astype(str),
    )
    summary = seed_summary(forgetting)
    pooled = pooled_intervals(summary, flips).set_index("group")
    assert (pooled["interval"] == "cluster bootstrap").all()
    assert 0 <= pooled.loc["all", "F_lo"] < 30 and 40 < pooled.loc["all", "F_hi"] <= 100  # F: 20 and 40 pp
    assert summary.set_index("group").loc["all", "F_lo"] < -50  # the t-interval over two seeds: 30 -+ 127
    assert pd.isna(pooled.loc["all", "BF_lo"]) and pooled.loc["x", "BF_lo"] < 0 < pooled.loc["x", "BF_hi"]
    untouched = pooled_intervals(summary, flips[flips["seed"] == 0])  # seed 1 has no flips: t-interval kept
    assert (untouched["interval"] == "t over seeds").all() and untouched["F_lo"].equals(summary["F_lo"])
    # a third seed whose eval split lacks group x: the task's row pools three seeds, the group's its own two
    third = pd.DataFrame(rows(2, 40.0)[:1])
    flips3 = pd.concat([flips, third], ignore_index=True)
    forgetting3 = pd.concat([forgetting, third.assign(F=30.0, BF=0.0, run_name="r2")], ignore_index=True)
    summary3 = seed_summary(forgetting3).set_index("group")
    assert summary3.loc["all", "seeds"] == 3 and summary3.loc["x", "seeds"] == 2
    pooled3 = pooled_intervals(summary3.reset_index(), flips3).set_index("group")
    assert (pooled3["interval"] == "cluster bootstrap").all()
    assert pooled3.loc["x", "F_lo"] >= 0 and pooled3.loc["x", "F_hi"] <= 100  # not the t-interval's -100..+100
