"""Plain-text and Markdown tables of chains: accuracy per stage, forgetting, biased forgetting.

Runs are pooled across seeds only within a condition (``analysis.runs.condition_labels``). Intervals over seeds are
Student-t intervals clipped to the range the quantity can take: over 2-3 seeds the t quantile (12.7 for two) can
carry an interval past it, and the true mean lies inside the range, so clipping keeps the interval's coverage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.intervals import cluster_interval
from analysis.power import mde_asymmetry, mde_biased_forgetting, mde_forgetting, seeds_needed
from analysis.runs import condition_labels, evals_frame, example_forgetting_frame, forgetting_frame
from chainforget.metrics import PP
from chainforget.records import EXAMPLE_FORGETTING

# ranges (pp) of the quantities averaged over seeds: a difference of two accuracies (F, F_g, accuracy changes),
# a difference of two such differences (BF_g = F_g - F, order asymmetry), and the spread max_g F_g - min_g F_g
FORGETTING_RANGE = (-100.0, 100.0)
DIFFERENCE_RANGE = (-200.0, 200.0)
SPREAD_RANGE = (0.0, 200.0)
# and of per-example forgetting: a share of a group's examples (forgotten, learned), and a share less its chance level
SHARE_RANGE = (0.0, 100.0)
EXAMPLE_RANGES = {"forgotten": SHARE_RANGE, "learned": SHARE_RANGE}
EXAMPLE_RANGES |= {"forgotten_adj": FORGETTING_RANGE, "learned_adj": FORGETTING_RANGE}


def accuracy_table(records: list[dict]) -> pd.DataFrame:
    """Accuracy (pp) of each task after each stage, one row per condition x stage (stage 0 = base model), the mean
    over the condition's seeds."""
    frame = evals_frame(records)
    frame = frame[frame["group_kind"] == "all"]
    table = frame.pivot_table(index=["condition", "stage"], columns="task", values="acc_pp").round(1)
    table.columns.name = None
    return table


def forgetting_summary(records: list[dict]) -> pd.DataFrame:
    """One row per run x forgotten task, by condition and seed: F with its interval, and the worst-hit group of each
    group kind."""
    labels = condition_labels(records)
    rows = []
    for record in records:
        metrics = record["metrics"]
        for row in metrics["forgetting"]:
            if row["group_kind"] != "all":
                continue
            summary = {"condition": labels[record["run_name"]], "seed": record["config"]["seed"], "task": row["task"]}
            summary["F (pp)"] = _with_ci(row["F"], row["F_ci"])
            for bf in metrics["biased_forgetting"]:
                if bf["task"] == row["task"] and bf["worst_group"] is not None:
                    worst = f"{_with_ci(bf['BF'], bf['BF_ci'])} [{bf['worst_group']}]"
                    summary[f"BF by {bf['group_kind']} (pp)"] = worst
            rows.append(summary)
    frame = pd.DataFrame(rows).fillna("")
    return frame.sort_values(["condition", "seed"], kind="stable", ignore_index=True) if rows else frame


SCORE_CHANGES = {"s_amb": "s_AMB", "s_dis": "s_DIS", "balanced_acc": "balanced acc"}
SCORE_COLUMNS = ["condition", "seed", "task", "group_kind", "group", "score", "from_stage", "before", "after", "change"]


def score_changes(records: list[dict]) -> pd.DataFrame:
    """How each task-specific safety score of each run (by condition and seed) moved from the stage that trained the
    task (the base model for probes never trained) to the last stage; tasks trained in the last stage have nothing to
    forget yet.
    Safety can be lost as a rising bias score at constant accuracy."""
    labels = condition_labels(records)
    rows = []
    for record in records:
        run = {"condition": labels[record["run_name"]], "seed": record["config"]["seed"]}
        trained = {task: facts["trained_stage"] for task, facts in record["tasks"].items()}
        last = max(row["stage"] for row in record["eval"])
        scores = pd.DataFrame(record["metrics"].get("task_scores", []))
        if scores.empty:
            continue
        for (task, kind, group), frame in scores.groupby(["task", "group_kind", "group"], sort=True):
            by_stage = frame.set_index("stage")
            start = trained.get(task) or 0
            if start == last:
                continue
            for column, label in SCORE_CHANGES.items():
                if column not in by_stage or by_stage.loc[[start, last], column].isna().any():
                    continue
                before, after = by_stage.loc[start, column], by_stage.loc[last, column]
                scale = 100.0 if column == "balanced_acc" else 1.0
                change = {"task": task, "group_kind": kind, "group": group, "score": label, "from_stage": start}
                change |= {"before": scale * before, "after": scale * after, "change": scale * (after - before)}
                rows.append(run | change)
    changes = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return changes.sort_values(["condition", "seed"], kind="stable", ignore_index=True)


def _with_ci(value: float | None, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" + (f" ({ci[0]:+.1f}, {ci[1]:+.1f})" if ci else "")


def summary_text(records: list[dict]) -> str:
    """What the CLI prints after a chain or the demo."""
    parts = ["Accuracy per stage (%, stage 0 = base model):", accuracy_table(records).to_string()]
    forgetting = forgetting_summary(records)
    if not forgetting.empty:
        parts += [
            "",
            "Forgetting F = Acc(trained stage) - Acc(last stage), biased forgetting BF = max_g (F_g - F);",
            "95% paired-bootstrap intervals in parentheses, worst-hit group in brackets:",
            forgetting.to_string(index=False),
        ]
    changes = score_changes(records)
    headline = changes[
        ((changes["score"] == "s_AMB") & (changes["group_kind"] == "category")) | (changes["score"] == "balanced acc")
    ]
    if not headline.empty:
        parts += [
            "",
            "Safety scores from the trained stage to the last (pp; BBQ s_AMB per category, ToxiGen balanced "
            "accuracy per group):",
            headline.drop(columns="group_kind").round(1).to_string(index=False),
        ]
    return "\n".join(parts)


def t_test_p(differences) -> float | None:
    """Two-sided p of a one-sample t-test that paired differences have mean 0; ``None`` below two pairs or where
    every pair differs alike (no spread: the test is undefined)."""
    from scipy import stats

    values = np.asarray([v for v in differences if v is not None and not pd.isna(v)], dtype=float)
    if values.size < 2 or np.ptp(values) == 0:
        return None
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def paired_by_seed(mine: pd.Series, theirs: pd.Series, bounds: tuple[float, float] | None = DIFFERENCE_RANGE) -> dict:
    """``mine - theirs`` over the seeds both have (each a value per seed, indexed by seed): the mean difference with
    its t-interval clipped to ``bounds`` (``None`` without a pair), a paired t-test's p, and how many seeds paired."""
    differences = [mine[seed] - theirs[seed] for seed in sorted(set(mine.index) & set(theirs.index))]
    mean, lo, hi = mean_interval(differences, bounds=bounds) if differences else (None, None, None)
    return {"mean": mean, "lo": lo, "hi": hi, "p": t_test_p(differences), "seeds": len(differences)}


def mean_interval(
    values, level: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float | None, float | None]:
    """Mean and Student-t interval over seeds (no interval from a single seed), clipped to ``bounds``, the range the
    quantity can take, when given."""
    from scipy import stats

    values = np.asarray([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    if values.size == 0:
        return float("nan"), None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None, None
    sem = stats.sem(values)  # scipy's t distribution takes no zero scale: seeds that agree give a zero-width interval
    lo, hi = stats.t.interval(level, values.size - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
    low, high = bounds or (-np.inf, np.inf)
    return mean, max(float(lo), low), min(float(hi), high)


def seed_summary(forgetting: pd.DataFrame) -> pd.DataFrame:
    """Forgetting F and BF per condition x task x group, averaged over seeds with a 95% interval over seeds
    (clipped to the range of F and BF); a single run keeps its paired-bootstrap interval."""
    rows = []
    keys = ["condition", "task", "group_kind", "group"]
    for key, frame in forgetting.groupby(keys, sort=True):
        f_mean, f_lo, f_hi = mean_interval(frame["F"], bounds=FORGETTING_RANGE)
        bf_mean, bf_lo, bf_hi = mean_interval(frame["BF"], bounds=DIFFERENCE_RANGE)
        if len(frame) == 1:
            f_lo, f_hi, bf_lo, bf_hi = frame[["F_lo", "F_hi", "BF_lo", "BF_hi"]].iloc[0]
        row = dict(zip(keys, key)) | {"seeds": int(frame["seed"].nunique()), "F": f_mean, "F_lo": f_lo, "F_hi": f_hi}
        rows.append(row | {"BF": bf_mean, "BF_lo": bf_lo, "BF_hi": bf_hi})
    return pd.DataFrame(rows).astype({c: float for c in ("F_lo", "F_hi", "BF_lo", "BF_hi")})


def pooled_intervals(summary: pd.DataFrame, flips: pd.DataFrame, resamples: int = 2000) -> pd.DataFrame:
    """``summary`` (``seed_summary``) with F and BF intervals from the cluster bootstrap over seeds and examples
    (``analysis.intervals``) wherever every seed of the row (every seed whose eval split has its group) has
    per-example forgetting (``example_forgetting_frame``; records written before it was measured keep their
    intervals), and an ``interval`` column saying which."""
    out = summary.copy()
    out["interval"] = np.where(out["seeds"] > 1, "t over seeds", "paired bootstrap")
    if flips.empty:
        return out
    counts = (
        flips.assign(
            forgotten_n=(flips["forgotten"] * flips["n"] / PP).round(),
            learned_n=(flips["learned"] * flips["n"] / PP).round(),
        )
        .set_index(["condition", "task", "seed", "group_kind", "group"])[["n", "forgotten_n", "learned_n"]]
        .sort_index()
    )
    for i, row in out.iterrows():
        key, group_key = (row["condition"], row["task"]), (row["group_kind"], row["group"])
        try:
            part = counts.loc[key]
        except KeyError:
            continue
        # the seeds whose eval split has the group (the split depends on the seed, so a rare group may be missing)
        seeds = [s for s in sorted(part.index.get_level_values("seed").unique()) if (s, *group_key) in part.index]
        try:
            group = np.array([part.loc[(s, row["group_kind"], row["group"])].to_numpy() for s in seeds])
            whole = np.array([part.loc[(s, "all", "all")].to_numpy() for s in seeds])
        except KeyError:
            continue
        if len(seeds) != row["seeds"]:
            continue
        rest = None if row["group_kind"] == "all" else whole - group
        ci = cluster_interval(group, rest, resamples=resamples)
        out.loc[i, ["F_lo", "F_hi"]] = ci["F"]
        out.loc[i, ["BF_lo", "BF_hi"]] = ci.get("BF", (np.nan, np.nan))
        out.loc[i, "interval"] = "cluster bootstrap"
    return out


def example_forgetting_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-example forgetting (``example_forgetting_frame``) per condition x task x group, averaged over seeds: the
    shares ``forgotten`` and ``learned`` and their chance-adjusted ``*_adj`` (pp) with 95% t-intervals over seeds
    clipped to their ranges (none from one seed), the chance level ``expected_flip`` and the mean eval size ``n``."""
    rows = []
    keys = ["condition", "task", "group_kind", "group"]
    for key, part in frame.groupby(keys, sort=True):
        row = dict(zip(keys, key)) | {"seeds": int(part["seed"].nunique()), "n": part["n"].mean()}
        for name in EXAMPLE_FORGETTING:  # the chance level alone has no interval: it hardly varies between seeds
            mean, lo, hi = mean_interval(part[name], bounds=EXAMPLE_RANGES.get(name))
            row |= {name: mean} | ({f"{name}_lo": lo, f"{name}_hi": hi} if name in EXAMPLE_RANGES else {})
        rows.append(row)
    return pd.DataFrame(rows)


def shares_label(train_shares: dict | None) -> str:
    """``context ambig 0.25 / disambig 0.75`` for a task's ``train_shares``, ``""`` for the data's own shares."""
    if not train_shares:
        return ""
    ((kind, shares),) = train_shares.items()
    return f"{kind} " + " / ".join(f"{group} {share:g}" for group, share in sorted(shares.items()))


# what a stage must teach its task for a finding about forgetting it to mean anything (pp of learning, judged as
# ``chainforget.metrics.learning`` judges it): the bar for the paper's safety and capability tasks
LEARNING_TARGETS = {"safety": 15.0, "capability": 10.0}


def learning_table(records: list[dict]) -> pd.DataFrame:
    """What each run's stages taught their tasks (``metrics.learning`` in the record; records without it are left
    out), one row per run x trained task: the regime (fine-tuning method, answer format, eval mode, learning rate,
    steps, training examples, seed), the base model's and the trained stage's balanced accuracy and most frequent
    answer's share, BBQ's accuracy per context, ``learned`` (pp) against the task role's target, and the stage's
    training time in minutes. A shortcut shows as a high answer share or a context below the base model's."""
    rows = []
    for record in records:
        config = record["config"]
        for row in record["metrics"].get("learning", []):
            task, stage = row["task"], row["trained_stage"]
            role = record["tasks"][task]["role"]
            target = LEARNING_TARGETS.get(role)
            contexts = {k: v for k, v in row.items() if k.startswith("acc_") and k.count("_") == 2}
            rows.append(
                {
                    "run_name": record["run_name"],
                    "task": task,
                    "role": role,
                    "finetune": config["model"]["finetune"],
                    "answer": config["train"].get("answer", "letter"),
                    "eval_mode": config["eval"]["mode"],
                    "lr": config["train"]["lr"],
                    "steps": config["train"]["steps"],
                    "train_examples": record["data"][task]["train"],
                    "mixture": shares_label(config["tasks"][task].get("train_shares")),
                    "seed": config["seed"],
                    "balanced_acc_base": PP * row["balanced_acc_base"],
                    "balanced_acc_trained": PP * row["balanced_acc_trained"],
                    "top_answer_share_base": PP * row["top_answer_share_base"],
                    "top_answer_share_trained": PP * row["top_answer_share_trained"],
                    **{name: PP * value for name, value in contexts.items()},
                    "gain": row["gain"],
                    "learned": row["learned"],
                    "target": target,
                    "met": None if target is None else row["learned"] >= target,
                    "train_min": record["stages"][stage - 1]["train"]["wall_s"] / 60,
                }
            )
    columns = ["task", "finetune", "answer", "mixture", "lr", "steps", "seed"]
    return pd.DataFrame(rows).sort_values(columns).reset_index(drop=True) if rows else pd.DataFrame(rows)


def asymmetry_seeds(records: list[dict]) -> pd.DataFrame:
    """One row per setting x safety task S x capability task C x seed that ran in both orders: ``F_safety`` =
    F_S(S→C), ``F_capability`` = F_C(C→S), the two runs' names and the difference ``asymmetry``. ``condition`` is
    the setting, the runs' condition without the order ("" when only the order varies), so runs differing in
    anything but the order and the seed are never paired."""
    settings = condition_labels(records, leave_out=("order",))
    first, roles = {}, {}
    for record in records:
        roles |= {task: facts["role"] for task, facts in record["tasks"].items()}
        order = record["config"]["order"]
        if len(order) != 2:
            continue
        for row in record["metrics"]["forgetting"]:
            if row["task"] == order[0] and row["group_kind"] == "all":
                first[(settings[record["run_name"]], *order, record["config"]["seed"])] = row["F"], record["run_name"]
    rows = []
    for (setting, a, b, seed), (f_safety, run_safety) in sorted(first.items()):
        partner = (setting, b, a, seed)
        if partner in first and roles[a] == "safety" and roles[b] == "capability":
            pair = {"condition": setting, "safety": a, "capability": b, "seed": seed}
            f_capability, run_capability = first[partner]
            forgotten = {"F_safety": f_safety, "F_capability": f_capability}
            rows.append(pair | forgotten | {"run_safety": run_safety, "run_capability": run_capability})
    columns = ["condition", "safety", "capability", "seed", "F_safety", "F_capability", "run_safety", "run_capability"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(asymmetry=frame["F_safety"] - frame["F_capability"])


def order_asymmetry(records: list[dict]) -> pd.DataFrame:
    """For each setting and each safety S and capability C run in both orders: ``F_S(S→C)`` vs ``F_C(C→S)``
    averaged over seeds, their mean difference with a 95% interval, and a paired t-test across seeds (paired by
    seed; see ``asymmetry_seeds``)."""
    from scipy import stats

    rows = []
    for (setting, a, b), part in asymmetry_seeds(records).groupby(["condition", "safety", "capability"], sort=True):
        mean, lo, hi = mean_interval(part["asymmetry"], bounds=DIFFERENCE_RANGE)
        p_value = float(stats.ttest_rel(part["F_safety"], part["F_capability"]).pvalue) if len(part) > 1 else None
        pair = {"condition": setting, "safety": a, "capability": b, "seeds": len(part)}
        forgotten = {"F_safety (S→C)": part["F_safety"].mean(), "F_capability (C→S)": part["F_capability"].mean()}
        difference = {"asymmetry": mean, "asymmetry_lo": lo, "asymmetry_hi": hi, "p_paired_t": p_value}
        rows.append(pair | forgotten | difference)
    return pd.DataFrame(rows)


POWER_COLUMNS = [
    *("condition", "task", "seeds", "n", "F", "F_sd", "se_source", "mde_F"),
    *("asymmetry_seeds", "asymmetry_sd", "asymmetry_se_source", "mde_asymmetry"),
]


def power_table(records: list[dict], target: float = 5.0, cap: int = 100) -> pd.DataFrame:
    """Power before data (``analysis.power``: 80 % power, two-sided alpha 0.05, pp), one row per condition x
    forgotten task: its seeds, mean eval size ``n`` and F, the sd of F over seeds (``F_sd``; none from one run),
    where the SE comes from (``se_source``: ``seeds``, else the one run's eval ``examples``, or the ``binomial bound``
    for records without per-example forgetting) and the MDE of F. Where the task's safety/capability pair ran in
    both orders (``asymmetry_seeds``), the order asymmetry's paired seeds, sd, SE source, MDE and the seeds an MDE of
    ``target`` pp would need at that sd (``beyond <cap>``; none from one seed). Per group kind, the median size of
    the groups that count (``small`` ones left out) and the MDE of BF_g of a group that size: from the median over
    groups of the sd of BF_g over seeds (none where no group ran in two seeds), or from one run's examples."""
    forgetting = forgetting_frame(records)
    flips = example_forgetting_frame(records).query("group_kind == 'all'")[["run_name", "task", "forgotten", "learned"]]
    whole = forgetting[forgetting["group_kind"] == "all"].merge(flips, on=["run_name", "task"], how="left")
    by_run = whole.set_index(["run_name", "task"])
    needed_column = f"seeds_for_asymmetry_mde_{target:g}pp"
    asymmetry = {}
    for _, pair in asymmetry_seeds(records).groupby(["condition", "safety", "capability"], sort=True):
        first = pair.iloc[0]
        runs = [(first["run_safety"], first["safety"]), (first["run_capability"], first["capability"])]
        spread = pair["asymmetry"].std() if len(pair) > 1 else None
        sides = [tuple(by_run.loc[run, ["n", "forgotten", "learned"]]) for run in runs]  # used with one seed only
        value, source = mde_asymmetry(len(pair), spread, sides)
        needed = None if spread is None else seeds_needed(spread, target, cap) or f"beyond {cap}"
        facts = {"asymmetry_seeds": len(pair), "asymmetry_sd": spread, "asymmetry_se_source": source}
        facts |= {"mde_asymmetry": value, needed_column: needed}
        asymmetry |= {(by_run.loc[run, "condition"], run[1]): facts for run in runs}
    rows = []
    for (condition, task), part in whole.groupby(["condition", "task"], sort=True):
        seeds, run = len(part), part.iloc[0]  # ``run``'s own numbers are used only when it is the only seed
        spread = part["F"].std() if seeds > 1 else None
        value, source = mde_forgetting(run["n"], seeds, spread, run["forgotten"], run["learned"])
        row = {"condition": condition, "task": task, "seeds": seeds, "n": part["n"].mean(), "F": part["F"].mean()}
        row |= {"F_sd": spread, "se_source": source, "mde_F": value} | asymmetry.get((condition, task), {})
        groups = forgetting[forgetting["run_name"].isin(part["run_name"]) & (forgetting["task"] == task)]
        counted = groups[(groups["group_kind"] != "all") & ~groups["small"].astype(bool)]  # as headline BF counts
        for kind, members in counted.groupby("group_kind"):
            per_group = members.groupby("group").agg(n=("n", "mean"), sd=("BF", "std"))  # sd: NaN from one seed
            size, sd = per_group["n"].median(), per_group["sd"].median()
            bf = None  # several seeds but no group in two of them: no spread to go on
            if seeds == 1 or not pd.isna(sd):
                bf = mde_biased_forgetting(size, run["n"], seeds, sd, run["forgotten"], run["learned"])[0]
            row |= {f"n_group ({kind})": size, f"mde_BF ({kind})": bf}
        rows.append(row)
    frame = pd.DataFrame(rows)
    columns = [*POWER_COLUMNS, needed_column]
    return frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])


def replay_recovery(records: list[dict]) -> pd.DataFrame:
    """Replay-stage runs by condition (without the ratio) and ratio r: how much of the first task's lost accuracy
    the replay stage won back (``recovered = (Acc3 - Acc2) / (Acc1 - Acc2)``) and how the last task's accuracy moved
    (pp), over seeds; and, where the condition has the r = 0 control (the third stage without replay: training
    longer), the recovery beyond it, paired by seed, with a paired t-test's p."""
    replayed = [record for record in records if record["mitigation"]["name"] == "replay_stage"]
    settings = condition_labels(replayed, leave_out=("mitigation.strength",))
    rows = []
    for record in replayed:
        replay_stage = record["stages"][-1]
        first, last = replay_stage["replays"][0], replay_stage["trains"][0]
        acc = {(r["stage"], r["task"]): 100.0 * r["acc"] for r in record["eval"] if r["group_kind"] == "all"}
        after = replay_stage["index"]
        before = after - 1  # the last stage before the replay stage
        lost, recovered = acc[(1, first)] - acc[(before, first)], acc[(after, first)] - acc[(before, first)]
        run = {"condition": settings[record["run_name"]], "ratio": record["config"]["mitigation"]["strength"]}
        run |= {"seed": record["config"]["seed"], "safety_task": first, "safety_lost": lost}
        run |= {"safety_recovered_pp": recovered, "recovered_share": recovered / lost if lost > 0 else None}
        rows.append(run | {"capability_change_pp": acc[(after, last)] - acc[(before, last)]})
    if not rows:
        return pd.DataFrame()
    runs, summary = pd.DataFrame(rows), []
    control = runs[runs["ratio"] == 0].groupby(["condition", "seed"])["safety_recovered_pp"].mean()
    no_control = pd.Series(dtype=float)
    for (condition, ratio), part in runs.groupby(["condition", "ratio"], sort=True):
        recovered, lo, hi = mean_interval(part["safety_recovered_pp"], bounds=FORGETTING_RANGE)
        kept, kept_lo, kept_hi = mean_interval(part["capability_change_pp"], bounds=FORGETTING_RANGE)
        row = {"condition": condition, "ratio": ratio, "seeds": len(part), "safety_lost_pp": part["safety_lost"].mean()}
        row |= {"safety_recovered_pp": recovered, "recovered_lo": lo, "recovered_hi": hi}
        row |= {"capability_change_pp": kept, "capability_lo": kept_lo, "capability_hi": kept_hi}
        mine = part.groupby("seed")["safety_recovered_pp"].mean()
        beyond = paired_by_seed(mine, control[condition] if condition in control.index else no_control)
        if not ratio:  # the control itself
            beyond |= {"mean": None, "lo": None, "hi": None, "p": None}
        row |= {
            "beyond_control_pp": beyond["mean"],
            "beyond_control_lo": beyond["lo"],
            "beyond_control_hi": beyond["hi"],
        }
        summary.append(row | {"control_seeds": beyond["seeds"], "p_vs_control": beyond["p"]})
    return pd.DataFrame(summary)


def curvature_forgetting(records: list[dict], resamples: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Top Hessian eigenvalue at the end of stage 1 vs the forgetting of that stage's task in stage 2, one row
    per two-stage run, and their Spearman correlation with a bootstrap 95% interval over runs (and how many of the
    estimates had not converged when the measurement stopped: ``not_converged``)."""
    import warnings

    from scipy import stats

    rows = []
    for record in records:
        stage = record["stages"][0]
        task = record["config"]["order"][0]
        forgotten = [
            r["F"]
            for r in record["metrics"]["forgetting"]
            if r["task"] == task and r["group_kind"] == "all" and r["later_stage"] == 2
        ]
        if stage.get("curvature") and forgotten:
            rows.append(
                {
                    "run_name": record["run_name"],
                    "task": task,
                    "top_eigenvalue": stage["curvature"]["top_eigenvalue"],
                    "F": forgotten[0],
                    "mitigation": record["mitigation"]["name"],
                    "converged": stage["curvature"].get("converged"),
                }
            )
    frame = pd.DataFrame(rows, columns=["run_name", "task", "top_eigenvalue", "F", "mitigation", "converged"])
    unconverged = int(frame["converged"].eq(False).sum()) if len(frame) else 0  # None: the record does not say
    counts = {"n": len(frame), "not_converged": unconverged}
    if len(frame) < 3:
        return frame, {"spearman": None, "lo": None, "hi": None, "p": None} | counts
    tested = stats.spearmanr(frame["top_eigenvalue"], frame["F"])
    rho, p_value = float(tested.statistic), float(tested.pvalue)
    with warnings.catch_warnings():  # a resample whose eigenvalues or F are all equal has no rank correlation (NaN)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (frame["top_eigenvalue"].to_numpy(float), frame["F"].to_numpy(float)),
            lambda x, y: stats.spearmanr(x, y).statistic,
            paired=True,  # resample runs, keeping each run's eigenvalue with its forgetting
            vectorized=False,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    lo, hi = result.confidence_interval
    if np.isnan(lo) or np.isnan(hi):  # scipy's percentiles take every resample: use those that have a correlation
        draws = result.bootstrap_distribution[~np.isnan(result.bootstrap_distribution)]
        lo, hi = np.percentile(draws, [2.5, 97.5]) if draws.size else (None, None)
    lo, hi = (None, None) if lo is None else (float(lo), float(hi))
    return frame, {"spearman": rho, "lo": lo, "hi": hi, "p": p_value} | counts
