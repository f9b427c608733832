"""A short Markdown report of a directory of chains: tables and seaborn figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.plots import accuracy_figure, group_forgetting_figure, save
from analysis.runs import evals_frame, forgetting_frame, load_records
from analysis.tables import accuracy_table, forgetting_summary


def markdown_table(frame: pd.DataFrame) -> str:
    frame = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_report(runs_root: Path, out_dir: Path) -> Path:
    """Write ``report.md`` and its PNG figures into ``out_dir``; return the report's path."""
    records = load_records(runs_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    save(accuracy_figure(evals_frame(records)), out_dir / "accuracy_by_stage.png")
    save(group_forgetting_figure(forgetting_frame(records)), out_dir / "group_forgetting.png")
    first = records[0]
    lines = [
        "# chainforget report",
        "",
        f"Runs: {', '.join(r['run_name'] for r in records)} (model `{first['config']['model']['name']}`, "
        f"{first['config']['model']['finetune']} fine-tuning, {first['config']['train']['steps']} steps per stage, "
        f"seed {first['config']['seed']}).",
        "",
        "## Accuracy per stage (%)",
        "",
        markdown_table(accuracy_table(records)),
        "",
        "![accuracy across stages](accuracy_by_stage.png)",
        "",
        "## Forgetting and biased forgetting (pp)",
        "",
        "F = Acc(stage that trained the task) − Acc(last stage); BF = max over groups of (F_g − F), worst group in "
        "brackets; 95% paired-bootstrap intervals over eval examples in parentheses.",
        "",
        markdown_table(forgetting_summary(records)),
        "",
        "![per-group forgetting](group_forgetting.png)",
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
