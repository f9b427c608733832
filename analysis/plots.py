"""Seaborn figures of chains: per-group forgetting per order, and accuracy across stages.

Every figure has labelled axes in percentage points, interval bars where intervals exist, a caption-ready
title and the colour-blind-safe palette.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.tables import seed_summary

PALETTE = "colorblind"


def group_forgetting_figure(forgetting: pd.DataFrame, kinds: tuple[str, ...] | None = None):
    """Horizontal bars of per-group forgetting F_g (pp), one panel per order and forgotten task that has groups:
    the mean over seeds with its 95% interval over seeds (a single run: its paired-bootstrap interval). The
    dashed line is the task's overall F, so bars beyond it are groups forgotten more than the task as a whole.
    Groups below the minimum eval size are left out (the tables keep them); ``kinds``: default all."""
    kinds = tuple(kinds or group_kinds(forgetting))
    kept = forgetting[forgetting["group_kind"].isin(("all", *kinds)) & ~forgetting["small"].astype(bool)]
    summary = seed_summary(kept)
    panels = [(key, part) for key, part in summary.groupby(["order", "task"], sort=True) if (part["group_kind"] != "all").any()]
    rows = max((len(part) for _, part in panels), default=1)
    columns = min(4, max(1, len(panels)))
    lines = -(-max(1, len(panels)) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, lines * (0.32 * rows + 1.6)), squeeze=False)
    colours = dict(zip(kinds, sns.color_palette(PALETTE, len(kinds)))) | {"all": (0.45, 0.45, 0.45)}
    for ax, ((order, task), panel) in zip(axes.flat, panels):
        panel = pd.concat([panel[panel["group_kind"] == "all"], panel[panel["group_kind"] != "all"].sort_values(["group_kind", "F"], ascending=[True, False])])
        names = panel["group_kind"] + ": " + panel["group"].astype(str).map(short)
        labels = np.where(panel["group_kind"] == "all", "all examples", names)
        sns.barplot(x=panel["F"].to_numpy(), y=labels, hue=panel["group_kind"].to_numpy(), palette=colours, dodge=False,
                    errorbar=None, ax=ax, legend=False)  # fmt: skip
        lo = (panel["F"] - panel["F_lo"]).clip(lower=0).fillna(0)
        hi = (panel["F_hi"] - panel["F"]).clip(lower=0).fillna(0)
        ax.errorbar(panel["F"], np.arange(len(panel)), xerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=1)
        overall = float(panel.loc[panel["group_kind"] == "all", "F"].iloc[0])
        ax.axvline(overall, color="black", ls="--", lw=1, label=f"all: {overall:+.1f} pp")
        ax.axvline(0, color="grey", lw=0.8)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{order}: forgetting of {task} ({int(panel['seeds'].max())} seeds)", fontsize=10)
        ax.set_xlabel("forgetting F_g (pp, 95% CI)")
        ax.set_ylabel("")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Per-group forgetting of the first task after the second stage", fontsize=11)
    fig.tight_layout()
    return fig


def accuracy_figure(evals: pd.DataFrame):
    """Accuracy (%) of each task after each stage (0 = base model), one panel per order. With several seeds the
    band is seaborn's 95% interval over seeds; a single run gets 95% Wilson intervals over its eval examples."""
    frame = evals[evals["group_kind"] == "all"]
    single = frame.groupby(["order", "task", "stage"]).size().max() == 1
    grid = sns.relplot(
        data=frame, x="stage", y="acc_pp", hue="task", col="order", col_wrap=min(4, frame["order"].nunique()),
        kind="line", marker="o", palette=PALETTE, height=3.2, aspect=1.1, facet_kws={"sharey": True},
        errorbar=None if single else ("ci", 95),
    )  # fmt: skip
    colours = dict(zip(sorted(frame["task"].unique()), sns.color_palette(PALETTE)))
    if single:
        for order, ax in grid.axes_dict.items():
            for task, part in frame[frame["order"] == order].groupby("task"):
                lo, hi = wilson(part["correct"].to_numpy(), part["n"].to_numpy())
                ax.errorbar(part["stage"], part["acc_pp"], yerr=[part["acc_pp"] - lo, hi - part["acc_pp"]], fmt="none",
                            ecolor=colours[task], capsize=3)  # fmt: skip
    grid.set_axis_labels("stage (0 = base model)", "accuracy (%)")
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.set_xticks(sorted(frame["stage"].unique()))
    grid.figure.suptitle("Accuracy on every task across the chain (95% intervals)", fontsize=11)
    grid.figure.tight_layout()
    return grid.figure


def wilson(correct: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of a proportion, in percent."""
    p = correct / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return 100 * (centre - half), 100 * (centre + half)


def save(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def forgetting_heatmap(forgetting: pd.DataFrame, kinds: tuple[str, ...] | None = None):
    """Per-group forgetting F_g (pp, mean over seeds) as a group x order heatmap, each cell annotated with
    its value and, where seeds or the bootstrap give one, its 95% interval; groups below the minimum eval size
    are left out; ``None`` when no run has groups."""
    chosen = forgetting["group_kind"].isin(kinds or group_kinds(forgetting)) & ~forgetting["small"].astype(bool)
    frame = forgetting[chosen].copy()
    if frame.empty:
        return None
    frame["group"] = frame["group_kind"] + ": " + frame["group"].astype(str).map(short)
    frame = seed_summary(frame)  # the interval is over seeds where there are several
    frame["column"] = frame["order"] + "\n(forgets " + frame["task"] + ")"
    means = frame.pivot_table(index="group", columns="column", values="F", aggfunc="mean")
    low = frame.pivot_table(index="group", columns="column", values="F_lo", aggfunc="mean")
    high = frame.pivot_table(index="group", columns="column", values="F_hi", aggfunc="mean")
    labels = means.copy().astype(object)
    for row in means.index:
        for column in means.columns:
            value, lo, hi = means.loc[row, column], low.get(column, {}).get(row), high.get(column, {}).get(row)
            interval = f"\n[{lo:+.0f}, {hi:+.0f}]" if lo is not None and pd.notna(lo) and pd.notna(hi) else ""
            labels.loc[row, column] = "" if pd.isna(value) else f"{value:+.1f}{interval}"
    fig, ax = plt.subplots(figsize=(2.4 * len(means.columns) + 3, 0.55 * len(means) + 1.8))
    limit = float(np.nanmax(np.abs(means.to_numpy()))) or 1.0
    sns.heatmap(means, annot=labels, fmt="", cmap="vlag", center=0, vmin=-limit, vmax=limit, ax=ax,
                cbar_kws={"label": "forgetting F_g (pp)"}, annot_kws={"fontsize": 7})  # fmt: skip
    ax.set_xlabel("order")
    ax.set_ylabel("group")
    ax.set_title("Per-group forgetting (pp; mean over seeds, 95% interval in brackets)", fontsize=10)
    fig.tight_layout()
    return fig


def short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 2] + "…"


def group_kinds(forgetting: pd.DataFrame) -> list[str]:
    return [kind for kind in dict.fromkeys(forgetting["group_kind"]) if kind != "all"]


def asymmetry_figure(asymmetry: pd.DataFrame):
    """Order asymmetry F_S(S→C) − F_C(C→S) per safety x capability pair (pp) with its 95% interval over seeds."""
    fig, ax = plt.subplots(figsize=(1.2 * len(asymmetry) + 3, 3.4))
    labels = asymmetry["safety"] + " / " + asymmetry["capability"]
    colours = sns.color_palette(PALETTE, 1) * len(asymmetry)
    ax.bar(labels, asymmetry["asymmetry"], color=colours)
    lo = (asymmetry["asymmetry"] - asymmetry["asymmetry_lo"]).fillna(0).clip(lower=0)
    hi = (asymmetry["asymmetry_hi"] - asymmetry["asymmetry"]).fillna(0).clip(lower=0)
    ax.errorbar(np.arange(len(asymmetry)), asymmetry["asymmetry"], yerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    for x, (value, seeds) in enumerate(zip(asymmetry["asymmetry"], asymmetry.get("seeds", [None] * len(asymmetry)))):
        if seeds is not None:
            ax.annotate(f"{seeds} seed{'s' if seeds != 1 else ''}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("safety / capability pair")
    ax.set_ylabel("F_S(S→C) − F_C(C→S) (pp)")
    ax.set_title("Order asymmetry: safety forgotten more than capability? (95% CI over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def replay_figure(recovery: pd.DataFrame):
    """Replay ratio r vs the safety accuracy the replay stage recovered and the capability accuracy it cost (pp),
    one panel per chain."""
    panels = list(recovery.groupby("order", sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False, sharey=True)
    colours = sns.color_palette(PALETTE, 2)
    for ax, (order, part) in zip(axes[0], panels):
        for (column, lo, hi, label), colour in zip(
            [("safety_recovered_pp", "recovered_lo", "recovered_hi", "safety accuracy recovered"),
             ("capability_change_pp", "capability_lo", "capability_hi", "capability accuracy change")], colours,
        ):  # fmt: skip
            low = (part[column] - part[lo]).fillna(0).clip(lower=0)
            high = (part[hi] - part[column]).fillna(0).clip(lower=0)
            ax.errorbar(part["ratio"], part[column], yerr=[low, high], marker="o", capsize=3, color=colour, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        lost = part["safety_lost_pp"].mean()
        ax.set_title(f"{order} → replay stage (safety lost before it: {lost:+.1f} pp)", fontsize=9)
        ax.set_xlabel("replay ratio r (share of safety data in the last stage)")
    axes[0][0].set_ylabel("accuracy change in the replay stage (pp)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Replay: safety recovered vs capability kept (95% CI over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def curvature_figure(points: pd.DataFrame, correlation: dict):
    """Top Hessian eigenvalue after the first stage vs that task's forgetting, coloured by task (marked by
    mitigation where there are several), with a least-squares fit over all points and its 95% band; the title
    gives Spearman's rho with its bootstrap interval."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.regplot(data=points, x="top_eigenvalue", y="F", ax=ax, color="0.4", ci=95, scatter=False)
    style = "mitigation" if "mitigation" in points and points["mitigation"].nunique() > 1 else None
    sns.scatterplot(data=points, x="top_eigenvalue", y="F", hue="task", style=style, palette=PALETTE, ax=ax, s=40)
    rho = correlation.get("spearman")
    interval = f" [{correlation['lo']:.2f}, {correlation['hi']:.2f}]" if correlation.get("lo") is not None else ""
    ax.set_xlabel("top Hessian eigenvalue at the end of stage 1")
    ax.set_ylabel("forgetting of the stage-1 task (pp)")
    title = f"Sharper minima, more forgetting? Spearman rho = {rho:.2f}{interval}, n = {correlation['n']}" if rho is not None else "Curvature vs forgetting"
    ax.set_title(title, fontsize=10)
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
