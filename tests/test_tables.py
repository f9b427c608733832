"""Table functions of the analysis package on hand-built run records whose answers are worked out by hand."""

import math

import pytest

from analysis.runs import forgetting_frame
from analysis.tables import curvature_forgetting, mean_interval, order_asymmetry, replay_recovery, seed_summary

T_975_DF1 = 12.706204736  # Student t quantile, 1 degree of freedom


def record(order, seed, forgetting=None, acc=None, mitigation=None, curvature=None):
    """A run record with just the fields the tables read."""
    return {
        "run_name": f"{'-'.join(order)}-s{seed}-{(mitigation or {}).get('strength', '')}",
        "config": {"order": order, "seed": seed, "mitigation": mitigation or {"name": "none", "strength": 0.0}},
        "eval": [{"stage": k, "task": t, "group_kind": "all", "group": "all", "n": 10, "correct": 0, "acc": a}
                 for (k, t), a in (acc or {}).items()],  # fmt: skip
        "stages": [{"index": 1, "curvature": {"top_eigenvalue": curvature} if curvature is not None else None}],
        "metrics": {"forgetting": [{"task": order[0], "group_kind": "all", "group": "all", "n": 10, "F": f, "F_ci": None,
                                    "BF": None, "BF_ci": None, "small": False, "trained_stage": 1, "later_stage": 2}
                                   for f in ([forgetting] if forgetting is not None else [])]},  # fmt: skip
    }


def test_mean_interval_over_seeds():
    mean, lo, hi = mean_interval([10.0, 14.0])
    assert mean == 12.0 and lo == pytest.approx(12 - T_975_DF1 * 2) and hi == pytest.approx(12 + T_975_DF1 * 2)
    assert mean_interval([3.0]) == (3.0, None, None)


def test_seed_summary_averages_each_group_over_seeds():
    frame = forgetting_frame([record(["bbq", "csqa"], 0, 10.0), record(["bbq", "csqa"], 1, 14.0)])
    (row,) = seed_summary(frame).to_dict("records")
    assert (row["seeds"], row["F"]) == (2, 12.0) and row["F_hi"] == pytest.approx(12 + T_975_DF1 * 2)
    single = forgetting_frame([record(["bbq", "csqa"], 0, 10.0)]).assign(F_lo=4.0, F_hi=16.0)
    (row,) = seed_summary(single).to_dict("records")
    assert (row["F_lo"], row["F_hi"]) == (4.0, 16.0)  # one run keeps its bootstrap interval


def test_order_asymmetry_pairs_seeds_and_tests_the_difference():
    records = [record(["bbq", "csqa"], 0, 10.0), record(["bbq", "csqa"], 1, 14.0),
               record(["csqa", "bbq"], 0, 2.0), record(["csqa", "bbq"], 1, 4.0),
               record(["csqa", "bbq"], 2, 9.0)]  # seed 2 has no partner run: left out  # fmt: skip
    (row,) = order_asymmetry(records).to_dict("records")
    assert (row["safety"], row["capability"], row["seeds"]) == ("bbq", "csqa", 2)
    assert (row["F_safety (S→C)"], row["F_capability (C→S)"], row["asymmetry"]) == (12.0, 3.0, 9.0)
    # differences 8 and 10: paired t = 9 / (sqrt(2) / sqrt(2)) = 9 with 1 df; two-sided p = 1 - 2 atan(9) / pi
    assert row["p_paired_t"] == pytest.approx(1 - 2 * math.atan(9) / math.pi)
    assert row["asymmetry_lo"] == pytest.approx(9 - T_975_DF1)


def test_replay_recovery_by_ratio():
    acc = {(1, "bbq"): 0.6, (2, "bbq"): 0.4, (3, "bbq"): 0.5, (2, "csqa"): 0.30, (3, "csqa"): 0.28}
    runs = [record(["bbq", "csqa"], 0, acc=acc, mitigation={"name": "replay_stage", "strength": 0.05}),
            record(["bbq", "csqa"], 0, acc={**acc, (3, "bbq"): 0.4}, mitigation={"name": "replay_stage", "strength": 0.0})]  # fmt: skip
    table = replay_recovery(runs).set_index("ratio")
    assert set(table["order"]) == {"bbq → csqa"}  # chains are kept apart
    assert table.loc[0.05, "safety_lost_pp"] == pytest.approx(20.0)
    assert table.loc[0.05, "safety_recovered_pp"] == pytest.approx(10.0)
    assert table.loc[0.05, "capability_change_pp"] == pytest.approx(-2.0)
    assert table.loc[0.0, "safety_recovered_pp"] == pytest.approx(0.0)


def test_curvature_forgetting_spearman_by_hand():
    runs = [record(["bbq", "csqa"], s, forgetting=f, curvature=c) for s, (c, f) in enumerate([(1, 5), (2, 6), (3, 8), (4, 7)])]
    frame, correlation = curvature_forgetting(runs)
    assert list(frame["top_eigenvalue"]) == [1, 2, 3, 4]
    assert correlation["spearman"] == pytest.approx(0.8) and correlation["n"] == 4  # 1 - 6 * 2 / (4 * 15)
    assert correlation["lo"] <= 0.8 <= correlation["hi"]
    assert curvature_forgetting(runs[:2])[1]["spearman"] is None  # too few runs for a correlation
