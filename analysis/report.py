"""A report of a set of runs: Markdown (figures as PNG files beside it) and one self-contained HTML file
(figures embedded), with the tables, the figures that the runs support, the run list and their configs."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from analysis import plots
from analysis.runs import Runs, example_forgetting_frame, forgetting_frame, load_runs, varying_keys
from analysis.tables import (
    accuracy_table,
    asymmetry_seeds,
    curvature_forgetting,
    example_forgetting_summary,
    forgetting_summary,
    order_asymmetry,
    pooled_intervals,
    power_table,
    replay_recovery,
    score_changes,
    seed_summary,
)

# autoescape on: every string the template shows is escaped unless it is Markup (the tables from DataFrame.to_html)
TEMPLATES = Environment(
    loader=PackageLoader("analysis", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table through ``DataFrame.to_markdown`` (tabulate): a named index becomes columns, cells print as
    ``str`` prints them (no number formatting, no padding), None and NaN as empty cells."""
    frame = frame.reset_index() if not isinstance(frame.index, pd.RangeIndex) else frame
    cells = frame.astype(object).where(frame.notna(), None)
    return cells.to_markdown(index=False, disable_numparse=True, stralign=None, numalign=None)


def html_table(frame: pd.DataFrame, index: bool = False) -> Markup:
    """``DataFrame.to_html`` (which escapes every cell) with None and NaN as empty cells, for the template."""
    return Markup(frame.astype(object).where(frame.notna(), "").to_html(index=index))


def sections(runs: Runs) -> list[tuple[str, str, pd.DataFrame | None, tuple[str, object] | None]]:
    """``(title, caption, table, (figure file, figure))`` for everything these runs support."""
    records = runs.records
    forgetting, flips = forgetting_frame(records), example_forgetting_frame(records)
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
            (
                "group_forgetting.png",
                plots.group_forgetting_figure(forgetting, flips=flips),
            ),
        ),
    ]
    heatmap = plots.forgetting_heatmap(forgetting, flips=flips)
    if heatmap is not None:
        caption = "Mean over seeds; the interval is the 95% cluster bootstrap over seeds and their examples where "
        caption += "every seed has per-example counts (column `interval`), else the 95% t-interval over seeds where "
        caption += "there are several (clipped to the possible range: ±100 pp for F, ±200 pp for BF), else the "
        caption += "paired bootstrap of the single run."
        out.append(
            (
                "Per-group forgetting across conditions (pp)",
                caption,
                pooled_intervals(seed_summary(forgetting), flips).round(2),
                ("forgetting_heatmap.png", heatmap),
            )
        )
    if not flips.empty:  # records written before per-example forgetting was measured have none
        caption = "Share of each group's eval examples answered right at the stage that trained the task and wrong "
        caption += "at the last (forgotten), or the other way (learned); forgotten − learned = F. forgotten_adj and "
        caption += "learned_adj subtract expected_flip, the share a uniform guess over each example's k options flips "
        caption += "either way, mean (1/k)(1 − 1/k). Table: means over seeds, 95% t-intervals over seeds clipped to "
        caption += "0..100 pp (±100 pp adjusted); figure: whiskers are the range over seeds, or a 95% Wilson interval "
        caption += "for a group in one run."
        figure = ("example_forgetting.png", plots.example_forgetting_figure(flips))
        table = example_forgetting_summary(flips).round(2)
        out.append(("Per-example forgetting and learning (pp)", caption, table, figure))
    asymmetry = order_asymmetry(records)
    if not asymmetry.empty:
        caption = "F of the safety task in safety→capability minus F of the capability task in capability→safety, "
        caption += "paired by seed within one setting (the condition without its order); paired t-test across seeds."
        figure = plots.asymmetry_figure(asymmetry, asymmetry_seeds(records))
        out.append(("Order asymmetry (pp)", caption, asymmetry.round(3), ("order_asymmetry.png", figure)))
    power = power_table(records)
    if not power.empty:
        caption = "Minimum detectable effect (MDE, pp) at 80% power, two-sided alpha 0.05: "
        caption += "MDE = (q(0.975) + q(0.8)) × SE. With k ≥ 2 seeds SE = sd over seeds / √k and q is Student's t "
        caption += "on k − 1 df (one-sample t-test of F and BF_g, paired t-test of the asymmetry); from one run, SE "
        caption += "is the sampling SE over its n eval examples, √((f + l − (f − l)²) / n) with f, l the forgotten "
        caption += "and learned shares (√(0.5 / n) without them), and q is normal: it leaves out how much a retrained "
        caption += "run differs. BF_g: a group of the median size, from the median group's sd over seeds. Seeds "
        caption += "needed: for an asymmetry MDE of 5 pp at the observed sd."
        out.append(("Power before data (pp)", caption, power.round(2), None))
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
    ``keep`` accepts (default: all); return the HTML path. The HTML page is ``templates/report.html.j2``."""
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
    skipped = "Runs of the source that have no run record (crashed or stopped chains, runs that are not chains)."
    configs = [(record["run_name"], yaml.safe_dump(record["config"], sort_keys=False)) for record in runs.records]

    markdown = [f"# {title}", ""]
    for heading, caption, table, figure in parts:
        markdown += [f"## {heading}", "", caption, ""]
        if figure is not None:
            markdown += [f"![{heading}]({figure[0]})", ""]
        if table is not None:
            markdown += [markdown_table(table), ""]
    markdown += ["## Runs", "", markdown_table(run_list), ""]
    if not runs.skipped.empty:
        markdown += ["## Skipped runs", "", skipped, "", markdown_table(runs.skipped), ""]
    for name, config in configs:
        markdown += [f"<details><summary>config of {name}</summary>", "", "```yaml", config, "```", "</details>", ""]
    (out_dir / "report.md").write_text("\n".join(markdown), encoding="utf-8")

    page = TEMPLATES.get_template("report.html.j2").render(
        title=title,
        sections=[
            {
                "heading": heading,
                "caption": caption,
                "figure": figures[figure[0]] if figure is not None else None,
                "table": html_table(table, index=not isinstance(table.index, pd.RangeIndex))
                if table is not None
                else None,
            }
            for heading, caption, table, figure in parts
        ],
        run_list=html_table(run_list),
        skipped=html_table(runs.skipped) if not runs.skipped.empty else None,
        skipped_caption=skipped,
        configs=[{"name": name, "config": config} for name, config in configs],
    )
    report = out_dir / "report.html"
    report.write_text(page, encoding="utf-8")
    return report
