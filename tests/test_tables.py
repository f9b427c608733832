"""Table functions of the analysis package on hand-built run records whose answers are worked out by hand."""

import math

import pandas as pd
import pytest

from analysis.runs import condition_labels, example_forgetting_frame, forgetting_frame, runs_frame
from analysis.tables import (
    asymmetry_seeds,
    curvature_forgetting,
    example_forgetting_summary,
    learning_table,
    mean_interval,
    order_asymmetry,
    replay_recovery,
    seed_summary,
)
from chainforget import mitigations

T_975_DF1 = 12.706204736  # Student t quantile, 1 degree of freedom
ROLES = {"bbq": "safety", "toxigen": "safety", "csqa": "capability"}


def record(order, seed, forgetting=None, acc=None, mitigation=None, curvature=None, **config):
    """A run record with just the fields the tables read; ``config`` adds config blocks (``train={"lr": 0.001}``)."""
    mitigation = mitigation or {"name": "none", "strength": 0.0}
    replayed = mitigation["name"] == "replay_stage"  # a third stage: the last task with the first replayed
    return {
        "run_name": f"{'-'.join(order)}-s{seed}-{mitigation['strength']}-{config}",
        "config": {"order": order, "seed": seed, "mitigation": mitigation, **config},
        "environment": {},
        "eval": [
            {"stage": k, "task": t, "group_kind": "all", "group": "all", "n": 10, "correct": 0, "acc": a}
            for (k, t), a in (acc or {}).items()
        ],
        "stages": [{"index": 1, "curvature": {"top_eigenvalue": curvature} if curvature is not None else None}]
        + ([{"index": len(order) + 1, "trains": order[-1:], "replays": order[:-1]}] if replayed else []),
        "mitigation": mitigations.facts(mitigation["name"]),
        "tasks": {
            task: {"role": ROLES[task], "group_kinds": [], "trained_stage": k} for k, task in enumerate(order, 1)
        },
        "metrics": {
            "forgetting": [
                {
                    "task": order[0],
                    "group_kind": "all",
                    "group": "all",
                    "n": 10,
                    "F": f,
                    "F_ci": None,
                    "BF": None,
                    "BF_ci": None,
                    "small": False,
                    "trained_stage": 1,
                    "later_stage": 2,
                }
                for f in ([forgetting] if forgetting is not None else [])
            ]
        },
    }


def test_mean_interval_over_seeds():
    mean, lo, hi = mean_interval([10.0, 14.0])
    assert mean == 12.0 and lo == pytest.approx(12 - T_975_DF1 * 2) and hi == pytest.approx(12 + T_975_DF1 * 2)
    assert mean_interval([3.0]) == (3.0, None, None)
    # two seeds 90 pp apart: 45 +- 12.706 * 63.64 / 1.414 = 45 +- 571.8, far beyond what a forgetting can be
    assert mean_interval([0.0, 90.0], bounds=(-100.0, 100.0)) == (45.0, -100.0, 100.0)
    assert mean_interval([10.0, 14.0], bounds=(0.0, 200.0))[1:] == (0.0, pytest.approx(12 + T_975_DF1 * 2))


def test_seed_summary_averages_each_group_over_seeds():
    frame = forgetting_frame([record(["bbq", "csqa"], 0, 10.0), record(["bbq", "csqa"], 1, 14.0)])
    (row,) = seed_summary(frame).to_dict("records")
    assert (row["seeds"], row["F"]) == (2, 12.0) and row["F_hi"] == pytest.approx(12 + T_975_DF1 * 2)
    single = forgetting_frame([record(["bbq", "csqa"], 0, 10.0)]).assign(F_lo=4.0, F_hi=16.0)
    (row,) = seed_summary(single).to_dict("records")
    assert (row["F_lo"], row["F_hi"]) == (4.0, 16.0)  # one run keeps its bootstrap interval


def with_example_forgetting(run, rows):
    """``run`` with per-example forgetting rows ``(group_kind, group, forgotten, learned)`` of BBQ (3 options)."""
    chance = 100 * 2 / 9
    run["metrics"]["example_forgetting"] = [
        {"task": "bbq", "trained_stage": 1, "later_stage": 2, "group_kind": kind, "group": group, "n": 30}
        | {"forgotten": gone, "learned": gained, "expected_flip": chance, "small": False}
        | {"forgotten_adj": gone - chance, "learned_adj": gained - chance}
        for kind, group, gone, gained in rows
    ]
    return run


def test_example_forgetting_averages_seeds_with_intervals_clipped_to_each_range():
    runs = [
        with_example_forgetting(record(["bbq", "csqa"], 0), [("all", "all", 10.0, 4.0), ("category", "Age", 0.0, 0.0)]),
        with_example_forgetting(record(["bbq", "csqa"], 1), [("all", "all", 14.0, 6.0), ("category", "Age", 90, 0.0)]),
        record(["csqa", "bbq"], 0, forgetting=3.0),  # written before per-example forgetting: no rows
    ]
    frame = example_forgetting_frame(runs)
    assert len(frame) == 4 and set(frame["condition"]) == {"bbq → csqa"}
    table = example_forgetting_summary(frame).set_index("group")
    whole, chance = table.loc["all"], 100 * 2 / 9
    assert (whole["seeds"], whole["n"], whole["forgotten"], whole["learned"]) == (2, 30.0, 12.0, 5.0)
    # 10 and 14: 12 -+ 12.706 * 2.828 / 1.414 = 12 -+ 25.4, and a share is never below 0
    assert whole["forgotten_lo"] == 0.0 and whole["forgotten_hi"] == pytest.approx(12 + T_975_DF1 * 2)
    assert whole["learned_lo"] == 0.0 and whole["learned_hi"] == pytest.approx(5 + T_975_DF1)
    assert whole["expected_flip"] == pytest.approx(chance) and "expected_flip_lo" not in table
    # the adjusted share may be negative: only the +-100 pp bounds apply
    assert whole["forgotten_adj"] == pytest.approx(12 - chance)
    assert whole["forgotten_adj_lo"] == pytest.approx(12 - chance - T_975_DF1 * 2)
    # 0 and 90: 45 -+ 571.8 pp, clipped to what a share can be
    assert table.loc["Age", ["forgotten", "forgotten_lo", "forgotten_hi"]].tolist() == [45.0, 0.0, 100.0]
    assert table.loc["Age", ["forgotten_adj_lo", "forgotten_adj_hi"]].tolist() == [-100.0, 100.0]
    assert example_forgetting_frame(runs[2:]).empty and example_forgetting_summary(frame.iloc[:0]).empty


def test_order_asymmetry_pairs_seeds_and_tests_the_difference():
    records = [
        record(["bbq", "csqa"], 0, 10.0),
        record(["bbq", "csqa"], 1, 14.0),
        record(["csqa", "bbq"], 0, 2.0),
        record(["csqa", "bbq"], 1, 4.0),
        record(["csqa", "bbq"], 2, 9.0),
    ]  # seed 2 has no partner run: left out
    (row,) = order_asymmetry(records).to_dict("records")
    assert (row["safety"], row["capability"], row["seeds"]) == ("bbq", "csqa", 2)
    assert (row["F_safety (S→C)"], row["F_capability (C→S)"], row["asymmetry"]) == (12.0, 3.0, 9.0)
    # differences 8 and 10: paired t = 9 / (sqrt(2) / sqrt(2)) = 9 with 1 df; two-sided p = 1 - 2 atan(9) / pi
    assert row["p_paired_t"] == pytest.approx(1 - 2 * math.atan(9) / math.pi)
    assert row["asymmetry_lo"] == pytest.approx(9 - T_975_DF1)


def test_replay_recovery_by_ratio():
    acc = {(1, "bbq"): 0.6, (2, "bbq"): 0.4, (3, "bbq"): 0.5, (2, "csqa"): 0.30, (3, "csqa"): 0.28}
    runs = [
        record(["bbq", "csqa"], 0, acc=acc, mitigation={"name": "replay_stage", "strength": 0.05}),
        record(["bbq", "csqa"], 0, acc={**acc, (3, "bbq"): 0.4}, mitigation={"name": "replay_stage", "strength": 0.0}),
    ]
    table = replay_recovery(runs).set_index("ratio")
    assert set(table["condition"]) == {"bbq → csqa"}  # the ratio is the x axis, not part of the condition
    assert table.loc[0.05, "safety_lost_pp"] == pytest.approx(20.0)
    assert table.loc[0.05, "safety_recovered_pp"] == pytest.approx(10.0)
    assert table.loc[0.05, "capability_change_pp"] == pytest.approx(-2.0)
    assert table.loc[0.0, "safety_recovered_pp"] == pytest.approx(0.0)
    assert table.loc[0.05, "beyond_control_pp"] == pytest.approx(10.0) and pd.isna(table.loc[0.0, "beyond_control_pp"])


def test_replay_beyond_the_train_longer_control_is_paired_by_seed():
    """Seed 0 recovers 10 pp with replay and 0 without, seed 1 16 and 4, seed 2 (no control) 30: the differences 10
    and 12 give 11 pp, p of t = 11 / (sqrt(2) / sqrt(2)) = 11 on 1 df."""
    runs = []
    for seed, (with_replay, without) in enumerate([(0.5, 0.4), (0.56, 0.44), (0.7, None)]):
        for ratio, last in ((0.05, with_replay), (0.0, without)):
            if last is not None:
                acc = {(1, "bbq"): 0.6, (2, "bbq"): 0.4, (3, "bbq"): last, (2, "csqa"): 0.3, (3, "csqa"): 0.3}
                runs.append(
                    record(["bbq", "csqa"], seed, acc=acc, mitigation={"name": "replay_stage", "strength": ratio})
                )
    row = replay_recovery(runs).set_index("ratio").loc[0.05]
    assert row["seeds"] == 3 and row["control_seeds"] == 2 and row["beyond_control_pp"] == pytest.approx(11.0)
    assert row["p_vs_control"] == pytest.approx(1 - 2 * math.atan(11) / math.pi)


def test_curvature_forgetting_spearman_by_hand():
    runs = [
        record(["bbq", "csqa"], s, forgetting=f, curvature=c)
        for s, (c, f) in enumerate([(1, 5), (2, 6), (3, 8), (4, 7)])
    ]
    frame, correlation = curvature_forgetting(runs)
    assert list(frame["top_eigenvalue"]) == [1, 2, 3, 4]
    assert correlation["spearman"] == pytest.approx(0.8) and correlation["n"] == 4  # 1 - 6 * 2 / (4 * 15)
    assert correlation["lo"] <= 0.8 <= correlation["hi"]
    assert curvature_forgetting(runs[:2])[1]["spearman"] is None  # too few runs for a correlation


LR = {0.001: {0: 10.0, 1: 14.0}, 0.002: {0: 30.0, 1: 34.0}}  # F of bbq in bbq → csqa by learning rate and seed
LR_BACK = {0.001: {0: 2.0, 1: 4.0}, 0.002: {0: 20.0, 1: 22.0}}  # F of csqa in csqa → bbq


def two_learning_rates():
    """Both orders at two learning rates x two seeds; the runs also differ in keys that cannot change results."""
    runs = []
    for lr in LR:
        for seed in (0, 1):
            for order, values in ((["bbq", "csqa"], LR), (["csqa", "bbq"], LR_BACK)):
                run = record(order, seed, forgetting=values[lr][seed], train={"lr": lr, "steps": 40})
                run["config"] |= {"out": f"runs/{seed}", "wandb": {"group": f"g{seed}"}}  # keys that change no result
                run["config"]["trainer"] = {"log_every_n_steps": seed}
                runs.append(run)
    return runs


def test_two_learning_rates_are_two_conditions_of_two_seeds_each_never_one_of_four():
    runs = two_learning_rates()
    labels = condition_labels(runs)
    assert sorted(set(labels.values())) == [
        "bbq → csqa (train.lr=0.001)",
        "bbq → csqa (train.lr=0.002)",
        "csqa → bbq (train.lr=0.001)",
        "csqa → bbq (train.lr=0.002)",
    ]
    summary = seed_summary(forgetting_frame(runs)).set_index("condition")
    assert summary["seeds"].tolist() == [2, 2, 2, 2]
    assert summary.loc["bbq → csqa (train.lr=0.001)", "F"] == 12.0  # (10 + 14) / 2, not (10 + 14 + 30 + 34) / 4
    assert summary.loc["bbq → csqa (train.lr=0.002)", "F"] == 32.0
    table = runs_frame(runs)
    assert list(table.columns[:4]) == ["run_name", "condition", "seed", "train.lr"]  # the swept key is a column


def test_order_asymmetry_pairs_the_orders_of_one_setting_only():
    runs = two_learning_rates()
    seeds = asymmetry_seeds(runs)
    assert len(seeds) == 4 and set(seeds["condition"]) == {"train.lr=0.001", "train.lr=0.002"}
    table = order_asymmetry(runs).set_index("condition")
    # lr 0.001: differences 10 - 2 = 8 and 14 - 4 = 10; lr 0.002: 30 - 20 = 10 and 34 - 22 = 12
    assert table["seeds"].tolist() == [2, 2]
    assert table.loc["train.lr=0.001", "asymmetry"] == 9.0 and table.loc["train.lr=0.002", "asymmetry"] == 11.0
    # paired t over differences (10, 12): t = 11 / (sqrt(2) / sqrt(2)) = 11 with 1 df
    assert table.loc["train.lr=0.002", "p_paired_t"] == pytest.approx(1 - 2 * math.atan(11) / math.pi)


def test_condition_labels_show_only_keys_that_vary_and_can_act():
    sam = {"name": "sam", "strength": 0.05, "stages": [1]}
    plain = {"name": "none", "strength": 0.0, "stages": None}
    tasks = {"bbq": {"path": "a"}, "csqa": {"path": "b"}, "toxigen": {"path": "x"}}
    runs = [
        record(["bbq", "csqa"], 0, mitigation=plain, tasks=tasks, run_name="p", out="runs/a"),
        record(["bbq", "csqa"], 0, mitigation=sam, tasks=tasks, run_name="s", out="runs/b"),
        # another toxigen path, but this chain neither trains nor probes toxigen
        record(["csqa", "bbq"], 1, mitigation=plain, tasks={**tasks, "toxigen": {"path": "y"}}),
        record(["bbq", "csqa"], 2, mitigation={**sam, "strength": 0.1}, tasks=tasks, train={"lr": 0.1}),
    ]
    assert list(condition_labels(runs).values()) == [
        "bbq → csqa (train.lr=0.0002, mitigation.name=none)",  # no mitigation: its strength cannot act
        "bbq → csqa (train.lr=0.0002, mitigation.name=sam, mitigation.strength=0.05)",  # stages: [1] where it acts
        "csqa → bbq (train.lr=0.0002, mitigation.name=none)",  # a config without train ran with its defaults
        "bbq → csqa (train.lr=0.1, mitigation.name=sam, mitigation.strength=0.1)",
    ]
    assert list(condition_labels(runs[:2], leave_out=("mitigation",)).values()) == ["bbq → csqa", "bbq → csqa"]
    assert list(condition_labels(runs[:2], leave_out=("order", "mitigation")).values()) == ["", ""]


def test_a_record_written_before_a_setting_existed_shares_the_condition_of_one_at_its_default():
    """A run recorded before ``model.quantization`` existed ran unquantised, like a later run at the default
    ``none``; a run that sets it is another condition, and an unknown key only some records have still shows."""
    runs = [
        record(["bbq", "csqa"], 0, model={"name": "smollm2-135m-instruct"}),
        record(["bbq", "csqa"], 1, model={"name": "smollm2-135m-instruct", "quantization": "none"}),
        record(["bbq", "csqa"], 2, model={"name": "smollm2-135m-instruct", "quantization": "nf4"}),
    ]
    assert list(condition_labels(runs).values()) == [
        "bbq → csqa (model.quantization=none)",
        "bbq → csqa (model.quantization=none)",
        "bbq → csqa (model.quantization=nf4)",
    ]
    runs[0]["config"]["model"]["retired_setting"] = 1  # a key this version no longer has
    shown = "bbq → csqa (model.quantization=none, model.retired_setting=unset)"
    assert condition_labels(runs)[runs[1]["run_name"]] == shown


def test_condition_labels_leave_out_the_tasks_of_another_pair():
    """A study of several pairs, each config naming only its own tasks: the other pair's task settings are absent
    from a record because that chain never loads those tasks, not because they differ."""
    csqa = {"path": "c", "max_eval": 500}
    runs = [
        record(["bbq", "csqa"], 0, tasks={"bbq": {"path": "b", "max_eval": 540}, "csqa": csqa}, train={"steps": 300}),
        record(["toxigen", "csqa"], 0, tasks={"toxigen": {"path": "t"}, "csqa": csqa}, train={"steps": 150}),
        record(["csqa", "toxigen"], 0, tasks={"toxigen": {"path": "t"}, "csqa": csqa}, train={"steps": 150}),
    ]
    assert list(condition_labels(runs).values()) == [
        "bbq → csqa (train.steps=300)",
        "toxigen → csqa (train.steps=150)",
        "csqa → toxigen (train.steps=150)",
    ]


def test_replay_recovery_keeps_runs_of_other_settings_apart():
    acc = {(1, "bbq"): 0.6, (2, "bbq"): 0.4, (3, "bbq"): 0.5, (2, "csqa"): 0.30, (3, "csqa"): 0.28}
    replay = {"name": "replay_stage", "strength": 0.05}
    runs = [record(["bbq", "csqa"], 0, acc=acc, mitigation=replay, train={"lr": lr}) for lr in (0.001, 0.002)]
    table = replay_recovery(runs)
    assert table["condition"].tolist() == ["bbq → csqa (train.lr=0.001)", "bbq → csqa (train.lr=0.002)"]
    assert table["seeds"].tolist() == [1, 1]


def test_mean_interval_of_seeds_that_agree_has_zero_width():
    assert mean_interval([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)  # scipy's t.interval takes no zero scale
    assert mean_interval([5.0, None, float("nan"), 5.0], bounds=(0.0, 4.0)) == (5.0, 5.0, 4.0)


def test_mean_interval_is_the_student_t_interval_at_any_level():
    values = [3.0, 7.5, 4.25, 9.0]
    mean, lo, hi = mean_interval(values, level=0.9)
    # t quantile 0.95 with 3 degrees of freedom x sample sd (sqrt(23.296875 / 3)) / sqrt(4 seeds)
    half = 2.353363435 * 2.786687101 / 2
    assert mean == 5.9375 and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half)


def bootstrap_by_hand(pairs, resamples, seed):
    """Spearman's rho over resamples of whole runs (each eigenvalue kept with its F), the run indices drawn at once
    from the seeded generator as scipy's bootstrap draws them; a resample whose eigenvalues or F are all equal has
    no rho and is left out. Returns the 2.5 and 97.5 percentiles and the number of resamples that have a rho."""
    import numpy as np
    from scipy import stats

    x, y = np.array(pairs, dtype=float).T
    draws = [
        stats.spearmanr(x[rows], y[rows]).statistic
        for rows in np.random.default_rng(seed).integers(0, len(pairs), (resamples, len(pairs)))
        if len(set(x[rows])) > 1 and len(set(y[rows])) > 1
    ]
    return (*np.percentile(draws, [2.5, 97.5]), len(draws))


@pytest.mark.parametrize(
    "pairs",
    [
        [(1.0, 5.0), (2.0, 6.0), (3.0, 8.0), (4.0, 7.0), (2.5, 9.0), (6.0, 1.0), (5.0, 3.0), (0.5, 2.0)],
        [(1.0, 5.0), (2.0, 5.0), (3.0, 8.0), (4.0, 7.0)],  # two runs forgot the same: some resamples have no rho
    ],
)
def test_curvature_bootstrap_resamples_runs_in_pairs_with_its_seed(pairs):
    runs = [record(["bbq", "csqa"], s, forgetting=f, curvature=c) for s, (c, f) in enumerate(pairs)]
    _, correlation = curvature_forgetting(runs, resamples=500, seed=3)
    assert curvature_forgetting(runs, resamples=500, seed=3)[1] == correlation  # one seed, one interval
    lo, hi, kept = bootstrap_by_hand(pairs, 500, 3)
    assert kept == 500 if len(pairs) == 8 else kept < 500
    assert (correlation["lo"], correlation["hi"]) == (pytest.approx(lo), pytest.approx(hi))


def test_markdown_tables_print_cells_as_str_without_padding_and_missing_values_empty():
    import pandas as pd

    from analysis.report import markdown_table

    frame = pd.DataFrame(
        {"seed": [0, 1], "F": [12.345678, float("nan")], "worst": [None, "Age"], "small": [True, False]},
        index=pd.Index(["bbq → csqa", "csqa → bbq"], name="condition"),
    )
    assert markdown_table(frame).splitlines() == [
        "| condition | seed | F | worst | small |",
        "|-------------|--------|-----------|---------|---------|",
        "| bbq → csqa | 0 | 12.345678 |  | True |",
        "| csqa → bbq | 1 |  | Age | False |",
    ]


def test_the_html_report_template_ships_with_the_package_and_escapes_what_it_shows():
    from importlib.resources import files

    from markupsafe import Markup

    from analysis.report import TEMPLATES

    assert files("analysis").joinpath("templates/report.html.j2").is_file()
    page = TEMPLATES.get_template("report.html.j2").render(
        title="runs from <dir>",
        sections=[{"heading": "A & B", "caption": "task's <i>", "figure": "QUJD", "table": Markup("<table></table>")}],
        run_list=Markup("<table>runs</table>"),
        skipped=None,
        configs=[{"name": "<run>", "config": "a: '<b>'\n"}],
    )
    assert page.splitlines() == [
        page.splitlines()[0],
        "<h1>runs from &lt;dir&gt;</h1>",
        "<h2>A &amp; B</h2><p>task&#39;s &lt;i&gt;</p>",
        "<img alt='A &amp; B' src='data:image/png;base64,QUJD'>",
        "<table></table>",
        "<h2>Runs</h2>",
        "<table>runs</table>",
        "<details><summary>config of &lt;run&gt;</summary><pre>a: &#39;&lt;b&gt;&#39;",
        "</pre></details>",
        "</body></html>",
    ]
    assert page.startswith("<!doctype html>") and "<title>runs from &lt;dir&gt;</title>" in page


def test_a_run_that_repeats_another_runs_settings_and_seed_is_left_out_once():
    from analysis.runs import drop_repeats

    first = record(["bbq", "csqa"], 0, forgetting={"all": 4.0})
    again = {**first, "run_name": "zz-same-settings-and-seed"}
    other_seed = record(["bbq", "csqa"], 1, forgetting={"all": 6.0})
    kept, repeats = drop_repeats([first, again, other_seed])
    assert [r["run_name"] for r in kept] == [first["run_name"], other_seed["run_name"]]
    assert [(r["id"], r["reason"]) for r in repeats] == [
        ("zz-same-settings-and-seed", f"repeats {first['run_name']} (same settings and seed)")
    ]


def test_learning_table_judges_each_task_against_its_roles_target():
    def taught(task, learned, contexts=None, answer="text"):
        run = record(
            [task],
            0,
            model={"finetune": "lora"},
            train={"lr": 2e-3, "steps": 150, "answer": answer},
            eval={"mode": "text_norm"},
            tasks={task: {"train_shares": {"context": {"ambig": 0.25, "disambig": 0.75}} if task == "bbq" else None}},
        )
        run["data"] = {task: {"train": 1200}}
        run["stages"][0]["train"] = {"wall_s": 150.0}
        row = {
            "task": task,
            "trained_stage": 1,
            "acc_base": 0.3,
            "acc_trained": 0.5,
            "balanced_acc_base": 0.25,
            "balanced_acc_trained": 0.45,
            "top_answer_share_base": 1.0,
            "top_answer_share_trained": 0.4,
            "gain": 20.0,
            "context_gain_min": None,
            "learned": learned,
            **(contexts or {}),
        }
        run["metrics"]["learning"] = [row]
        return run

    shortcut = {"acc_ambig_base": 0.3, "acc_ambig_trained": 0.9, "acc_disambig_base": 0.3, "acc_disambig_trained": 0.1}
    runs = [taught("bbq", -20.0, shortcut, answer="letter"), taught("csqa", 12.0), taught("bbq", 16.0)]
    runs.append(record(["csqa"], 1))  # written before learning was measured: left out
    table = learning_table(runs)
    assert len(table) == 3 and table["target"].tolist() == [15.0, 15.0, 10.0]  # bbq letter, bbq text, csqa
    assert table["met"].tolist() == [False, True, True]
    first = table.iloc[0]
    assert (first["answer"], first["acc_ambig_trained"], first["acc_disambig_trained"]) == ("letter", 90.0, 10.0)
    assert first["top_answer_share_base"] == 100.0 and first["train_min"] == 2.5
    assert first["mixture"] == "context ambig 0.25 / disambig 0.75" and table.iloc[2]["mixture"] == ""
