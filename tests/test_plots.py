"""Figures: labelled axes in pp and the right number of plotted elements (not just a file on disk)."""

import numpy as np
import pandas as pd
import pytest

from analysis import plots


def forgetting_rows():
    rows = []
    for condition, task in (("bbq → csqa", "bbq"), ("csqa → bbq", "csqa")):
        for group, f in (("Age", 10.0), ("Religion", -4.0), ("SES", 22.0)):
            rows.append(
                {
                    "condition": condition,
                    "task": task,
                    "group_kind": "category",
                    "group": group,
                    "F": f,
                    "F_lo": f - 5,
                    "F_hi": f + 5,
                    "BF": f - 6.0,
                    "BF_lo": f - 12.0,
                    "BF_hi": f,
                    "small": False,
                    "seed": 0,
                }
            )
        rows.append(
            {
                "condition": condition,
                "task": task,
                "group_kind": "all",
                "group": "all",
                "F": 6.0,
                "F_lo": 1.0,
                "F_hi": 11.0,
                "BF": None,
                "BF_lo": None,
                "BF_hi": None,
                "small": False,
                "seed": 0,
            }
        )
    return pd.DataFrame(rows)


def test_heatmap_has_a_cell_per_group_and_condition_with_its_interval():
    fig = plots.forgetting_heatmap(forgetting_rows(), kinds=("category",))
    ax = fig.axes[0]
    assert ax.collections[0].get_array().size == 3 * 2
    assert ax.get_xlabel() == "condition" and ax.get_ylabel() == "group"
    assert fig.axes[1].get_ylabel() == "forgetting F_g (pp)"
    assert "+22.0\n[+17, +27]" in [t.get_text() for t in ax.texts]


def test_asymmetry_bars_one_per_pair_with_error_bars():
    table = pd.DataFrame(
        {
            "safety": ["bbq", "toxigen"],
            "capability": ["csqa", "csqa"],
            "asymmetry": [9.0, -2.0],
            "asymmetry_lo": [-3.7, -5.0],
            "asymmetry_hi": [21.7, 1.0],
        }
    )
    ax = plots.asymmetry_figure(table).axes[0]
    assert len(ax.patches) == 2 and [p.get_height() for p in ax.patches] == [9.0, -2.0]
    assert "(pp)" in ax.get_ylabel() and ax.get_xlabel() == "safety / capability pair"
    assert len(ax.containers) == 2  # the bars and their error bars


def test_replay_curve_has_two_series_over_the_ratios():
    table = pd.DataFrame(
        {
            "ratio": [0.0, 0.05, 0.2],
            "safety_recovered_pp": [0.0, 4.0, 6.0],
            "recovered_lo": [-1, 2, 3],
            "recovered_hi": [1, 6, 9],
            "capability_change_pp": [0.5, -0.5, -2.0],
            "capability_lo": [0, -1, -3],
            "capability_hi": [1, 0, -1],
            "safety_lost_pp": [8.0, 8.0, 8.0],
        }
    )
    two_chains = pd.concat([table.assign(condition="bbq → csqa"), table.assign(condition="toxigen → csqa")])
    fig = plots.replay_figure(two_chains)
    assert len(fig.axes) == 2 and "toxigen → csqa" in fig.axes[1].get_title() and "+8.0 pp" in fig.axes[1].get_title()
    ax = fig.axes[0]
    assert [len(container.lines[0].get_xdata()) for container in ax.containers] == [3, 3]  # two series, 3 ratios each
    assert "replay ratio" in ax.get_xlabel() and "(pp)" in ax.get_ylabel()


def test_curvature_scatter_plots_every_run_and_reports_rho():
    points = pd.DataFrame(
        {
            "top_eigenvalue": [1.0, 2.0, 3.0, 4.0],
            "F": [5.0, 6.0, 8.0, 7.0],
            "task": ["bbq", "bbq", "toxigen", "toxigen"],
            "mitigation": ["none", "sam", "none", "none"],
        }
    )
    fig = plots.curvature_figure(points, {"spearman": 0.8, "lo": 0.2, "hi": 1.0, "n": 4})
    ax, ranked = fig.axes
    (scatter,) = [c for c in ax.collections if type(c).__name__ == "PathCollection"]
    assert sorted(map(tuple, scatter.get_offsets().tolist())) == [(1.0, 5.0), (2.0, 6.0), (3.0, 8.0), (4.0, 7.0)]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"bbq", "toxigen", "sam"}
    assert "rho = 0.80 [0.20, 1.00]" in fig.texts[0].get_text() and "(pp)" in ax.get_ylabel()
    assert ax.get_xscale() == "log"
    # the line through the ranks (1, 1), (2, 2), (3, 4), (4, 3) has slope 0.8: Spearman's rho, as the title says
    (line,) = ranked.lines
    (x0, x1), (y0, y1) = line.get_xdata(), line.get_ydata()
    assert (y1 - y0) / (x1 - x0) == pytest.approx(0.8)


def test_pareto_mask_and_front_by_hand():
    values = np.array([[1.0, 0.2], [2.0, 0.5], [3.0, 0.4], [0.5, 0.1]])  # minimise x, maximise y
    assert plots.pareto_mask(values, ("minimize", "maximize")).tolist() == [True, True, False, True]
    trials = pd.DataFrame(values, columns=["forgetting/bbq", "final/csqa/acc"])
    ax = plots.pareto_figure(trials, ("forgetting/bbq", "final/csqa/acc"), ("minimize", "maximize")).axes[0]
    assert len(ax.lines[0].get_xdata()) == 3 and len(ax.collections[0].get_offsets()) == 1
    assert ax.get_xlabel() == "forgetting/bbq (minimize)"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.plt.close("all")


def test_wilson_interval_by_hand():
    lo, hi = plots.wilson(np.array([5]), np.array([10]))
    # p = 0.5, n = 10, z^2 = 3.8416: centre 0.5, half = 1.96 * sqrt(0.025 + 0.009604) / 1.38416 = 0.26341
    assert lo[0] == pytest.approx(23.66, abs=0.01) and hi[0] == pytest.approx(76.34, abs=0.01)


def test_accuracy_figure_draws_a_line_and_intervals_per_task():
    evals = pd.DataFrame(
        [
            {
                "condition": "bbq → csqa",
                "task": t,
                "stage": k,
                "group_kind": "all",
                "acc_pp": 100 * a,
                "correct": int(10 * a),
                "n": 10,
            }
            for t, accs in (("bbq", (0.3, 0.7, 0.4)), ("csqa", (0.2, 0.2, 0.5)))
            for k, a in enumerate(accs)
        ]
    )
    fig = plots.accuracy_figure(evals)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy (%)" and ax.get_xlabel() == "stage (0 = base model)"
    assert len([line for line in ax.lines if len(line.get_xdata()) == 3]) >= 2
    assert len(ax.containers) == 2  # one set of Wilson error bars per task


def test_group_bars_average_seeds_draw_small_groups_apart_and_leave_out_groupless_tasks():
    rows = forgetting_rows()
    second_seed = rows.assign(seed=1, F=rows["F"] + 2.0)
    small = rows.iloc[[0]].assign(group="tiny", small=True, F=90.0)
    groupless = pd.DataFrame(
        [
            {
                "condition": "csqa → toxigen",
                "task": "csqa",
                "group_kind": "all",
                "group": "all",
                "F": 3.0,
                "F_lo": 0.0,
                "F_hi": 6.0,
                "BF": None,
                "BF_lo": None,
                "BF_hi": None,
                "small": False,
                "seed": 0,
            }
        ]
    )
    fig = plots.group_forgetting_figure(pd.concat([rows, second_seed, small, groupless], ignore_index=True))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # csqa → toxigen forgets a task without groups: no panel
    bars = [p for p in panels[0].patches if p.get_height() > 0]
    assert sorted(round(p.get_width(), 6) for p in bars) == [-3.0, 7.0, 11.0, 23.0, 90.0]  # means over two seeds
    labels = [label.get_text() for label in panels[0].get_yticklabels()]
    tiny = labels.index(next(label for label in labels if label.endswith("(n < min)")))
    kind = labels[tiny].split(":")[0]
    assert all(not label.startswith(f"{kind}:") for label in labels[tiny + 1 :])  # after its kind's other groups
    assert bars[tiny].get_facecolor()[:3] == pytest.approx((0.8, 0.8, 0.8)) and bars[tiny].get_width() == 90.0
    assert "2 seeds" in panels[0].get_title()


def test_group_bars_draw_each_seed_and_clip_intervals_to_the_range_of_forgetting():
    rows = forgetting_rows()
    seeds = pd.concat([rows, rows.assign(seed=1, F=rows["F"] + 90.0)], ignore_index=True)  # seeds 90 pp apart
    panel = plots.group_forgetting_figure(seeds).axes[0]
    (dots,) = [c for c in panel.collections if type(c).__name__ == "PathCollection"]
    assert len(dots.get_offsets()) == 8  # 2 seeds x (3 groups + all examples)
    # 2 seeds 90 pp apart: a t-interval of +-572 pp around the mean, drawn clipped to -100..+100
    (whiskers,) = [c for c in panel.collections if type(c).__name__ == "LineCollection"]
    ends = np.concatenate([segment[:, 0] for segment in whiskers.get_segments()])
    assert ends.min() == -100.0 and ends.max() == 100.0
    assert "clipped" in panel.figure.texts[0].get_text()


def test_asymmetry_draws_each_seed_as_a_dot_and_names_the_setting():
    pairs = {"condition": ["train.lr=0.001", ""], "safety": ["bbq", "bbq"], "capability": ["csqa", "arc"]}
    table = pd.DataFrame(pairs | {"seeds": [2, 1], "asymmetry": [9.0, 1.0]})
    table = table.assign(asymmetry_lo=[-3.7, None], asymmetry_hi=[21.7, None])
    seeds = pd.DataFrame({"condition": ["train.lr=0.001", "train.lr=0.001", ""], "safety": ["bbq"] * 3})
    seeds = seeds.assign(capability=["csqa", "csqa", "arc"], asymmetry=[8.0, 10.0, 1.0])
    ax = plots.asymmetry_figure(table, seeds).axes[0]
    (dots,) = [c for c in ax.collections if type(c).__name__ == "PathCollection"]
    assert sorted(map(tuple, dots.get_offsets().tolist())) == [(0.0, 8.0), (0.0, 10.0), (1.0, 1.0)]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["bbq / csqa\ntrain.lr=0.001\n(2 seeds)", "bbq / arc\n(1 seed)"]


def test_curvature_figure_rings_the_estimates_that_had_not_converged_and_draws_no_band():
    points = pd.DataFrame(
        {"top_eigenvalue": [33.0, 36.0, 37.0, -2.0], "F": [80.0, 100.0, 87.5, 80.0], "task": "bbq"}
        | {"converged": [True, False, True, None]}
    )
    ax = plots.curvature_figure(points, {"spearman": -0.1, "lo": -1.0, "hi": 1.0, "n": 4}).axes[0]
    assert ax.get_xscale() == "linear"  # a negative eigenvalue: no log scale
    ringed = [c for c in ax.collections if c.get_offsets().tolist() == [[36.0, 100.0]]]
    assert len(ringed) == 1 and "not converged" in {t.get_text() for t in ax.get_legend().get_texts()}
    assert not [c for c in ax.collections if type(c).__name__ == "PolyCollection"]  # no least-squares band


def test_accuracy_figure_gives_wilson_intervals_only_to_a_condition_with_one_run():
    rows = []
    for condition, seeds in (("a", (0, 1)), ("b", (0,))):
        for seed in seeds:
            for k in range(3):
                row = {"condition": condition, "task": "bbq", "stage": k, "group_kind": "all", "seed": seed}
                rows.append(row | {"acc_pp": 10.0 * (k + seed), "correct": k + seed, "n": 10})
    fig = plots.accuracy_figure(pd.DataFrame(rows))
    assert [len(ax.containers) for ax in fig.axes[:2]] == [0, 1]  # "a": a band over its two seeds; "b": Wilson bars
    assert "band: range over seeds; one run: 95% Wilson" in fig.texts[0].get_text()


def test_wilson_interval_is_the_score_interval_at_every_count():
    correct, n = np.array([0, 1, 7, 19, 20, 0]), np.array([20, 20, 20, 20, 20, 1])
    lo, hi = plots.wilson(correct, n)
    z = 1.96  # the score interval by its formula (Wilson 1927), in percent
    p = correct / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert lo == pytest.approx(100 * (centre - half), abs=1e-9) and hi == pytest.approx(100 * (centre + half), abs=1e-9)
    assert lo[0] == 0.0 and hi[4] == 100.0  # no correct answer / all correct: the bound is the end of the range
    lo, hi = plots.wilson(np.array([3, 0]), np.array([10, 0]))  # no examples: no interval
    assert np.isfinite(lo[0]) and np.isnan([lo[1], hi[1]]).all()


def example_rows(condition, task, seed, rows, n=20, options=3):
    """Per-example forgetting rows ``(group_kind, group, forgotten, learned, small)`` as example_forgetting_frame
    gives them."""
    chance = 100 * (options - 1) / options**2
    return [
        {"condition": condition, "task": task, "seed": seed, "trained_stage": 1, "later_stage": 2, "n": n}
        | {"group_kind": kind, "group": group, "forgotten": gone, "learned": gained, "expected_flip": chance}
        | {"forgotten_adj": gone - chance, "learned_adj": gained - chance, "small": small}
        for kind, group, gone, gained, small in rows
    ]


def test_example_forgetting_bars_sort_groups_mark_chance_and_keep_whiskers_within_0_to_100():
    rows = example_rows("bbq → csqa", "bbq", 0, [("all", "all", 20.0, 10.0, False), ("category", "SES", 30, 5, False)])
    rows += example_rows("bbq → csqa", "bbq", 1, [("all", "all", 24.0, 12.0, False), ("category", "SES", 34, 7, False)])
    rows += example_rows("bbq → csqa", "bbq", 0, [("category", "Age", 0.0, 0.0, False), ("category", "x", 90, 0, True)])
    rows += example_rows("bbq → csqa", "bbq", 1, [("category", "Age", 100.0, 0.0, False)])  # seeds 100 pp apart
    rows += example_rows("csqa → bbq", "csqa", 0, [("all", "all", 30.0, 0.0, False)], n=10, options=5)
    fig = plots.example_forgetting_figure(pd.DataFrame(rows))
    bbq, csqa = [ax for ax in fig.axes if ax.get_visible()]
    labels = [t.get_text() for t in bbq.get_yticklabels()]
    assert labels == ["all examples (n=20)", "category: Age (n=20)", "category: SES (n=20)"]  # the small group: out
    forgotten, learned = bbq.containers[:2]
    assert [bar.get_width() for bar in forgotten] == [22.0, 50.0, 32.0]  # means over seeds, Age beyond chance most
    assert [bar.get_width() for bar in learned] == [11.0, 0.0, 6.0]

    def whiskers(ax, flip):  # (low, high) of each group's whisker
        return [tuple(segment[:, 0]) for segment in ax.containers[2 + flip].lines[2][0].get_segments()]

    assert whiskers(bbq, 0) == [(20.0, 24.0), (0.0, 100.0), (30.0, 34.0)]  # the range over seeds
    lo, hi = plots.wilson(np.array([3, 0]), np.array([10, 10]))  # one run: Wilson over its 10 examples
    assert [whiskers(csqa, flip)[0] for flip in (0, 1)] == [pytest.approx((lo[0], hi[0])), (0.0, hi[1])]
    (chance,) = [c for c in csqa.collections if c not in [e.lines[2][0] for e in csqa.containers[2:]]]
    assert [tuple(segment[:, 0]) for segment in chance.get_segments()] == [(16.0, 16.0)]  # 5 options: (1/5)(4/5)
    assert "2 seeds" in bbq.get_title() and "chance 22.2 pp" in bbq.get_title() and "(pp)" in bbq.get_xlabel()
    assert "range over seeds" in fig.get_suptitle()


def test_learning_figures_draw_each_regime_and_each_tasks_curve():
    def row(task, role, finetune, answer, steps, base, trained, learned):
        return {
            "task": task,
            "role": role,
            "finetune": finetune,
            "answer": answer,
            "mixture": "",
            "lr": 2e-3,
            "steps": steps,
            "seed": 0,
            "train_examples": 1200,
            "balanced_acc_base": base,
            "balanced_acc_trained": trained,
            "gain": trained - base,
            "learned": learned,
            "target": 15.0 if role == "safety" else 10.0,
        }

    table = pd.DataFrame(
        [
            row("bbq", "safety", "lora", "letter", 150, 33.0, 50.0, -25.0),  # a shortcut: red
            row("bbq", "safety", "lora", "text", 150, 30.0, 64.0, 34.0),
            row("csqa", "capability", "lora", "text", 150, 28.0, 53.0, 25.0),
            row("csqa", "capability", "lora", "text", 150, 28.0, 53.0, 25.0),  # the same grid point in another study
            row("csqa", "capability", "lora", "text", 25, 28.0, 44.0, 16.0),
        ]
    )
    fig = plots.learning_figure(table)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in panels] == ["bbq", "csqa"]  # safety first

    def arrows(ax):
        return [child for child in ax.texts if getattr(child, "arrow_patch", None) is not None]

    assert len(arrows(panels[0])) == 2 and len(arrows(panels[1])) == 1  # the repeated grid point drawn once
    notes = [t.get_text() for t in panels[0].texts if t not in arrows(panels[0])]
    assert "a context -25.0 pp below base" in notes and "+34.0 pp" in notes
    curves = plots.learning_curves_figure(table)
    (ax,) = [ax for ax in curves.axes if ax.get_visible()]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_marker() == "o"}
    assert sorted(lines) == ["bbq", "csqa"]
    line = lines["csqa"]
    assert list(line.get_xdata()) == [0, 25, 150] and list(line.get_ydata()) == [28.0, 44.0, 53.0]
    assert plots.learning_curves_figure(table[table["steps"] == 150]) is None  # no regime at two lengths
