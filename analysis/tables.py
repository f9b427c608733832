"""Plain-text and Markdown tables of chains: accuracy per stage, forgetting, biased forgetting."""

from __future__ import annotations

import numpy as np
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


def mean_interval(values, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t interval over seeds (no interval from a single seed)."""
    from scipy import stats

    values = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    if values.size == 0:
        return float("nan"), None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


def seed_summary(forgetting: pd.DataFrame) -> pd.DataFrame:
    """Forgetting F and BF per order x task x group, averaged over seeds with a 95% interval over seeds; a
    single run keeps its paired-bootstrap interval."""
    rows = []
    for (order, task, kind, group), frame in forgetting.groupby(["order", "task", "group_kind", "group"], sort=True):
        f_mean, f_lo, f_hi = mean_interval(frame["F"])
        bf_mean, bf_lo, bf_hi = mean_interval(frame["BF"])
        if len(frame) == 1:
            f_lo, f_hi, bf_lo, bf_hi = frame[["F_lo", "F_hi", "BF_lo", "BF_hi"]].iloc[0]
        rows.append({"order": order, "task": task, "group_kind": kind, "group": group, "seeds": int(frame["seed"].nunique()),
                     "F": f_mean, "F_lo": f_lo, "F_hi": f_hi, "BF": bf_mean, "BF_lo": bf_lo, "BF_hi": bf_hi})  # fmt: skip
    return pd.DataFrame(rows).astype({c: float for c in ("F_lo", "F_hi", "BF_lo", "BF_hi")})


def order_asymmetry(records: list[dict]) -> pd.DataFrame:
    """For each safety S and capability C run in both orders: ``F_S(S→C)`` vs ``F_C(C→S)`` per seed, their
    mean difference with a 95% interval, and a paired t-test across seeds (paired by seed)."""
    from scipy import stats

    from chainforget import tasks

    first = {}
    for record in records:
        order = record["config"]["order"]
        if len(order) != 2:
            continue
        (row,) = [r for r in record["metrics"]["forgetting"] if r["task"] == order[0] and r["group_kind"] == "all"] or [None]
        if row is not None:
            first[(order[0], order[1], record["config"]["seed"])] = row["F"]
    pairs = sorted({(a, b) for a, b, _ in first if tasks.get(a).role == "safety" and tasks.get(b).role == "capability"})
    rows = []
    for a, b in pairs:
        seeds = sorted(s for x, y, s in first if (x, y) == (a, b) and (b, a, s) in first)
        if not seeds:
            continue
        safety = np.array([first[(a, b, s)] for s in seeds])
        capability = np.array([first[(b, a, s)] for s in seeds])
        mean, lo, hi = mean_interval(safety - capability)
        p_value = float(stats.ttest_rel(safety, capability).pvalue) if len(seeds) > 1 else None
        rows.append({"safety": a, "capability": b, "seeds": len(seeds), "F_safety (S→C)": float(safety.mean()),
                     "F_capability (C→S)": float(capability.mean()), "asymmetry": mean, "asymmetry_lo": lo,
                     "asymmetry_hi": hi, "p_paired_t": p_value})  # fmt: skip
    return pd.DataFrame(rows)


def replay_recovery(records: list[dict]) -> pd.DataFrame:
    """Replay-stage runs by chain and ratio r: how much of the first task's lost accuracy the replay stage won back
    (``recovered = (Acc3 - Acc2) / (Acc1 - Acc2)``) and how the last task's accuracy moved (pp), over seeds."""
    rows = []
    for record in records:
        mitigation = record["config"].get("mitigation", {})
        if mitigation.get("name") != "replay_stage":
            continue
        first, last = record["config"]["order"][0], record["config"]["order"][-1]
        acc = {(r["stage"], r["task"]): 100.0 * r["acc"] for r in record["eval"] if r["group_kind"] == "all"}
        before = len(record["config"]["order"])  # the last stage before the replay stage
        after = before + 1
        lost = acc[(1, first)] - acc[(before, first)]
        rows.append({"order": " → ".join(record["config"]["order"]), "ratio": mitigation["strength"], "seed": record["config"]["seed"], "safety_task": first,
                     "safety_lost": lost, "safety_recovered_pp": acc[(after, first)] - acc[(before, first)],
                     "recovered_share": (acc[(after, first)] - acc[(before, first)]) / lost if lost > 0 else None,
                     "capability_change_pp": acc[(after, last)] - acc[(before, last)]})  # fmt: skip
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    summary = []
    for (order, ratio), part in frame.groupby(["order", "ratio"], sort=True):
        recovered, lo, hi = mean_interval(part["safety_recovered_pp"])
        kept, kept_lo, kept_hi = mean_interval(part["capability_change_pp"])
        summary.append({"order": order, "ratio": ratio, "seeds": len(part), "safety_lost_pp": float(part["safety_lost"].mean()),
                        "safety_recovered_pp": recovered, "recovered_lo": lo, "recovered_hi": hi,
                        "capability_change_pp": kept, "capability_lo": kept_lo, "capability_hi": kept_hi})  # fmt: skip
    return pd.DataFrame(summary)


def curvature_forgetting(records: list[dict], resamples: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Top Hessian eigenvalue at the end of stage 1 vs the forgetting of that stage's task in stage 2, one row
    per two-stage run, and their Spearman correlation with a bootstrap 95% interval over runs."""
    from scipy import stats

    rows = []
    for record in records:
        stage = record["stages"][0]
        task = record["config"]["order"][0]
        forgotten = [r["F"] for r in record["metrics"]["forgetting"]
                     if r["task"] == task and r["group_kind"] == "all" and r["later_stage"] == 2]  # fmt: skip
        if stage.get("curvature") and forgotten:
            rows.append({"run_name": record["run_name"], "task": task, "top_eigenvalue": stage["curvature"]["top_eigenvalue"],
                         "F": forgotten[0], "mitigation": record["config"].get("mitigation", {}).get("name", "none")})  # fmt: skip
    frame = pd.DataFrame(rows)
    if len(frame) < 3:
        return frame, {"spearman": None, "lo": None, "hi": None, "n": len(frame)}
    rho = float(stats.spearmanr(frame["top_eigenvalue"], frame["F"]).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        sample = frame.iloc[rng.integers(0, len(frame), len(frame))]
        if sample["top_eigenvalue"].nunique() > 1 and sample["F"].nunique() > 1:
            draws.append(stats.spearmanr(sample["top_eigenvalue"], sample["F"]).statistic)
    lo, hi = (float(v) for v in np.nanpercentile(draws, [2.5, 97.5])) if draws else (None, None)
    return frame, {"spearman": rho, "lo": lo, "hi": hi, "n": len(frame)}
