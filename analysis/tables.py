"""Plain-text and Markdown tables of chains: accuracy per stage, forgetting, biased forgetting."""

from __future__ import annotations

import pandas as pd

from analysis.runs import evals_frame, order_label
from chainforget.config import parse_stage, primary_order
from chainforget.metrics import trained_stages


def accuracy_table(records: list[dict]) -> pd.DataFrame:
    """Accuracy (pp) of each task after each stage, one row per run x stage (stage 0 = base model)."""
    frame = evals_frame(records)
    frame = frame[frame["group_kind"] == "all"]
    table = frame.pivot_table(index=["order", "stage"], columns="task", values="acc_pp").round(1)
    table.columns.name = None
    return table


def forgetting_summary(records: list[dict]) -> pd.DataFrame:
    """One row per run x forgotten task: F with its interval, and the worst-hit group of each group kind."""
    rows = []
    for record in records:
        metrics = record["metrics"]
        for row in metrics["forgetting"]:
            if row["group_kind"] != "all":
                continue
            summary = {"order": order_label(record), "task": row["task"], "F (pp)": _with_ci(row["F"], row["F_ci"])}
            for bf in metrics["biased_forgetting"]:
                if bf["task"] == row["task"] and bf["worst_group"] is not None:
                    summary[f"BF by {bf['group_kind']} (pp)"] = f"{_with_ci(bf['BF'], bf['BF_ci'])} [{bf['worst_group']}]"
            rows.append(summary)
    return pd.DataFrame(rows).fillna("")


SCORE_CHANGES = {"s_amb": "s_AMB", "s_dis": "s_DIS", "balanced_acc": "balanced acc"}


def score_changes(records: list[dict]) -> pd.DataFrame:
    """How each task-specific safety score moved from the stage that trained the task (the base model for
    probes never trained) to the last stage; tasks trained in the last stage have nothing to forget yet.
    Safety can be lost as a rising bias score at constant accuracy."""
    rows = []
    for record in records:
        order = primary_order(record["config"]["order"], record["config"].get("mitigation", {}).get("name", "none"))
        trained = trained_stages([parse_stage(entry) for entry in order])
        last = max(row["stage"] for row in record["eval"])
        scores = pd.DataFrame(record["metrics"].get("task_scores", []))
        if scores.empty:
            continue
        for (task, kind, group), frame in scores.groupby(["task", "group_kind", "group"], sort=True):
            by_stage = frame.set_index("stage")
            start = trained.get(task, 0)
            if start == last:
                continue
            for column, label in SCORE_CHANGES.items():
                if column not in by_stage or pd.isna(by_stage.loc[start, column]) or pd.isna(by_stage.loc[last, column]):
                    continue
                before, after = by_stage.loc[start, column], by_stage.loc[last, column]
                scale = 100.0 if column == "balanced_acc" else 1.0
                rows.append({"order": order_label(record), "task": task, "group_kind": kind, "group": group,
                             "score": label, "from_stage": start, "before": scale * before, "after": scale * after,
                             "change": scale * (after - before)})  # fmt: skip
    return pd.DataFrame(rows, columns=["order", "task", "group_kind", "group", "score", "from_stage", "before", "after", "change"])


def _with_ci(value: float | None, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" + (f" ({ci[0]:+.1f}, {ci[1]:+.1f})" if ci else "")


def summary_text(records: list[dict]) -> str:
    """What the CLI prints after a chain or the demo."""
    parts = ["Accuracy per stage (%, stage 0 = base model):", accuracy_table(records).to_string()]
    forgetting = forgetting_summary(records)
    if not forgetting.empty:
        parts += ["", "Forgetting F = Acc(trained stage) - Acc(last stage), biased forgetting BF = max_g (F_g - F);",
                  "95% paired-bootstrap intervals in parentheses, worst-hit group in brackets:",
                  forgetting.to_string(index=False)]  # fmt: skip
    changes = score_changes(records)
    headline = changes[((changes["score"] == "s_AMB") & (changes["group_kind"] == "category")) | (changes["score"] == "balanced acc")]
    if not headline.empty:
        parts += ["", "Safety scores from the trained stage to the last (pp; BBQ s_AMB per category, ToxiGen balanced "
                  "accuracy per group):", headline.drop(columns="group_kind").round(1).to_string(index=False)]  # fmt: skip
    return "\n".join(parts)
