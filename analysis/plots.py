"""Seaborn figures of chains: per-group forgetting per order, and accuracy across stages.

Every figure has labelled axes in percentage points, interval bars where intervals exist, a caption-ready
title and the colour-blind-safe palette.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"


def group_forgetting_figure(forgetting: pd.DataFrame, kinds: tuple[str, ...] = ("category", "context")):
    """Horizontal bars of per-group forgetting F^g (pp) with 95% paired-bootstrap intervals, one panel per
    order and forgotten task (the grey bar is the whole eval split); the dashed line is the overall
    forgetting F, so bars beyond it are groups forgotten more than the task as a whole."""
    frame = forgetting[forgetting["group_kind"].isin(("all", *kinds))].copy()
    frame["group"] = np.where(
        frame["group_kind"] == "all", "all examples",
        frame["group_kind"] + ": " + frame["group"].astype(str) + np.where(frame["small"], " (small)", ""),
    )  # fmt: skip
    panels = list(frame.groupby(["order", "task"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 0.35 * frame["group"].nunique() + 1.8), squeeze=False, sharex=True)
    colours = dict(zip(kinds, sns.color_palette(PALETTE, len(kinds)))) | {"all": (0.45, 0.45, 0.45)}
    for ax, ((order, task), panel) in zip(axes[0], panels):
        panel = panel.sort_values(["group_kind", "F"], ascending=[True, False], key=lambda c: c.map({"all": ""}).fillna(c) if c.name == "group_kind" else c)
        sns.barplot(data=panel, y="group", x="F", hue="group_kind", palette=colours, dodge=False, errorbar=None, ax=ax, legend=False)
        lo = (panel["F"] - panel["F_lo"]).clip(lower=0).fillna(0)
        hi = (panel["F_hi"] - panel["F"]).clip(lower=0).fillna(0)
        ax.errorbar(panel["F"], np.arange(len(panel)), xerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=1)
        overall = forgetting[(forgetting["order"] == order) & (forgetting["task"] == task) & (forgetting["group_kind"] == "all")]
        if not overall.empty:
            ax.axvline(overall["F"].iloc[0], color="black", ls="--", lw=1, label=f"all: {overall['F'].iloc[0]:+.1f} pp")
            ax.legend(loc="lower right", fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"{order}: forgetting of {task}", fontsize=10)
        ax.set_xlabel("forgetting F_g (pp, 95% CI)")
        ax.set_ylabel("")
    fig.suptitle("Per-group forgetting of the first task after the second stage", fontsize=11)
    fig.tight_layout()
    return fig


def accuracy_figure(evals: pd.DataFrame):
    """Accuracy (pp) of each task after each stage (0 = base model), one panel per order."""
    frame = evals[evals["group_kind"] == "all"]
    grid = sns.relplot(
        data=frame, x="stage", y="acc_pp", hue="task", col="order", kind="line", marker="o",
        palette=PALETTE, height=3.2, aspect=1.1, facet_kws={"sharey": True},
    )  # fmt: skip
    grid.set_axis_labels("stage (0 = base model)", "accuracy (%)")
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.set_xticks(sorted(frame["stage"].unique()))
    grid.figure.suptitle("Accuracy on every task across the chain", fontsize=11)
    grid.figure.tight_layout()
    return grid.figure


def save(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
