"""What a chain measures, framework-free: each task's per-example predictions at a stage, the task-specific
safety scores, and the chain's derived metrics (forgetting, biased forgetting, continual-learning matrix
metrics) over its stage plan. The runner calls these; the run record holds what they return."""

from __future__ import annotations

import numpy as np
import pandas as pd

from chainforget import metrics, tasks
from chainforget.config import ChainConfig
from chainforget.plan import StagePlan, trained_at
from chainforget.scoring import score_letters, score_text


def predictions_frame(model, tokenizer, task_data, config: ChainConfig, progress: bool, desc: str) -> pd.DataFrame:
    """One row per eval example of ``task_data``: label, prediction, option log-probabilities, its groups and
    the scalar fields of its ``meta`` (what task scores read, e.g. BBQ's polarity)."""
    examples = task_data.eval
    settings = dict(
        batch_size=config.eval.batch_size, max_seq_len=config.train.max_seq_len, precision=config.trainer.precision
    )
    if config.eval.mode == "letter":
        scores = score_letters(model, tokenizer, examples, desc=desc, progress=progress, **settings)
    else:
        normalize = "length" if config.eval.mode == "text_norm" else "sum"
        scores = score_text(model, tokenizer, examples, normalize=normalize, progress=progress, **settings)
    labels = np.array([e.label for e in examples])
    frame = pd.DataFrame(
        {
            "task": task_data.name,
            "example_id": [e.id for e in examples],
            "label": labels,
            "pred": scores.pred,
            "correct": (scores.pred == labels).astype(np.int8),
            "option_logprobs": scores.option_logprobs,
        }
    )
    for kind in task_data.group_kinds:
        frame[kind] = [e.groups[kind] for e in examples]
    for key in sorted({k for e in examples for k, v in e.meta.items() if isinstance(v, (str, int, float, type(None)))}):
        if key not in frame.columns:
            frame[key] = [e.meta.get(key) for e in examples]
    return frame


def stage_scores(predictions: pd.DataFrame) -> list[dict]:
    """Task-specific safety scores (BBQ bias scores, ToxiGen per-group detection) of one stage."""
    rows = []
    for (stage, task), part in predictions.groupby(["stage", "task"], sort=True):
        rows += [{"task": task, "stage": int(stage), **row} for row in tasks.get(task).scores(part)]
    return rows


def task_facts(plans: list[StagePlan], data) -> dict:
    """What the record states about each task: its role, its groups and the stage that trained it (``None``:
    a probe, never trained)."""
    trained = trained_at(plans)
    return {
        name: {"role": task.role, "group_kinds": list(task.group_kinds), "trained_stage": trained.get(name)}
        for name, task in data.items()
    }


def chain_metrics(frame, rows, plans: list[StagePlan], data, config: ChainConfig) -> dict:
    """Forgetting (per group and per example), biased forgetting, CL matrix metrics and task scores of the chain up
    to its last plan."""
    last = len(plans)
    trained = trained_at(plans)
    forgetting_rows, biased_rows, example_rows = [], [], []

    def small(row: dict) -> bool:  # reported, but left out of max/spread and of the figures
        return bool(row["n"] < config.eval.min_group_size) and row["group_kind"] != metrics.ALL

    for task, stage in sorted(trained.items(), key=lambda item: item[1]):
        if stage >= last:
            continue
        stages = {"task": task, "trained_stage": stage, "later_stage": last}
        per_example = metrics.example_forgetting(frame, task, stage, last, data[task].group_kinds)
        example_rows += [stages | row | {"small": small(row)} for row in per_example.to_dict("records")]
        per_group = metrics.group_forgetting(rows, task, stage, last)
        at = frame[(frame["task"] == task) & (frame["stage"] == stage)].set_index("example_id")
        after = frame[(frame["task"] == task) & (frame["stage"] == last)].set_index("example_id").loc[at.index]
        intervals = {}
        if config.eval.bootstrap > 0:
            groups = {kind: at[kind].to_numpy() for kind in data[task].group_kinds}
            intervals = metrics.paired_bootstrap(
                at["correct"].to_numpy(),
                after["correct"].to_numpy(),
                groups,
                resamples=config.eval.bootstrap,
                seed=config.seed,
            )
        for row in per_group.to_dict("records"):
            ci = intervals.get((row["group_kind"], row["group"]), {})
            forgetting_rows.append(
                stages
                | {
                    "group_kind": row["group_kind"],
                    "group": row["group"],
                    "n": int(row["n"]),
                    "F": row["F"],
                    "F_ci": ci.get("F"),
                    "BF": None if np.isnan(row["BF"]) else row["BF"],
                    "BF_ci": ci.get("BF"),
                    "small": small(row),
                }
            )
        for summary in metrics.biased_forgetting(per_group, config.eval.min_group_size):
            ci = intervals.get((summary["group_kind"], summary["worst_group"]), {})
            biased_rows.append({"task": task, **summary, "BF_ci": ci.get("BF")})
    return {
        "units": "pp",
        "forgetting": forgetting_rows,
        "biased_forgetting": biased_rows,
        "example_forgetting": example_rows,
        "cl": metrics.cl_metrics(metrics.accuracy_matrix(rows), trained),
        "task_scores": stage_scores(frame),
        "learning": metrics.learning(frame, trained),
    }
