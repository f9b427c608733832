"""A report of a set of runs: Markdown (figures as PNG files beside it) and one self-contained HTML file
(figures embedded), with the tables, the figures that the runs support, the run list and their configs."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

from analysis import plots
from analysis.runs import Runs, forgetting_frame, load_runs, varying_keys
from analysis.tables import (
    accuracy_table,
    asymmetry_seeds,
    curvature_forgetting,
    forgetting_summary,
    order_asymmetry,
    replay_recovery,
    score_changes,
    seed_summary,
)


def markdown_table(frame: pd.DataFrame) -> str:
    frame = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def sections(runs: Runs) -> list[tuple[str, str, pd.DataFrame | None, tuple[str, object] | None]]:
    """``(title, caption, table, (figure file, figure))`` for everything these runs support."""
    records = runs.records
    forgetting = forgetting_frame(records)
    accuracy = (
        "Stage 0 is the base model; accuracy on each task's eval split, the mean over the condition's seeds (figure: "
        "the band is the range over seeds). A condition is one value of every config key that can change results; "
        "its runs differ only in the seed."
    )
    per_run = (
        "One row per run. F = Acc(stage that trained the task) − Acc(last stage); BF = max over groups of (F_g − F), "
        "worst group in brackets; 95% paired-bootstrap intervals over eval examples in parentheses. Figure: bars are "
        "means over seeds, dots single seeds, whiskers 95% t-intervals over seeds clipped to ±100 pp."
    )
    out = [
        (
            "Accuracy per stage (%)",
            accuracy,
            accuracy_table(records),
            ("accuracy_by_stage.png", plots.accuracy_figure(runs.evals)),
        ),
        (
            "Forgetting and biased forgetting (pp)",
            per_run,
            forgetting_summary(records),
            ("group_forgetting.png", plots.group_forgetting_figure(forgetting)),
        ),
    ]
    heatmap = plots.forgetting_heatmap(forgetting)
    if heatmap is not None:
        caption = "Mean over seeds; the interval is the 95% t-interval over seeds where there are several (clipped to "
        caption += "the possible range: ±100 pp for F, ±200 pp for BF), else the paired bootstrap of the single run."
        out.append(
            (
                "Per-group forgetting across conditions (pp)",
                caption,
                seed_summary(forgetting).round(2),
                ("forgetting_heatmap.png", heatmap),
            )
        )
    asymmetry = order_asymmetry(records)
    if not asymmetry.empty:
        caption = "F of the safety task in safety→capability minus F of the capability task in capability→safety, "
        caption += "paired by seed within one setting (the condition without its order); paired t-test across seeds."
        figure = plots.asymmetry_figure(asymmetry, asymmetry_seeds(records))
        out.append(("Order asymmetry (pp)", caption, asymmetry.round(3), ("order_asymmetry.png", figure)))
    recovery = replay_recovery(records)
    if not recovery.empty:
        caption = "What the replay stage won back of the first task's lost accuracy, and what it cost the last task, "
        caption += "by replay ratio r; 95% t-intervals over seeds, clipped to ±100 pp."
        figure = plots.replay_figure(recovery)
        out.append(("Replay recovery (pp)", caption, recovery.round(2), ("replay_recovery.png", figure)))
    points, correlation = curvature_forgetting(records)
    if correlation["spearman"] is not None:
        out.append(
            (
                "Curvature and forgetting",
                f"Spearman rho {correlation['spearman']:.2f} (95% bootstrap interval "
                f"{correlation['lo']:.2f} to {correlation['hi']:.2f}, n = {correlation['n']} runs).",
                points.round(3),
                ("curvature_forgetting.png", plots.curvature_figure(points, correlation)),
            )
        )
    changes = score_changes(records)
    if not changes.empty:
        out.append(
            (
                "Safety scores across the chain (pp)",
                "BBQ bias scores (s_DIS on disambiguated, s_AMB on ambiguous contexts; positive = answers follow the "
                "stereotype) and ToxiGen balanced detection accuracy, from the stage that trained the task (the base "
                "model for probes) to the last stage. Safety can be lost as a rising bias score at constant accuracy.",
                changes.round(1),
                None,
            )
        )
    return out


def write_report(source: str | Path, out_dir: Path, keep: Callable[[dict], bool] | None = None) -> Path:
    """Write ``report.md`` (+ PNG figures) and ``report.html`` into ``out_dir`` for the runs of ``source`` that
    ``keep`` accepts (default: all); return the HTML path."""
    runs = load_runs(source)
    if keep is not None:
        runs = runs.select(keep)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = sections(runs)
    figures = {}
    for _, _, _, figure in parts:
        if figure is not None:
            plots.save(figure[1], out_dir / figure[0])
            figures[figure[0]] = base64.b64encode((out_dir / figure[0]).read_bytes()).decode()
    columns = ["run_name", "condition", "seed", *varying_keys(runs.records), "model.name", "model.finetune"]
    run_list = runs.runs.reindex(columns=list(dict.fromkeys(columns)))  # the keys that vary, as columns
    title = f"chainforget report: {len(runs.records)} runs from {source}"

    markdown = [f"# {title}", ""]
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, caption, table, figure in parts:
        markdown += [f"## {heading}", "", caption, ""]
        page += [f"<h2>{html.escape(heading)}</h2><p>{html.escape(caption)}</p>"]
        if figure is not None:
            markdown += [f"![{heading}]({figure[0]})", ""]
            page.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{figures[figure[0]]}'>")
        if table is not None:
            markdown += [markdown_table(table), ""]
            shown = table.astype(object).where(table.notna(), "")  # None and NaN both print as empty cells
            page.append(shown.to_html(index=not isinstance(table.index, pd.RangeIndex)))
    markdown += ["## Runs", "", markdown_table(run_list), ""]
    page += ["<h2>Runs</h2>", run_list.astype(object).where(run_list.notna(), "").to_html(index=False)]
    if not runs.skipped.empty:
        caption = "Runs of the source that have no run record (crashed or stopped chains, runs that are not chains)."
        markdown += ["## Skipped runs", "", caption, "", markdown_table(runs.skipped), ""]
        skipped = runs.skipped.astype(object).where(runs.skipped.notna(), "").to_html(index=False)
        page += ["<h2>Skipped runs</h2>", f"<p>{html.escape(caption)}</p>", skipped]
    for record in runs.records:
        config = yaml.safe_dump(record["config"], sort_keys=False)
        markdown += [
            f"<details><summary>config of {record['run_name']}</summary>",
            "",
            "```yaml",
            config,
            "```",
            "</details>",
            "",
        ]
        page.append(
            f"<details><summary>config of {html.escape(record['run_name'])}</summary>"
            f"<pre>{html.escape(config)}</pre></details>"
        )
    page.append("</body></html>")
    (out_dir / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    report = out_dir / "report.html"
    report.write_text("\n".join(page), encoding="utf-8")
    return report
