"""The paper's four findings as tables, from the runs of the ``sweeps/optuna/findings_*.yaml`` studies.

    python -m analysis.findings runs/findings docs/results

writes ``docs/results/tables/*.csv``, copies every run's ``run.json`` to ``docs/results/runs/<run>/`` (what the
tables are rebuilt from, see tests/test_findings.py), the report of the plain chains (``report/``: report.html,
report.md, figures) and the report of the SAM and replay chains (``report-mitigations/``).

    python -m analysis.findings --learning ~/.cache/chainforget/regime2/runs docs/results/regime

writes the learning table of the regime search (``write_learning``).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
from scipy import stats

from analysis.plots import (
    group_forgetting_figure,
    learning_curves_figure,
    learning_figure,
    mitigation_figure,
    save,
)
from analysis.report import write_report
from analysis.runs import condition_labels, example_forgetting_frame, forgetting_frame, load_records
from analysis.tables import (
    DIFFERENCE_RANGE,
    FORGETTING_RANGE,
    SHARE_RANGE,
    SPREAD_RANGE,
    curvature_forgetting,
    learning_table,
    mean_interval,
    order_asymmetry,
    paired_by_seed,
    pooled_intervals,
    power_table,
    replay_recovery,
    seed_summary,
)
from chainforget.config import MitigationSpec
from chainforget.metrics import PP


def mitigation(record: dict) -> str:
    return record["mitigation"]["name"]


def findings_tables(records: list[dict]) -> dict[str, pd.DataFrame]:
    """One table per finding: order asymmetry, per-group and biased forgetting, curvature (with SAM), replay; and the
    effects the plain chains could detect (``power``)."""
    plain = [r for r in records if len(r["config"]["order"]) == 2 and mitigation(r) == "none"]
    two_stage = [r for r in records if len(r["config"]["order"]) == 2 and mitigation(r) in ("none", "sam")]
    points = curvature_forgetting(two_stage)[0].drop(columns="converged").merge(run_keys(two_stage), on="run_name")
    return {
        "order_asymmetry": order_asymmetry(plain),
        "group_forgetting": group_forgetting_over_seeds(plain),
        "biased_forgetting": biased_forgetting_over_seeds(plain),
        "curvature_points": points,
        "curvature_correlation": curvature_correlations(plain),
        "sam_vs_plain": sam_vs_plain(points),
        "replay": replay_recovery([r for r in records if mitigation(r) == "replay_stage"]),
        "power": power_table(plain),
        "mitigations": mitigation_comparison(records),
        "learning": learning_table(plain),  # what each stage taught its task (empty before records measured it)
    }


def model_name(record: dict) -> str:
    return record["config"]["model"]["name"]


def curvature_correlations(records: list[dict]) -> pd.DataFrame:
    """Spearman's correlation of curvature and forgetting for each task trained first, and over all of them when
    there are several (tasks forget on different scales, so the pooled one also mixes tasks); for each model apart
    when the records hold several (a model's eigenvalues are on a scale of its own)."""
    models = sorted({model_name(record) for record in records})
    rows = []
    for model in models:
        runs = [record for record in records if model_name(record) == model]
        label = {"model": model} if len(models) > 1 else {}
        first = sorted({record["config"]["order"][0] for record in runs})
        for task in first:
            trained_first = [record for record in runs if record["config"]["order"][0] == task]
            rows.append(label | {"task": task} | curvature_forgetting(trained_first)[1])
        if len(first) > 1:
            rows.append(label | {"task": "all"} | curvature_forgetting(runs)[1])
    return pd.DataFrame(rows)


# how a run of a mitigation is judged: what it did to the safety task trained first, and what it cost the last task
MEASURE_RANGES = {"F": FORGETTING_RANGE, "forgotten": SHARE_RANGE, "forgotten_adj": FORGETTING_RANGE}


def run_measures(record: dict) -> dict[str, float]:
    """One two-stage run: F of the first task, its biased forgetting ``BF (<group kind>)`` (worst group), the share
    of its examples forgotten (``forgotten``, chance-adjusted ``forgotten_adj``) and the last task's accuracy (pp)."""
    first, last = record["config"]["order"][0], record["config"]["order"][-1]
    metrics, stages = record["metrics"], len(record["stages"])  # a replay stage adds one to the order
    whole = [r for r in metrics["forgetting"] if r["task"] == first and r["group_kind"] == "all"]
    measures = {"F": whole[0]["F"]} if whole else {}
    measures |= {f"BF ({r['group_kind']})": r["BF"] for r in metrics["biased_forgetting"] if r["task"] == first}
    for row in metrics.get("example_forgetting", []):
        if row["task"] == first and row["group_kind"] == "all":
            measures |= {"forgotten": row["forgotten"], "forgotten_adj": row["forgotten_adj"]}
    accuracy = [r["acc"] for r in record["eval"] if (r["stage"], r["task"], r["group_kind"]) == (stages, last, "all")]
    return measures | ({f"{last} accuracy": PP * accuracy[0]} if accuracy else {})


def reference_kind(spec: dict) -> str:
    """What a run is compared as: ``none`` for plain chains, which includes a replay stage at r = 0 (a third stage
    without replay: the train-longer control of a mitigation that adds a stage), ``replay`` for plain replay at
    the default replay share (``replay_mix`` in the last stage, ``replay_stage`` in an added one), else its name."""
    name, strength = spec["name"], spec.get("strength", 0.0)
    if name == "none" or (name == "replay_stage" and strength == 0):
        return "none"
    if name in ("replay_mix", "replay_stage") and strength == MitigationSpec.replay_share:
        return "replay"
    return name


def mitigation_comparison(records: list[dict], references: tuple[str, ...] = ("none", "replay")) -> pd.DataFrame:
    """Every condition run with mitigations after its first stage, apart by chain length (a mitigation that adds a
    stage is judged against chains of that length): per mitigation (with its strength) and measure
    (``run_measures``), the mean over seeds with its 95% t-interval, and the difference from each reference
    (``reference_kind``: plain chains, then plain replay at the same share), paired by seed, with its interval and
    a paired t-test's p. Only conditions with a reference and another mitigation appear."""
    runs = [r for r in records if len(r["stages"]) > 1 and mitigation(r) != "sam"]  # SAM acts in stage 1
    conditions = condition_labels(runs, leave_out=("mitigation",))
    rows = []
    for record in runs:
        spec = record["config"]["mitigation"]
        name = spec["name"] if spec["name"] == "none" else f"{spec['name']} {spec['strength']:g}"
        condition = f"{conditions[record['run_name']]}, {len(record['stages'])} stages"
        base = {"condition": condition, "mitigation": name, "kind": reference_kind(spec)}
        for measure, value in run_measures(record).items():
            rows.append(base | {"seed": record["config"]["seed"], "measure": measure, "value": value})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    out = []
    for condition, part in frame.groupby("condition", sort=True):
        kinds = set(part["kind"])
        if not (kinds & set(references)) or len(kinds) < 2:
            continue
        for (name, kind, measure), cell in part.groupby(["mitigation", "kind", "measure"], sort=True):
            bounds = MEASURE_RANGES.get(measure, DIFFERENCE_RANGE if measure.startswith("BF") else (0.0, 100.0))
            mine = cell.groupby("seed")["value"].mean()  # runs of one seed that differ in a knob not shown
            mean, lo, hi = mean_interval(mine, bounds=bounds)
            row = {"condition": condition, "mitigation": name, "kind": kind, "measure": measure, "seeds": len(mine)}
            row |= {"mean": mean, "lo": lo, "hi": hi}
            # against the references before its own (plain replay against plain chains, not the reverse)
            for reference in references[: references.index(kind) if kind in references else None]:
                theirs = (
                    part[(part["kind"] == reference) & (part["measure"] == measure)].groupby("seed")["value"].mean()
                )
                diff = paired_by_seed(mine, theirs)
                row |= {
                    f"vs_{reference}": diff["mean"],
                    f"vs_{reference}_lo": diff["lo"],
                    f"vs_{reference}_hi": diff["hi"],
                }
                row[f"p_vs_{reference}"] = diff["p"]
            out.append(row)
    return pd.DataFrame(out)


def run_keys(records: list[dict]) -> pd.DataFrame:
    """Per run: its condition without the mitigation (what SAM and plain runs are paired on, with the seed) and
    whether the curvature estimate of its first stage converged."""
    conditions = condition_labels(records, leave_out=("mitigation",))
    rows = []
    for record in records:
        curvature = record["stages"][0]["curvature"] or {}
        run = {"run_name": record["run_name"], "condition": conditions[record["run_name"]]}
        rows.append(run | {"seed": record["config"]["seed"], "converged": curvature.get("converged")})
    return pd.DataFrame(rows)


def group_forgetting_over_seeds(records: list[dict]) -> pd.DataFrame:
    """Per group of every forgotten task: F_g averaged over seeds (interval over seeds), and in how many seeds
    the paired-bootstrap interval of ``BF_g = F_g - F`` excludes 0 (the group forgot more or less than the task
    as a whole, beyond what the interval allows)."""
    return group_table(forgetting_frame(records), example_forgetting_frame(records))


def group_table(frame: pd.DataFrame, flips: pd.DataFrame) -> pd.DataFrame:
    groups = frame[frame["group_kind"] != "all"].copy()
    groups["beyond"] = (groups["BF_lo"] > 0) | (groups["BF_hi"] < 0)  # BF_g = F_g - F, one paired bootstrap
    # intervals pooled over seeds and examples wherever the records have per-example forgetting
    summary = pooled_intervals(seed_summary(groups), flips)
    keys = ["condition", "task", "group_kind", "group"]
    counts = groups.groupby(keys)[["beyond", "small"]].agg({"beyond": "sum", "small": "any"})
    return summary.merge(counts.reset_index().rename(columns={"beyond": "seeds_beyond_interval"}), on=keys)


def biased_forgetting_over_seeds(records: list[dict]) -> pd.DataFrame:
    """Per condition x task x group kind: the headline BF (worst group) and the spread over seeds, and how many of the
    (run, group) pairs large enough to count have a ``BF_g`` interval that excludes 0 (about 5% would by chance
    if every group forgot alike)."""
    frame = forgetting_frame(records)
    overall = frame[frame["group_kind"] == "all"].set_index("run_name")["F"]
    labels = condition_labels(records)
    rows = []
    for record in records:
        run = {"condition": labels[record["run_name"]], "seed": record["config"]["seed"]}
        for row in record["metrics"]["biased_forgetting"]:
            rows.append(run | row | {"F": overall[record["run_name"]]})
    if not rows:
        return pd.DataFrame()
    per_run = pd.DataFrame(rows)
    out = []
    for (condition, task, kind), part in per_run.groupby(["condition", "task", "group_kind"], sort=True):
        bf, bf_lo, bf_hi = mean_interval(part["BF"].dropna(), bounds=DIFFERENCE_RANGE)
        spread, spread_lo, spread_hi = mean_interval(part["spread"].dropna(), bounds=SPREAD_RANGE)
        # each (run, group) pair on its own: a group small in one seed still counts in the seeds where it is not
        chosen = (frame["condition"] == condition) & (frame["task"] == task) & (frame["group_kind"] == kind)
        groups = frame[chosen & ~frame["small"].astype(bool)]
        tested, beyond = len(groups), int(((groups["BF_lo"] > 0) | (groups["BF_hi"] < 0)).sum())
        row = {"condition": condition, "task": task, "group_kind": kind, "seeds": len(part), "F": part["F"].mean()}
        row |= {"BF": bf, "BF_lo": bf_lo, "BF_hi": bf_hi}
        row |= {"spread": spread, "spread_lo": spread_lo, "spread_hi": spread_hi}
        row["worst_groups"] = ";".join(sorted(part["worst_group"].dropna().unique()))
        row |= {"group_runs_tested": tested, "group_runs_beyond_interval": beyond}
        # if every group forgot alike, each interval would exclude 0 with chance 5 %: more than that is the finding
        p_value = float(stats.binomtest(beyond, tested, 0.05, alternative="greater").pvalue) if tested else None
        out.append(row | {"share_beyond": beyond / tested if tested else None, "p_binomial": p_value})
    return pd.DataFrame(out)


def sam_vs_plain(points: pd.DataFrame) -> pd.DataFrame:
    """For every condition (without the mitigation) run with and without SAM in its first stage: top eigenvalue
    and F, paired by seed."""
    rows = []
    for condition, part in points.groupby("condition", sort=True):
        sam = part[part["mitigation"] == "sam"].set_index("seed")
        plain = part[part["mitigation"] == "none"].set_index("seed")
        seeds = sorted(set(sam.index) & set(plain.index))
        if not seeds:
            continue
        row = {"condition": condition, "seeds": len(seeds)}
        for column in ("top_eigenvalue", "F"):
            diff = paired_by_seed(sam[column], plain[column], bounds=DIFFERENCE_RANGE if column == "F" else None)
            means = {f"{column}_plain": plain.loc[seeds, column].mean(), f"{column}_sam": sam.loc[seeds, column].mean()}
            row |= means | {
                f"{column}_diff": diff["mean"],
                f"{column}_diff_lo": diff["lo"],
                f"{column}_diff_hi": diff["hi"],
            }
            row[f"{column}_p"] = diff["p"]
        rows.append(row)
    return pd.DataFrame(rows)


def publish_records(records: list[dict], source: Path, out: Path) -> None:
    """``out/runs/<run>/run.json`` for exactly these ``records`` of ``source``: what the published tables are
    rebuilt from."""
    shutil.rmtree(out / "runs", ignore_errors=True)
    for record in records:
        target = out / "runs" / record["run_name"]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / record["run_name"] / "run.json", target / "run.json")


def write_findings(source: Path, out: Path) -> dict[str, pd.DataFrame]:
    if Path(source).resolve() != (Path(out) / "runs").resolve():  # else: rebuilt from the published records
        publish_records(load_records(source), source, out)
    records = load_records(out / "runs")
    tables = findings_tables(records)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if table.empty:  # a study not run (yet): no file rather than one without columns
            continue
        table.to_csv(out / "tables" / f"{name}.csv", index=False)
    plain = [record for record in records if mitigation(record) == "none" and len(record["stages"]) == 2]
    if plain:  # the figure the project README shows: every group large enough to count, in every plain chain
        frame = forgetting_frame(plain)
        shown = frame[~frame.groupby(["condition", "task", "group_kind", "group"])["small"].transform("any")]
        save(group_forgetting_figure(shown, flips=example_forgetting_frame(plain)), out / "group_forgetting.png")
    for index, condition in enumerate(sorted(set(tables["mitigations"].get("condition", [])))):
        save(mitigation_figure(tables["mitigations"], condition), out / "tables" / f"mitigations_{index + 1}.png")
    # findings 1-3, a report for each model (report/: the model most plain chains ran); then SAM, replay, mitigations
    runs_per_model = Counter(model_name(record) for record in plain).most_common()
    for model, _ in runs_per_model:
        folder = "report" if model == runs_per_model[0][0] else f"report-{Path(model).name}"  # a hub id or a path
        write_report(out / "runs", out / folder, keep=lambda r, m=model: mitigation(r) == "none" and model_name(r) == m)
    if any(mitigation(record) != "none" for record in records):  # a study may not have run yet
        write_report(out / "runs", out / "report-mitigations", keep=lambda record: mitigation(record) != "none")
    return tables


def write_learning(source: Path, out: Path) -> pd.DataFrame:
    """The learning table of the regime search (``sweeps/optuna/regime*.yaml``): every run's ``run.json`` copied to
    ``out/runs/`` (what the table is rebuilt from, see tests/test_findings.py), ``out/learning.csv`` and the figure
    ``out/learning.png``."""
    publish_records([r for r in load_records(source) if r["metrics"].get("learning")], source, out)
    table = learning_table(load_records(out / "runs"))
    table.to_csv(out / "learning.csv", index=False)
    save(learning_figure(table), out / "learning.png")
    curves = learning_curves_figure(table)
    if curves is not None:
        save(curves, out / "learning_curves.png")
    return table


if __name__ == "__main__":
    if sys.argv[1] == "--learning":  # python -m analysis.findings --learning <regime runs> docs/results/regime
        write_learning(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        write_findings(Path(sys.argv[1]), Path(sys.argv[2]))
