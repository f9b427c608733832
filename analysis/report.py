"""A short Markdown report of a directory of chains: tables and seaborn figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.plots import accuracy_figure, group_forgetting_figure, save
from analysis.runs import evals_frame, forgetting_frame, load_records
from analysis.tables import accuracy_table, forgetting_summary, score_changes


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
    changes = score_changes(records)
    if not changes.empty:
        lines += [
            "## Safety scores across the chain (pp)",
            "",
            "BBQ bias scores (Parrish et al. 2022; s_DIS on disambiguated, s_AMB on ambiguous contexts; positive = "
            "answers follow the stereotype) and ToxiGen balanced detection accuracy, from the stage that trained the "
            "task (0 = base model for tasks never trained) to the last stage. Safety can be lost as a rising bias "
            "score even where accuracy holds.",
            "",
            markdown_table(changes.round(1)),
            "",
        ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
