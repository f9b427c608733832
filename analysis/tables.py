"""Plain-text and Markdown tables of chains: accuracy per stage, forgetting, biased forgetting."""

from __future__ import annotations

import pandas as pd

from analysis.runs import evals_frame, order_label


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
    return "\n".join(parts)
