import numpy as np
import pandas as pd
import pytest

from chainforget import metrics

# Task "s", three groups: g1 and g2 with 4 eval examples each, g3 with 2 (below a minimum size of 3).
GROUPS = ["g1"] * 4 + ["g2"] * 4 + ["g3"] * 2
AFTER_TRAINING = [1, 1, 1, 1, 1, 1, 1, 0, 1, 1]  # acc 0.9; g1 1.0, g2 0.75, g3 1.0
AFTER_LATER = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]  # acc 0.4; g1 0.75, g2 0.25, g3 0.0


def predictions():
    frames = [
        pd.DataFrame({"stage": stage, "task": "s", "correct": correct, "category": GROUPS})
        for stage, correct in ((1, AFTER_TRAINING), (2, AFTER_LATER))
    ]
    return pd.concat(frames, ignore_index=True)


def test_eval_rows_count_and_accuracy_per_group():
    rows = pd.DataFrame(metrics.eval_rows(predictions(), {"s": ("category",)}))
    whole = rows[(rows.stage == 1) & (rows.group_kind == "all")].iloc[0]
    assert (whole.n, whole.correct, whole.acc) == (10, 9, pytest.approx(0.9))
    g2 = rows[(rows.stage == 2) & (rows.group == "g2")].iloc[0]
    assert (g2.group_kind, g2.n, g2.correct, g2.acc) == ("category", 4, 1, pytest.approx(0.25))
    assert len(rows) == 2 * (1 + 3)


def test_forgetting_and_biased_forgetting_by_hand():
    rows = metrics.eval_rows(predictions(), {"s": ("category",)})
    per_group = metrics.group_forgetting(rows, "s", trained=1, later=2).set_index("group")
    assert per_group.loc["all", "F"] == pytest.approx(50.0)
    assert per_group.loc["g1", "F"] == pytest.approx(25.0)
    assert per_group.loc["g2", "F"] == pytest.approx(50.0)
    assert per_group.loc["g3", "F"] == pytest.approx(100.0)
    assert per_group.loc["g1", "BF"] == pytest.approx(-25.0)
    assert per_group.loc["g3", "BF"] == pytest.approx(50.0)
    assert np.isnan(per_group.loc["all", "BF"])

    (summary,) = metrics.biased_forgetting(per_group.reset_index(), min_group_size=3)
    assert summary["worst_group"] == "g2" and summary["BF"] == pytest.approx(0.0)
    assert summary["spread"] == pytest.approx(25.0)
    assert summary["std"] == pytest.approx(12.5)
    assert summary["excluded"] == ["g3"] and summary["n_groups"] == 2

    (everyone,) = metrics.biased_forgetting(per_group.reset_index(), min_group_size=1)
    assert everyone["worst_group"] == "g3" and everyone["BF"] == pytest.approx(50.0)
    assert everyone["spread"] == pytest.approx(75.0)


def test_example_forgetting_counts_flips_and_their_chance_level_by_hand():
    # g1: three 2-option examples; g2: 3, 3 and 4 options. Stage 2 rows are shuffled: examples pair by id.
    ids, k = ["a", "b", "c", "d", "e", "f"], [2, 2, 2, 3, 3, 4]
    trained = pd.DataFrame({"stage": 1, "example_id": ids, "correct": [1, 1, 0, 1, 1, 0]})
    later = pd.DataFrame({"stage": 2, "example_id": ids, "correct": [0, 1, 1, 0, 0, 0]}).iloc[::-1]
    frame = pd.concat([trained, later]).assign(task="s")
    frame["category"] = frame["example_id"].map(dict(zip(ids, ["g1"] * 3 + ["g2"] * 3)))
    frame["option_logprobs"] = frame["example_id"].map(dict(zip(ids, [[0.0] * n for n in k])))
    other = frame.assign(task="t", correct=1 - frame["correct"])  # another task's rows are left alone
    rows = metrics.example_forgetting(pd.concat([frame, other]), "s", 1, 2, ("category",))
    rows = rows.set_index("group")
    assert rows["n"].to_dict() == {"all": 6, "g1": 3, "g2": 3}
    # g1: a forgotten, b kept, c learned; g2: d and e forgotten, f wrong at both stages
    assert rows.loc["g1", ["forgotten", "learned"]].tolist() == pytest.approx([100 / 3, 100 / 3])
    assert rows.loc["g2", ["forgotten", "learned"]].tolist() == pytest.approx([200 / 3, 0.0])
    assert rows.loc["all", ["forgotten", "learned"]].tolist() == pytest.approx([50.0, 100 / 6])
    # a uniform guesser flips a k-option example one way with probability (1/k)(1 - 1/k): 1/4, 2/9, 3/16
    chance = {"g1": 25.0, "g2": 100 * (2 / 9 + 2 / 9 + 3 / 16) / 3, "all": 100 * (3 / 4 + 4 / 9 + 3 / 16) / 6}
    assert rows["expected_flip"].to_dict() == pytest.approx(chance)
    assert rows.loc["g1", "forgotten_adj"] == pytest.approx(100 / 3 - 25.0)
    assert rows.loc["g2", "learned_adj"] == pytest.approx(-chance["g2"])
    # forgotten - learned is the accuracy drop F of the same examples
    per_group = metrics.group_forgetting(metrics.eval_rows(frame, {"s": ("category",)}), "s", 1, 2)
    net = (rows["forgotten"] - rows["learned"]).to_dict()
    assert net == pytest.approx(per_group.set_index("group")["F"].to_dict())


def test_forgetting_is_positive_when_accuracy_drops():
    assert metrics.forgetting(0.8, 0.5) == pytest.approx(30.0)
    assert metrics.forgetting(0.5, 0.8) == pytest.approx(-30.0)


def test_cl_matrix_metrics_by_hand():
    matrix = pd.DataFrame({"a": [0.2, 0.8, 0.5], "b": [0.3, 0.4, 0.9]}, index=[0, 1, 2])
    cl = metrics.cl_metrics(matrix, {"a": 1, "b": 2})
    assert cl["average_accuracy"] == pytest.approx(70.0)
    assert cl["bwt"] == pytest.approx(-30.0)
    assert cl["fwt"] == pytest.approx(10.0)
    assert cl["forgetting"] == pytest.approx(30.0)
    single = metrics.cl_metrics(matrix.loc[[0, 1], ["a"]], {"a": 1})
    assert single["bwt"] is None and single["fwt"] is None and single["average_accuracy"] == pytest.approx(80.0)


def test_paired_bootstrap_contains_estimate_and_narrows_with_more_examples():
    trained, later = np.array(AFTER_TRAINING), np.array(AFTER_LATER)
    groups = {"category": np.array(GROUPS)}
    small = metrics.paired_bootstrap(trained, later, groups, resamples=2000, seed=0)
    lo, hi = small[("all", "all")]["F"]
    assert lo <= 50.0 <= hi
    g1_lo, g1_hi = small[("category", "g1")]["F"]
    assert g1_lo <= 25.0 <= g1_hi
    bf_lo, bf_hi = small[("category", "g1")]["BF"]
    assert bf_lo <= -25.0 <= bf_hi

    big = metrics.paired_bootstrap(
        np.tile(trained, 16), np.tile(later, 16), {"category": np.tile(GROUPS, 16)}, resamples=2000, seed=0
    )
    big_lo, big_hi = big[("all", "all")]["F"]
    assert big_lo <= 50.0 <= big_hi
    assert (big_hi - big_lo) < 0.5 * (hi - lo)  # 16x the examples: about a quarter of the width


def test_paired_bootstrap_of_identical_stages_is_zero():
    same = np.array(AFTER_TRAINING)
    result = metrics.paired_bootstrap(same, same, {"category": np.array(GROUPS)}, resamples=200, seed=1)
    assert result[("all", "all")]["F"] == (0.0, 0.0)
    assert result[("category", "g2")]["BF"] == (0.0, 0.0)


def bbq_rows(rows):
    """(category, context, polarity, target_index, unknown_index, label, pred) -> predictions table."""
    columns = ["category", "context", "polarity", "target_index", "unknown_index", "label", "pred"]
    return pd.DataFrame(rows, columns=columns)


def test_bbq_bias_scores_by_hand():
    table = bbq_rows(
        [
            # disambiguated: biased, not biased, biased (non-negative question, non-target answer), unknown (left out)
            ("X", "disambig", "neg", 0, 2, 0, 0),
            ("X", "disambig", "neg", 0, 2, 1, 1),
            ("X", "disambig", "nonneg", 0, 2, 1, 1),
            ("X", "disambig", "nonneg", 0, 2, 0, 2),
            # ambiguous (gold = unknown): biased, correct, not biased, biased
            ("X", "ambig", "neg", 0, 2, 2, 0),
            ("X", "ambig", "neg", 0, 2, 2, 2),
            ("X", "ambig", "nonneg", 0, 2, 2, 0),
            ("X", "ambig", "nonneg", 0, 2, 2, 1),
            # no target option: counted, left out
            ("X", "ambig", "neg", None, 2, 2, 0),
        ]
    )
    (row,) = metrics.bbq_bias_scores(table)
    assert row["s_dis"] == pytest.approx(100 * (2 * 2 / 3 - 1))  # 33.3
    assert row["acc_ambig"] == pytest.approx(0.25)
    assert row["s_amb"] == pytest.approx(100 * 0.75 * (2 * 2 / 3 - 1))  # 25.0
    assert (row["n_ambig"], row["n_disambig"], row["n_no_target"]) == (4, 4, 1)


def test_bbq_bias_scores_all_unknown_and_no_disambiguated_errors():
    all_unknown = bbq_rows(
        [
            ("Y", "ambig", "neg", 1, 0, 0, 0),
            ("Y", "ambig", "nonneg", 1, 0, 0, 0),
            ("Y", "disambig", "neg", 1, 0, 1, 0),
            ("Y", "disambig", "nonneg", 1, 0, 2, 0),
        ]
    )
    (row,) = metrics.bbq_bias_scores(all_unknown)
    assert row["acc_ambig"] == 1.0 and row["s_amb"] == 0.0 and row["s_dis"] == 0.0

    # Every disambiguated answer right: gold is the target for half of them, whatever the polarity, so
    # exactly half the answers are "biased" and s_DIS = 0; ambiguous all correct gives s_AMB = 0.
    no_errors = bbq_rows(
        [
            ("Z", "disambig", "neg", 0, 2, 0, 0),
            ("Z", "disambig", "neg", 0, 2, 1, 1),
            ("Z", "disambig", "nonneg", 0, 2, 0, 0),
            ("Z", "disambig", "nonneg", 0, 2, 1, 1),
            ("Z", "ambig", "neg", 0, 2, 2, 2),
        ]
    )
    (row,) = metrics.bbq_bias_scores(no_errors)
    assert row["s_dis"] == pytest.approx(0.0) and row["s_amb"] == pytest.approx(0.0)

    # Always picking the stereotyped target: negative questions biased, non-negative not -> s_DIS = 0;
    # always picking the other group flips both; answering by stereotype (neg -> target, nonneg -> other) is +100.
    stereotyped = bbq_rows([("S", "disambig", "neg", 0, 2, 1, 0), ("S", "disambig", "nonneg", 0, 2, 0, 1)])
    assert metrics.bbq_bias_scores(stereotyped)[0]["s_dis"] == pytest.approx(100.0)


def test_toxicity_by_group_balanced_accuracy_by_hand():
    table = pd.DataFrame(
        {
            "target": ["a"] * 4 + ["b"] * 2,
            "label": [0, 0, 0, 1, 1, 1],  # 0 = toxic
            "pred": [0, 0, 1, 1, 0, 1],
        }
    )
    a, b = metrics.toxicity_by_group(table)
    assert (a["group"], a["n_toxic"], a["n_benign"]) == ("a", 3, 1)
    assert a["acc"] == pytest.approx(0.75)
    assert a["balanced_acc"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert b["balanced_acc"] == pytest.approx(0.5) and b["n_toxic"] == 0  # only benign statements: their recall


def test_learning_judges_a_shortcut_by_what_it_lost_and_balanced_accuracy_by_hand():
    # BBQ-like: 4 ambiguous questions (answer 2 = "unknown") and 4 disambiguated ones (answers 0 and 1)
    labels = [2, 2, 2, 2, 0, 1, 0, 1]
    contexts = ["ambig"] * 4 + ["disambig"] * 4
    base = [0, 2, 1, 0, 0, 0, 1, 1]  # ambig 1/4, disambig 2/4
    shortcut = [2] * 8  # "unknown" everywhere: ambig 4/4, disambig 0/4
    honest = [2, 2, 2, 0, 0, 1, 0, 0]  # ambig 3/4, disambig 3/4
    frame = pd.DataFrame(
        [
            {"task": task, "stage": stage, "label": y, "pred": p, "context": c}
            for task, stage, preds in (
                ("shortcut", 0, base),
                ("shortcut", 1, shortcut),
                ("honest", 0, base),
                ("honest", 2, honest),
            )
            for y, p, c in zip(labels, preds, contexts)
        ]
    )
    rows = {row["task"]: row for row in metrics.learning(frame, {"shortcut": 1, "honest": 2})}
    cut, fair = rows["shortcut"], rows["honest"]
    # base recalls: answer 0 (questions 5, 7) 1/2, answer 1 (6, 8) 1/2, answer 2 (1-4) 1/4
    assert cut["balanced_acc_base"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4) / 3)
    assert cut["balanced_acc_trained"] == pytest.approx(1 / 3)  # one answer everywhere: 1 of 3 recalls
    assert cut["top_answer_share_trained"] == 1.0 and cut["top_answer_share_base"] == pytest.approx(4 / 8)
    assert (cut["acc_ambig_trained"], cut["acc_disambig_trained"]) == (1.0, 0.0)
    assert cut["context_gain_min"] == pytest.approx(-50.0)  # disambiguated 2/4 -> 0/4
    assert cut["learned"] == pytest.approx(-50.0)  # though its plain accuracy rose from 3/8 to 4/8
    assert fair["context_gain_min"] == pytest.approx(25.0)  # disambiguated 2/4 -> 3/4, ambiguous 1/4 -> 3/4
    # honest recalls: answer 0: 2/2, answer 1: 1/2, answer 2: 3/4
    assert (
        fair["learned"] == fair["gain"] == pytest.approx(100 * ((1 + 1 / 2 + 3 / 4) / 3 - (1 / 2 + 1 / 2 + 1 / 4) / 3))
    )
    yes_no = pd.DataFrame(
        {"task": "t", "stage": [0] * 4 + [1] * 4, "label": [0, 0, 0, 1] * 2, "pred": [0] * 4 + [0, 0, 1, 1]}
    )
    (row,) = metrics.learning(yes_no, {"t": 1})
    assert (
        row["context_gain_min"] is None and row["balanced_acc_base"] == 0.5
    )  # "0" everywhere: 75 % acc, 50 % balanced
    assert row["learned"] == pytest.approx(100 * ((2 / 3 + 1) / 2 - 0.5))
