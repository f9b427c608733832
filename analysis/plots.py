"""Seaborn figures of chains: per-group forgetting per condition, accuracy across stages, order asymmetry, replay,
curvature and Pareto fronts.

Every figure has labelled axes in percentage points, interval bars where intervals exist, a caption-ready
title and the colour-blind-safe palette.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter

from analysis.tables import pooled_intervals, seed_summary

PALETTE = "colorblind"


def group_forgetting_figure(
    forgetting: pd.DataFrame, kinds: tuple[str, ...] | None = None, flips: pd.DataFrame | None = None
):
    """Horizontal bars of per-group forgetting F_g (pp), one panel per condition and forgotten task that has groups,
    groups sorted by F_g: the mean over seeds, each seed's value as a dot, and a 95% interval: the cluster bootstrap
    over seeds and examples (``tables.pooled_intervals``) where ``flips`` (``example_forgetting_frame``) has every
    seed's per-example forgetting, else the t-interval over seeds (one run: its paired bootstrap). The dashed line is
    the task's overall F, so bars beyond it are groups forgotten more than the task as a whole. Groups below the
    minimum eval size in some seed are drawn grey and marked (n < min); ``kinds``: default all."""
    kinds = tuple(kinds or group_kinds(forgetting))
    kept = forgetting[forgetting["group_kind"].isin(("all", *kinds))]
    summary = seed_summary(kept)
    summary = pooled_intervals(summary, flips if flips is not None else pd.DataFrame())
    small = kept.groupby(["condition", "task", "group_kind", "group"])["small"].any().rename("small")
    summary = summary.merge(small.reset_index(), on=["condition", "task", "group_kind", "group"])
    groups = summary.groupby(["condition", "task"], sort=True)
    panels = [(key, part) for key, part in groups if (part["group_kind"] != "all").any()]
    rows = max((len(part) for _, part in panels), default=1)
    columns = min(4, max(1, len(panels)))
    lines = -(-max(1, len(panels)) // columns)
    size = (5.6 * columns, lines * (0.32 * rows + 1.8) + 0.6)
    fig, axes = plt.subplots(lines, columns, figsize=size, squeeze=False, layout="constrained")  # makes room for titles
    colours = dict(zip(sorted(kinds), sns.color_palette(PALETTE, len(kinds)))) | {"all": (0.2, 0.2, 0.2)}
    for ax, ((condition, task), panel) in zip(axes.flat, panels):
        panel = apart(all_first(panel, "F"))
        tiny = panel["small"].to_numpy()
        labels = [f"{label} (n < min)" if t else label for label, t in zip(group_labels(panel), tiny)]
        bar_colours = [(0.8, 0.8, 0.8) if t else colours[kind] for kind, t in zip(panel["group_kind"], tiny)]
        ax.barh(np.arange(len(panel)), panel["F"], color=bar_colours, height=0.8)
        lo = (panel["F"] - panel["F_lo"]).clip(lower=0).fillna(0)
        hi = (panel["F_hi"] - panel["F"]).clip(lower=0).fillna(0)
        ax.errorbar(panel["F"], np.arange(len(panel)), xerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=1)
        if panel["seeds"].max() > 1:
            position = {key: y for y, key in enumerate(zip(panel["group_kind"], panel["group"]))}
            runs = kept[(kept["condition"] == condition) & (kept["task"] == task)]
            y = [position.get(key) for key in zip(runs["group_kind"], runs["group"])]
            ax.scatter(runs["F"], y, s=9, color="black", alpha=0.6, zorder=3)
        ax.set_yticks(np.arange(len(panel)), labels)
        ax.invert_yaxis()
        overall = float(panel.loc[panel["group_kind"] == "all", "F"].iloc[0])
        ax.axvline(overall, color="black", ls="--", lw=1)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlim(-105, 105)
        heading = wrap(f"{condition}: forgetting of {task}", 30)  # no wider than the panel
        seeds = int(panel["seeds"].max())
        ax.set_title(f"{heading}\n(all: {overall:+.1f} pp, {seeds} seed{'s' if seeds > 1 else ''})", fontsize=10)
        ax.set_xlabel("forgetting F_g (pp)")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    methods = set(summary["interval"])
    if methods == {"cluster bootstrap"}:
        whiskers = "95% cluster bootstrap over seeds and their examples"
    else:
        whiskers = "95% t-interval over seeds, clipped to -100..+100 pp (one run: its paired bootstrap)"
        if "cluster bootstrap" in methods:
            whiskers += "; cluster bootstrap where every seed has per-example counts"
    how = f"bars: mean over seeds; dots: single seeds; whiskers: {whiskers}; dashed: F of all examples"
    how += "; grey: fewer eval examples than the minimum in some seed" if summary["small"].any() else ""
    title = wrap(f"Per-group forgetting of the first task after the second stage. {how}", 62 * columns)
    fig.suptitle(title, fontsize=10)  # wrapped to the panels' width, so it is never cut off
    return fig


FLIPS = {"forgotten": "forgotten (right → wrong)", "learned": "learned (wrong → right)"}


def example_forgetting_figure(frame: pd.DataFrame, kinds: tuple[str, ...] | None = None):
    """Per-example forgetting (``example_forgetting_frame``), one panel per condition and forgotten task: for each
    group the share of its examples forgotten (right at the stage that trained the task, wrong at the last) and
    learned (the other way), in pp, the mean over seeds, and as a black line across both bars the share a uniform
    guess over each example's options would flip (either way). Groups are sorted by forgotten share beyond chance
    within their kind; groups below the minimum eval size are left out. Whiskers stay within 0..100 pp by
    construction: the range over seeds, or for a group in a single run the 95% Wilson interval over its examples."""
    kinds = tuple(kinds or group_kinds(frame))
    kept = frame[frame["group_kind"].isin(("all", *kinds)) & ~frame["small"].astype(bool)]
    panels = list(kept.groupby(["condition", "task"], sort=True))
    columns = min(3, max(1, len(panels)))
    counts = [part.groupby(["group_kind", "group"]).ngroups for _, part in panels] or [1]
    rows = [max(counts[i : i + columns]) for i in range(0, len(counts), columns)]  # groups of each line of panels
    size = (6.4 * columns, 0.42 * sum(rows) + 1.6 * len(rows) + 1.0)  # bars equally thick in every panel
    fig, axes = plt.subplots(len(rows), columns, figsize=size, squeeze=False, layout="constrained", height_ratios=rows)
    palette = sns.color_palette(PALETTE)
    colours = {"forgotten": palette[3], "learned": palette[0]}  # vermillion, blue
    for index, (ax, ((condition, task), part)) in enumerate(zip(axes.flat, panels)):
        by_group = part.groupby(["group_kind", "group"])
        flips = by_group[list(FLIPS)]
        panel = (
            by_group.mean(numeric_only=True).join(flips.min().add_suffix("_min")).join(flips.max().add_suffix("_max"))
        )
        panel = panel.assign(seeds=by_group["seed"].nunique())
        panel = all_first(panel.reset_index(), "forgotten_adj")
        labels = group_labels(panel) + [f" (n={n:.0f})" for n in panel["n"]]
        long = panel.assign(label=labels).melt("label", list(FLIPS), var_name="flip", value_name="share")
        style = {"order": labels, "hue_order": list(FLIPS), "palette": colours, "errorbar": None, "legend": False}
        sns.barplot(long, x="share", y="label", hue="flip", ax=ax, **style)
        one_run = panel["seeds"] == 1
        for container, flip in zip(ax.containers, FLIPS):
            y = [bar.get_y() + bar.get_height() / 2 for bar in container]
            lo, hi = wilson(np.round(panel[flip] * panel["n"] / 100), panel["n"].round())
            lo, hi = np.where(one_run, lo, panel[f"{flip}_min"]), np.where(one_run, hi, panel[f"{flip}_max"])
            ax.errorbar(panel[flip], y, xerr=[panel[flip] - lo, hi - panel[flip]], fmt="none", ecolor="black", lw=1)
        y = np.arange(len(panel))  # each group's two bars fill y +- 0.4
        ax.vlines(panel["expected_flip"], y - 0.4, y + 0.4, color="black", lw=1.5, zorder=3)
        ax.set_xlim(0, None)
        ax.set_ylim(rows[index // columns] - 0.5, -0.5)  # a panel with fewer groups than its line leaves space below
        seeds, whole = int(panel["seeds"].max()), panel.iloc[0]
        stages = f"stage {part['trained_stage'].iloc[0]} → {part['later_stage'].iloc[0]}"
        shares = f"all: forgotten {whole['forgotten']:.1f}, learned {whole['learned']:.1f}, chance "
        shares += f"{whole['expected_flip']:.1f} pp; {seeds} seed{'s' if seeds > 1 else ''}"
        ax.set_title(f"{wrap(condition, 60)}: {task}, {stages}\n({shares})", fontsize=10)
        ax.set_xlabel("share of the group's examples (pp)")
        ax.set_ylabel("")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in colours.values()]
    handles.append(plt.Line2D([], [], marker="|", ls="", color="black", markersize=12, mew=1.5))
    chance = "chance: a uniform guess over each example's options"
    fig.legend(handles, [*FLIPS.values(), chance], loc="outside lower center", ncol=min(3, columns), frameon=False)
    title = "Per-example forgetting from the stage that trained the task to the last stage; bars: mean over seeds; "
    title += "whiskers: range over seeds (a group in one run: 95% Wilson interval over its examples)"
    fig.suptitle(wrap(title, 90 * columns), fontsize=10)  # no wider than the panels
    return fig


def learning_figure(table: pd.DataFrame):
    """What each regime taught each task (``tables.learning_table``): one panel per task, one row per regime (method,
    answer format, learning rate), an arrow from the base model's balanced accuracy to the trained stage's (each
    regime's own base: letter and text scoring differ). The grey tick is that base plus the task role's target; a
    red arrow is a gain that left a BBQ context below the base model's, labelled with that context's loss."""
    steps = int(table["steps"].mode().iloc[0])  # the regimes compared at one stage length; curves show the others
    regime = ["task", "finetune", "answer", "mixture", "lr", "steps", "seed"]
    table = table[table["steps"] == steps].drop_duplicates(regime)  # a study may repeat another's grid point
    tasks = list(dict.fromkeys(table.sort_values(["role", "task"], ascending=[False, True])["task"]))
    columns = min(3, max(1, len(tasks)))
    lines = -(-len(tasks) // columns)
    rows = table.groupby("task").size().max()
    fig, axes = plt.subplots(lines, columns, figsize=(5.4 * columns, lines * (0.45 * rows + 1.6)), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        part = table[table["task"] == task].sort_values(["finetune", "answer", "mixture", "lr"]).reset_index(drop=True)
        for y, row in part.iterrows():
            honest = row["learned"] >= row["gain"] - 1e-9
            colour = "tab:blue" if honest else "tab:red"
            ax.annotate(
                "",
                xy=(row["balanced_acc_trained"], y),
                xytext=(row["balanced_acc_base"], y),
                arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.6},
            )
            note = f"{row['learned']:+.1f} pp" if honest else f"a context {row['learned']:+.1f} pp below base"
            if not pd.isna(row["target"]):  # where this regime's base model plus the role's target lies
                ax.plot([row["balanced_acc_base"] + row["target"]] * 2, [y - 0.3, y + 0.3], color="grey", lw=1.2)
            ax.text(
                max(row["balanced_acc_trained"], row["balanced_acc_base"]) + 2,
                y,
                note,
                va="center",
                fontsize=8,
                color=colour,
            )
        labels = [
            f"{r.finetune}, {r.answer}, lr {r.lr:g}" + (f"\n{r.mixture}" if r.mixture else "")
            for r in part.itertuples()
        ]
        ax.set_yticks(range(len(part)), labels)
        ax.set_ylim(len(part) - 0.5, -0.5)
        ax.set_xlim(0, 125)  # room for the labels right of the arrows
        role, target = part["role"].iloc[0], part["target"].iloc[0]
        ax.set_title(wrap(f"{task} ({role}; grey tick: base + {target:g} pp)", 48), fontsize=10)
        ax.set_xlabel("balanced accuracy (%), base → trained")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    examples = int(table["train_examples"].max())
    title = f"What one stage teaches its task: SmolLM2-135M-Instruct, {steps} steps of 8, up to {examples} examples"
    fig.suptitle(wrap(title, 62 * columns), fontsize=10)
    fig.tight_layout()
    return fig


def learning_curves_figure(table: pd.DataFrame):
    """Balanced accuracy (%) against stage length for each task and regime that ran at several lengths
    (``tables.learning_table``), from the base model (0 steps) on; one panel per regime, one line per task, each
    task's target (its base model plus the role's target) as a dotted line of its colour. ``None`` when no regime
    ran at two lengths."""
    keys = ["finetune", "answer", "mixture", "lr"]
    regimes = [key for key, part in table.groupby(keys, sort=True) if part["steps"].nunique() > 1]
    if not regimes:
        return None
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.4 * len(regimes), 4.2), squeeze=False)
    tasks = sorted(table["task"].unique())
    colours = dict(zip(tasks, sns.color_palette(PALETTE, len(tasks))))
    for ax, regime in zip(axes.flat, regimes):
        part = table[(table[keys] == pd.Series(regime, index=keys)).all(axis=1)]
        for task, runs in part.groupby("task", sort=True):
            runs = runs.drop_duplicates(["steps", "seed"]).sort_values("steps")
            x = [0, *runs["steps"]]
            y = [runs["balanced_acc_base"].iloc[0], *runs["balanced_acc_trained"]]
            ax.plot(x, y, marker="o", color=colours[task], label=task)
            ax.axhline(y[0] + runs["target"].iloc[0], color=colours[task], ls=":", lw=1)
        finetune, answer, mixture, lr = regime
        ax.set_title(
            wrap(f"{finetune}, {answer} answers, lr {lr:g}" + (f", {mixture}" if mixture else ""), 45), fontsize=10
        )
        ax.set_xlabel("optimizer steps of 8 examples (0 = base model)")
        ax.set_ylabel("balanced accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Learning curves: the trained stage's balanced accuracy; dotted: each task's target", fontsize=10)
    fig.tight_layout()
    return fig


def all_first(panel: pd.DataFrame, by: str) -> pd.DataFrame:
    """The ``all`` row, then each group kind's groups by ``by``, largest first."""
    groups = panel[panel["group_kind"] != "all"].sort_values(["group_kind", by], ascending=[True, False])
    return pd.concat([panel[panel["group_kind"] == "all"], groups], ignore_index=True)


def apart(panel: pd.DataFrame) -> pd.DataFrame:
    """``all_first``'s order with, within each group kind, the small groups after the ones that count."""
    kinds = {kind: i for i, kind in enumerate(dict.fromkeys(panel["group_kind"]))}
    order = sorted(range(len(panel)), key=lambda i: (kinds[panel["group_kind"].iloc[i]], bool(panel["small"].iloc[i])))
    return panel.iloc[order].reset_index(drop=True)


def group_labels(panel: pd.DataFrame) -> np.ndarray:
    """``kind: group`` (shortened) for each row, ``all examples`` for the whole split."""
    names = panel["group_kind"] + ": " + panel["group"].astype(str).map(short)
    return np.where(panel["group_kind"] == "all", "all examples", names)


def accuracy_figure(evals: pd.DataFrame):
    """Accuracy (%) of each task after each stage (0 = base model), one panel per condition: the mean over seeds
    with the range over seeds as a band (with 2-3 seeds a bootstrap or t band would claim too much or too little);
    a condition with a single run gets 95% Wilson intervals over its eval examples instead."""
    frame = evals[evals["group_kind"] == "all"]
    one_run = frame.groupby(["condition", "task", "stage"]).size().groupby(level="condition").max() == 1
    style = {"kind": "line", "marker": "o", "palette": PALETTE, "height": 3.2, "aspect": 1.1}
    style["facet_kws"] = {"sharey": True}
    conditions = sorted(frame["condition"].unique())
    grid = sns.relplot(
        data=frame,
        x="stage",
        y="acc_pp",
        hue="task",
        col="condition",
        col_order=conditions,
        col_wrap=min(4, len(conditions)),
        errorbar=("pi", 100),
        **style,
    )
    colours = dict(zip(sorted(frame["task"].unique()), sns.color_palette(PALETTE)))
    for condition, ax in grid.axes_dict.items():
        ax.set_title(wrap(condition, 45), fontsize=10)
        if one_run[condition]:
            for task, part in frame[frame["condition"] == condition].groupby("task"):
                lo, hi = wilson(part["correct"].to_numpy(), part["n"].to_numpy())
                yerr = [part["acc_pp"] - lo, hi - part["acc_pp"]]
                ax.errorbar(part["stage"], part["acc_pp"], yerr=yerr, fmt="none", ecolor=colours[task], capsize=3)
    grid.set_axis_labels("stage (0 = base model)", "accuracy (%)")
    for ax in grid.axes.flat:
        ax.set_xticks(sorted(frame["stage"].unique()))
    how = [] if one_run.all() else ["line: mean over seeds, band: range over seeds"]
    how += ["one run: 95% Wilson intervals over eval examples"] if one_run.any() else []
    grid.figure.suptitle(f"Accuracy on every task across the chain ({'; '.join(how)})", fontsize=11)
    grid.tight_layout()  # FacetGrid's own leaves room for the legend beside the panels; then room for the title
    grid.figure.subplots_adjust(top=grid.figure.subplotpars.top - 0.3 / grid.figure.get_figheight())
    return grid.figure


def wilson(correct: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of a proportion (scipy's ``binomtest(k, n).proportion_ci``), in percent; ``z`` is
    the standard normal quantile of the interval (1.96: 95%)."""
    from scipy import stats

    level = 2 * stats.norm.cdf(z) - 1  # scipy takes the confidence level and finds z from it again
    bounds = [
        stats.binomtest(int(k), int(m)).proportion_ci(level, method="wilson") if m > 0 else (np.nan, np.nan)
        for k, m in zip(np.atleast_1d(correct), np.atleast_1d(n))
    ]
    low, high = np.asarray(bounds, dtype=float).reshape(-1, 2).T
    return 100 * low, 100 * high


def save(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def forgetting_heatmap(
    forgetting: pd.DataFrame, kinds: tuple[str, ...] | None = None, flips: pd.DataFrame | None = None
):
    """Per-group forgetting F_g (pp, mean over seeds) as a group x condition heatmap, each cell annotated with
    its value and its 95% interval: the cluster bootstrap over seeds and examples where ``flips``
    (``example_forgetting_frame``) has the seeds' per-example counts (``tables.pooled_intervals``), else over
    seeds (Student-t, clipped to -100..+100 pp) or a single run's paired bootstrap; groups below the minimum eval
    size in some seed are left out; ``None`` when no run has groups."""
    small = forgetting.groupby(["condition", "task", "group_kind", "group"])["small"].transform("any").astype(bool)
    chosen = forgetting["group_kind"].isin(kinds or group_kinds(forgetting)) & ~small
    if not chosen.any():
        return None
    frame = pooled_intervals(seed_summary(forgetting[chosen]), flips if flips is not None else pd.DataFrame())
    frame["group"] = frame["group_kind"] + ": " + frame["group"].astype(str).map(short)
    frame["column"] = frame["condition"].map(lambda label: wrap(label, 26)) + "\n(forgets " + frame["task"] + ")"
    means = frame.pivot_table(index="group", columns="column", values="F", aggfunc="mean")
    low = frame.pivot_table(index="group", columns="column", values="F_lo", aggfunc="mean")
    high = frame.pivot_table(index="group", columns="column", values="F_hi", aggfunc="mean")
    labels = means.copy().astype(object)
    for row in means.index:
        for column in means.columns:
            value, lo, hi = means.loc[row, column], low.get(column, {}).get(row), high.get(column, {}).get(row)
            interval = f"\n[{round(lo):+d}, {round(hi):+d}]" if lo is not None and pd.notna(lo) and pd.notna(hi) else ""
            labels.loc[row, column] = "" if pd.isna(value) else f"{value:+.1f}{interval}"
    fig, ax = plt.subplots(figsize=(2.4 * len(means.columns) + 3, 0.55 * len(means) + 2.2))
    limit = float(np.nanmax(np.abs(means.to_numpy()))) or 1.0
    colour_bar = {"label": "forgetting F_g (pp)"}
    sns.heatmap(
        means,
        annot=labels,
        fmt="",
        cmap="vlag",
        center=0,
        vmin=-limit,
        vmax=limit,
        ax=ax,
        cbar_kws=colour_bar,
        annot_kws={"fontsize": 7},
    )
    ax.tick_params(axis="x", labelrotation=0, labelsize=8)  # the labels are wrapped to fit their column
    ax.set_xlabel("condition")
    ax.set_ylabel("group")
    if set(frame["interval"]) == {"cluster bootstrap"}:
        how = "the 95% cluster bootstrap over seeds and their examples"
    else:
        how = "the 95% cluster bootstrap where every seed has per-example counts,\nelse the t-interval over seeds "
        how += "clipped to -100..+100 pp (one run: its paired bootstrap)"
    ax.set_title(f"Per-group forgetting (pp): mean over seeds; in brackets {how}", fontsize=10)
    fig.tight_layout()
    return fig


def short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 2] + "…"


def wrap(label: str, width: int) -> str:
    """A condition label over several lines of at most ``width`` characters, broken at spaces."""
    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False)


def group_kinds(forgetting: pd.DataFrame) -> list[str]:
    return [kind for kind in dict.fromkeys(forgetting["group_kind"]) if kind != "all"]


def asymmetry_figure(asymmetry: pd.DataFrame, seeds: pd.DataFrame | None = None):
    """Order asymmetry F_S(S→C) − F_C(C→S) per setting x safety x capability pair (pp): the mean over seeds with
    its 95% t-interval over seeds (clipped to the possible range), and, given ``seeds`` (``asymmetry_seeds``), each
    seed's difference as a dot."""
    fig, ax = plt.subplots(figsize=(1.4 * len(asymmetry) + 3, 3.8))
    condition = asymmetry.get("condition", pd.Series("", index=asymmetry.index)).fillna("")
    labels = asymmetry["safety"] + " / " + asymmetry["capability"]
    labels += [f"\n{wrap(setting, 24)}" if setting else "" for setting in condition]
    if "seeds" in asymmetry:
        labels += [f"\n({n} seed{'s' if n != 1 else ''})" for n in asymmetry["seeds"]]
    ax.bar(labels, asymmetry["asymmetry"], color=sns.color_palette(PALETTE, 1) * len(asymmetry))
    lo = (asymmetry["asymmetry"] - asymmetry["asymmetry_lo"]).fillna(0).clip(lower=0)
    hi = (asymmetry["asymmetry_hi"] - asymmetry["asymmetry"]).fillna(0).clip(lower=0)
    ax.errorbar(np.arange(len(asymmetry)), asymmetry["asymmetry"], yerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    if seeds is not None:
        position = {key: x for x, key in enumerate(zip(condition, asymmetry["safety"], asymmetry["capability"]))}
        x = [position.get(key) for key in zip(seeds["condition"].fillna(""), seeds["safety"], seeds["capability"])]
        ax.scatter(x, seeds["asymmetry"], s=12, color="black", alpha=0.6, zorder=3, label="one seed")
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("safety / capability pair")
    ax.set_ylabel("F_S(S→C) − F_C(C→S) (pp)")
    ax.set_title(
        "Order asymmetry: safety forgotten more than capability?\nbars: mean over seeds; whiskers: 95% "
        "t-interval over seeds (clipped to ±200 pp); dots: single seeds",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def replay_figure(recovery: pd.DataFrame):
    """Replay ratio r vs the safety accuracy the replay stage recovered and the capability accuracy it cost (pp),
    one panel per condition (without the ratio), with 95% t-intervals over seeds clipped to -100..+100 pp."""
    panels = list(recovery.groupby("condition", sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False, sharey=True)
    series = [
        ("safety_recovered_pp", "recovered_lo", "recovered_hi", "safety accuracy recovered"),
        ("capability_change_pp", "capability_lo", "capability_hi", "capability accuracy change"),
    ]
    for ax, (condition, part) in zip(axes[0], panels):
        for (column, lo, hi, label), colour in zip(series, sns.color_palette(PALETTE, 2)):
            low = (part[column] - part[lo]).fillna(0).clip(lower=0)
            high = (part[hi] - part[column]).fillna(0).clip(lower=0)
            ax.errorbar(part["ratio"], part[column], yerr=[low, high], marker="o", capsize=3, color=colour, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        lost = part["safety_lost_pp"].mean()
        heading = wrap(f"{condition} → replay stage", 60)
        ax.set_title(f"{heading}\n(safety lost before it: {lost:+.1f} pp)", fontsize=9)
        ax.set_xlabel("replay ratio r (share of safety data in the last stage)")
    axes[0][0].set_ylabel("accuracy change in the replay stage (pp)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Replay: safety recovered vs capability kept (mean over seeds, 95% t-interval over seeds)", fontsize=9)
    fig.tight_layout()
    return fig


def mitigation_figure(table: pd.DataFrame, condition: str):
    """One condition's mitigations (``findings.mitigation_comparison``) side by side, one panel per measure: each
    mitigation's mean over seeds with its 95% t-interval over seeds, the plain chains' mean dashed."""
    part = table[table["condition"] == condition]
    measures = [m for m in ("F", "BF (context)", "BF (target)", "forgotten_adj") if m in set(part["measure"])]
    measures += sorted(m for m in set(part["measure"]) if m.endswith("accuracy"))
    kinds = dict(zip(part["mitigation"], part["kind"]))
    names = sorted(kinds, key=lambda name: (kinds[name] != "none", kinds[name] != "replay", name))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.0 * len(measures) + 1.5, 0.45 * len(names) + 1.8))
    for ax, measure in zip(np.atleast_1d(axes), measures):
        cells = part[part["measure"] == measure].set_index("mitigation").reindex(names)
        y = np.arange(len(names))
        low = (cells["mean"] - cells["lo"]).fillna(0).clip(lower=0)
        high = (cells["hi"] - cells["mean"]).fillna(0).clip(lower=0)
        ax.errorbar(cells["mean"], y, xerr=[low, high], fmt="o", color=sns.color_palette(PALETTE, 1)[0], capsize=3)
        plain = cells[cells["kind"] == "none"]  # plain chains, or a replay stage at r = 0 (training longer)
        if len(plain) and not pd.isna(plain["mean"].iloc[0]):
            ax.axvline(plain["mean"].iloc[0], color="grey", ls="--", lw=0.8)
        ax.set_yticks(y, names if ax is np.atleast_1d(axes)[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_xlabel(f"{measure} (pp)", fontsize=9)
    seeds = int(part["seeds"].max())
    fig.suptitle(
        f"{condition}: mitigations after the first stage (mean over up to {seeds} seeds, 95% t-interval over seeds; "
        "dashed: plain chains, or a last stage without replay)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def curvature_figure(points: pd.DataFrame, correlation: dict):
    """Top Hessian eigenvalue after the first stage vs that task's forgetting. Left, the values (log scale where
    all eigenvalues are positive), coloured by task, marked by mitigation where there are several, ringed where the
    estimate had not converged. Right, their ranks over all runs with the least-squares line through them: their
    correlation is Spearman's rho (average ranks for ties, as scipy), the statistic the title gives with its
    bootstrap interval; without ties it is also the line's slope."""
    fig, (raw, ranked) = plt.subplots(1, 2, figsize=(11.0, 4.4))
    style = "mitigation" if "mitigation" in points and points["mitigation"].nunique() > 1 else None
    sns.scatterplot(data=points, x="top_eigenvalue", y="F", hue="task", style=style, palette=PALETTE, ax=raw, s=40)
    if "converged" in points and points["converged"].eq(False).any():
        loose = points[points["converged"].eq(False)]
        raw.scatter(loose["top_eigenvalue"], loose["F"], s=150, facecolors="none", edgecolors="black", lw=0.8)
        raw.scatter([], [], s=150, facecolors="none", edgecolors="black", lw=0.8, label="not converged")
        raw.legend(fontsize=8)
    if len(points) and (points["top_eigenvalue"] > 0).all():
        raw.set_xscale("log")  # eigenvalues span orders of magnitude; ranks do not care
        raw.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 10, not 10^1
        raw.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    raw.set_xlabel("top Hessian eigenvalue at the end of stage 1")
    raw.set_ylabel("forgetting of the stage-1 task (pp)")
    x, y = points["top_eigenvalue"].rank(), points["F"].rank()
    sns.scatterplot(x=x, y=y, hue=points["task"], palette=PALETTE, ax=ranked, s=40, legend=False)
    rho = correlation.get("spearman")
    if rho is not None:
        slope, intercept = np.polyfit(x, y, 1)
        ends = np.array([x.min(), x.max()])
        ranked.plot(ends, intercept + slope * ends, color="0.4", lw=1.5)
    ranked.set_xlabel("rank of the top eigenvalue")
    ranked.set_ylabel("rank of the forgetting")
    title = "Curvature vs forgetting"
    if rho is not None:
        interval = f" [{correlation['lo']:.2f}, {correlation['hi']:.2f}]" if correlation.get("lo") is not None else ""
        title = (
            f"Sharper minima, more forgetting? Spearman rho = {rho:.2f}{interval} (95% bootstrap), n = "
            f"{correlation['n']} runs: the correlation of the ranks (right)"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pareto_figure(trials: pd.DataFrame, objectives: tuple[str, str], directions: tuple[str, str]):
    """Trials of a two-objective study; the Pareto-optimal ones are highlighted and joined."""
    x, y = objectives
    front = pareto_mask(trials[[x, y]].to_numpy(), directions)
    colours = sns.color_palette(PALETTE, 2)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter(trials.loc[~front, x], trials.loc[~front, y], color=colours[0], alpha=0.6, label="trial")
    best = trials[front].sort_values(x)
    ax.plot(best[x], best[y], marker="D", color=colours[1], label="Pareto front")
    ax.set_xlabel(f"{x} ({directions[0]})")
    ax.set_ylabel(f"{y} ({directions[1]})")
    ax.set_title("Safety forgetting vs capability: Pareto front of the study", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pareto_mask(values: np.ndarray, directions: tuple[str, ...]) -> np.ndarray:
    """True for points no other point dominates (at least as good on every objective, better on one)."""
    signed = values * np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    mask = np.ones(len(signed), dtype=bool)
    for i, point in enumerate(signed):
        dominated = np.all(signed <= point, axis=1) & np.any(signed < point, axis=1)
        mask[i] = not dominated.any()
    return mask
