"""The chain runner: base model -> stage 1 -> stage 2 ..., evaluated on every task after every stage.

One straight path: load data and model, evaluate stage 0, then for each stage train (or take it from the
stage cache) and evaluate, then derive metrics and write the run record, logging to W&B and CSV throughout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from chainforget import metrics, mitigations, tasks
from chainforget.config import ChainConfig, parse_stage, primary_order
from chainforget.errors import ConfigError
from chainforget.mitigations import apply_replay
from chainforget.models import (
    load_model,
    load_tokenizer,
    load_trainable,
    save_pretrained,
    save_trainable,
    trainable_parameters,
)
from chainforget.progress import bar_options
from chainforget.records import (
    PP,
    SCHEMA_VERSION,
    StageCache,
    atomic_write_text,
    content_key,
    environment,
    score_values,
    summary_metrics,
    write_record,
)
from chainforget.scoring import score_letters, score_text
from chainforget.tasks.sources import cache_root
from lightning_modules.checkpoint import SafetensorsCheckpointIO, StageCheckpoint
from lightning_modules.stage import CurvatureCallback, StageDataModule, StageModule, answer_loss


class ChainStopped(Exception):
    """Raised by an ``on_stage`` callback to end a chain early on purpose (e.g. an Optuna trial pruned after a
    stage): the W&B run ends as finished, tagged ``stopped``, no run record is written, and the exception is
    raised again to the caller."""


@contextmanager
def quiet_libraries():
    """Silence what a chain's user cannot act on: Lightning's per-fit notes (hardware summary, tips, "max_steps
    reached"), deprecations between the libraries (Lightning's own, peft calling transformers), transformers'
    bars for loading and saving weights. Other warnings stay."""
    from transformers.utils import logging as hf_logging

    notes = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level, bars = notes.level, hf_logging.is_progress_bar_enabled()
    notes.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
            yield
    finally:
        notes.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def run_name(config: ChainConfig) -> str:
    """The configured name, else the sweep agent's run id, else stages + seed + a hash of the config."""
    if config.run_name:
        return config.run_name
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    stages = "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", entry) for entry in config.order)
    return f"{stages}-seed{config.seed}-{content_key(config.to_dict())[:8]}"


@quiet_libraries()
def run_chain(
    config: ChainConfig,
    *,
    progress: bool = True,
    on_stage: Callable[[int, dict], None] | None = None,
    wandb_config: dict | None = None,
) -> dict:
    """Run one chain and return its run record (also written to ``config.out/<run name>``).

    ``on_stage(k, summary)`` is called after stage k's evaluation with the summary metrics of the chain so
    far (stage k taken as the last), e.g. for pruning; raising :class:`ChainStopped` ends the chain cleanly,
    any other exception ends it as failed (W&B exit code 1). ``wandb_config`` is merged into the W&B run's
    config (e.g. an Optuna trial's parameters).
    """
    config = replace(config, run_name=run_name(config))
    cache = StageCache(Path(config.cache_dir) if config.cache_dir else cache_root() / "stages", read=config.cache)
    order = apply_replay(config.order, config.mitigation)
    mixtures = [parse_stage(entry) for entry in order]
    eval_tasks = list(dict.fromkeys([t for m in mixtures for t in m] + config.eval.probes))
    # only the tasks this chain trains or probes: a config may list more (e.g. paper.yaml for a sweep)
    data = tasks.load_all({name: config.tasks[name] for name in eval_tasks}, config.seed, config.train_size)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, config.seed).to(eval_device(config))
    run_dir = Path(config.out) / config.run_name  # created only once data and model have loaded
    run_dir.mkdir(parents=True, exist_ok=True)
    run = start_wandb(config, run_dir, wandb_config)
    try:
        record, frame = run_stages(
            config, data, order, mixtures, eval_tasks, tokenizer, model, cache, run, run_dir, progress, on_stage
        )
    except ChainStopped as stop:
        if run is not None:
            run.tags = (*run.tags, "stopped")
            run.summary["stopped"] = str(stop)
            run.finish()
        raise
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    write_record(run_dir, record, frame)
    finish_wandb(run, record, run_dir)
    return record


def run_stages(config, data, order, mixtures, eval_tasks, tokenizer, model, cache, run, run_dir, progress, on_stage):
    """Evaluate the base model, then train (or take from the cache) and evaluate every stage."""
    kinds = {name: data[name].group_kinds for name in eval_tasks}
    key = content_key("base", asdict(config.model), config.seed)
    predictions = [evaluate(model, tokenizer, data, eval_tasks, 0, key, cache, config, progress)]
    log_stage_eval(run, predictions[-1], data)
    stages = []
    for index, (entry, mixture) in enumerate(zip(order, mixtures), start=1):
        mitigation = config.mitigation if config.mitigation.applies_to(index) else None
        fingerprints = {name: data[name].fingerprint for name in mixture}
        key = content_key(
            "stage",
            key,
            entry,
            asdict(config.train),
            fingerprints,
            config.seed + index,
            config.trainer.precision,
            asdict(mitigation) if mitigation else None,
            asdict(config.curvature) if config.curvature.applies_to(index) else None,
            *([config.trainer.numerics()] if config.trainer.numerics() else []),
        )
        cached = cache.get(key)
        if cached is not None:
            load_trainable(model, cached / "weights.safetensors")
            outcome = json.loads((cached / "stage.json").read_text())
        else:
            fisher = (
                estimate_fisher(model, tokenizer, data, order[index - 2], config)
                if mitigation and mitigation.name == "ewc"
                else None
            )
            checkpoints = run_dir / "checkpoints" / key
            outcome = train_stage(
                model, tokenizer, data, entry, index, config, mitigation, fisher, run, run_dir, checkpoints, progress
            )
            model.to(eval_device(config))  # Lightning hands the module back on the CPU

            def store(entry_dir: Path) -> None:
                save_trainable(model, entry_dir / "weights.safetensors")
                (entry_dir / "stage.json").write_text(json.dumps(outcome))

            cache.put(key, store)
            shutil.rmtree(checkpoints, ignore_errors=True)  # the cache entry supersedes them
        save_pretrained(model, tokenizer, run_dir / f"stage{index}")
        stages.append(
            {
                "index": index,
                "name": entry,
                "tasks": mixture,
                **outcome,
                "cache_hit": cached is not None,
                "cache_key": key,
            }
        )
        predictions.append(evaluate(model, tokenizer, data, eval_tasks, index, key, cache, config, progress))
        log_stage_eval(run, predictions[-1], data)
        if on_stage is not None:
            frame = pd.concat(predictions, ignore_index=True)
            rows = metrics.eval_rows(frame, kinds)
            so_far = {
                "eval": rows,
                "stages": stages,
                "metrics": derive_metrics(frame, rows, mixtures[:index], data, config),
            }
            on_stage(index, summary_metrics(so_far))

    frame = pd.concat(predictions, ignore_index=True)
    rows = metrics.eval_rows(frame, kinds)
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_name": config.run_name,
        "config": config.to_dict(),
        "environment": environment(str(next(model.parameters()).device), torch.get_num_threads()),
        "stages": stages,
        "eval": rows,
        "metrics": derive_metrics(frame, rows, mixtures, data, config),
        "data": {
            name: {"fingerprint": d.fingerprint, "train": len(d.train), "eval": len(d.eval)} for name, d in data.items()
        },
    }
    return record, frame


# The lightning.Trainer arguments the chain runner sets itself (every other one comes from the config's
# ``trainer`` block; tests/test_chain.py checks that the two together are all of Trainer's arguments): the
# stage's length is ``train.steps`` optimizer steps over a fixed draw of batches, the chain evaluates after each
# stage instead of a validation loop, and logging, checkpoints and progress are the runner's.
RUNNER_OWNED = (
    "logger",
    "callbacks",
    "max_steps",
    "max_epochs",
    "min_epochs",
    "min_steps",
    "max_time",
    "fast_dev_run",
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
    "reload_dataloaders_every_n_epochs",
    "enable_checkpointing",
    "enable_progress_bar",
    "enable_model_summary",
    "default_root_dir",
    "plugins",
    "barebones",
    "enable_autolog_hparams",
    "model_registry",
)


def eval_device(config: ChainConfig) -> torch.device:
    """Where evaluation (and the EWC Fisher) runs between fits: the accelerator the Trainer uses."""
    accelerator = config.trainer.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def stage_data(data, tokenizer, entry: str, steps: int, seed: int, config: ChainConfig) -> StageDataModule:
    datamodule = StageDataModule.prepared(
        data,
        tokenizer,
        stage=entry,
        batch_size=config.train.batch_size,
        steps=steps,
        max_seq_len=config.train.max_seq_len,
        seed=seed,
        bucket=config.train.bucket,
    )
    datamodule.setup()
    return datamodule


def estimate_fisher(model, tokenizer, data, previous_entry: str, config: ChainConfig) -> dict[str, torch.Tensor]:
    """EWC's diagonal Fisher at the end of the previous stage, on that stage's training data."""
    datamodule = stage_data(data, tokenizer, previous_entry, config.mitigation.fisher_batches, config.seed, config)
    parameters = trainable_parameters(model)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in datamodule.train_dataloader()]
    losses = [lambda batch=batch: answer_loss(model, batch) for batch in batches]
    return mitigations.diagonal_fisher(parameters, losses)


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, named after the stage, on stderr like every other bar (stdout keeps the results);
    one line per 30 s in a log file (chainforget.progress)."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.label,
            disable=self.is_disabled,
            leave=True,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
            **bar_options(),
        )

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(self.label)  # not Lightning's "Epoch 0": a stage is a step count

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version, which a stage does not have
        return metrics


def train_stage(
    model, tokenizer, data, entry, index, config, mitigation, fisher, run, run_dir, checkpoints: Path, progress
) -> dict:
    """Fit one stage, resuming from ``checkpoints/last.ckpt`` when an earlier attempt left one; returns its
    ``train``, ``mitigation`` and ``curvature`` summaries."""
    L.seed_everything(config.seed + index, workers=True, verbose=False)
    module = StageModule.wrapping(
        model,
        lr=config.train.lr,
        warmup_ratio=config.train.warmup_ratio,
        weight_decay=config.train.weight_decay,
        mitigation=mitigation,
        attention=config.train.attention,
        compile=config.train.compile,
    )
    module.fisher = fisher
    batches = config.train.steps * config.trainer.accumulate_grad_batches
    datamodule = stage_data(data, tokenizer, entry, batches, config.seed + index, config)
    loggers = [CSVLogger(run_dir, name="lightning_logs", version=f"stage{index}")]
    callbacks = [StageProgressBar(f"train stage {index} ({entry})")] if progress else []
    if config.curvature.applies_to(index):
        callbacks.append(CurvatureCallback(config.curvature))
    if config.trainer.checkpoint_every:
        callbacks.append(StageCheckpoint(checkpoints, config.trainer.checkpoint_every))
    resume = checkpoints / "last.ckpt"
    if run is not None:
        loggers.append(WandbLogger(experiment=run, prefix=f"stage{index}"))
    options = {name: value for name, value in asdict(config.trainer).items() if name != "checkpoint_every"}
    trainer = L.Trainer(
        **options,
        max_steps=config.train.steps,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        default_root_dir=run_dir,
        plugins=[SafetensorsCheckpointIO()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    if resume.exists():
        print(f"chainforget: stage {index} resumes from its checkpoint {resume}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    trainer.fit(module, datamodule, ckpt_path=resume if resume.exists() else None)
    train = {
        "steps": int(trainer.global_step),
        "tokens": int(module.tokens_seen),
        "wall_s": round(time.perf_counter() - started, 3),
        "final_loss": module.final_loss,
        "weight_drift": module.weight_drift(),
    }
    return {
        "train": train,
        "mitigation": mitigation_summary(config, index, entry, module, datamodule),
        "curvature": module.curvature,
    }


def mitigation_summary(config: ChainConfig, index: int, entry: str, module: StageModule, datamodule) -> dict | None:
    """What the mitigation did in this stage: its mean penalty (or SAM perturbation), or the replayed ids."""
    spec = config.mitigation
    if spec.name.startswith("replay"):
        rewritten = (
            index > len(config.order) or entry != config.order[index - 1]
        )  # the replay stage, or a mixed-in stage
        replayed = mitigations.earlier_tasks(config.order, index) if rewritten else []
        if not replayed:
            return None
        ids = {name: datamodule.drawn_ids.get(name, []) for name in replayed}
        return {"name": spec.name, "strength": spec.strength, "replay_ids": ids}
    if module.mitigation.name == "none":
        return None
    mean = module.mitigation_total / max(1, config.train.steps)
    field = "mean_perturbation" if spec.name == "sam" else "mean_penalty"
    return {
        "name": spec.name,
        "strength": spec.strength,
        field: mean,
        **({"temperature": spec.temperature} if spec.name == "lwf" else {}),
    }


def evaluate(model, tokenizer, data, names, stage, stage_key, cache, config, progress) -> pd.DataFrame:
    """Per-example predictions of every eval task at one stage (cached under the stage's key)."""
    frames = []
    for name in names:
        key = content_key(
            "eval",
            stage_key,
            data[name].fingerprint,
            config.train.max_seq_len,
            config.trainer.precision,
            config.eval.mode,
        )
        cached = cache.get(key)
        if cached is None:
            frame = predictions_frame(
                model, tokenizer, data[name], config, progress, desc=f"eval {name} @ stage {stage}"
            )
            cached = cache.put(key, lambda d: frame.to_parquet(d / "predictions.parquet", index=False))
        frames.append(pd.read_parquet(cached / "predictions.parquet").assign(stage=stage))
    return pd.concat(frames, ignore_index=True)


def predictions_frame(model, tokenizer, task_data, config, progress, desc) -> pd.DataFrame:
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


def derive_metrics(frame, rows, mixtures, data, config) -> dict:
    last = len(mixtures)
    trained = metrics.trained_stages([parse_stage(e) for e in primary_order(config.order, config.mitigation.name)])
    trained_at = {task: stage for task, stage in trained.items() if stage <= last}
    forgetting_rows, biased_rows = [], []
    for task, stage in sorted(trained_at.items(), key=lambda item: item[1]):
        if stage >= last:
            continue
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
                {
                    "task": task,
                    "trained_stage": stage,
                    "later_stage": last,
                    "group_kind": row["group_kind"],
                    "group": row["group"],
                    "n": int(row["n"]),
                    "F": row["F"],
                    "F_ci": ci.get("F"),
                    "BF": None if np.isnan(row["BF"]) else row["BF"],
                    "BF_ci": ci.get("BF"),
                    "small": bool(row["n"] < config.eval.min_group_size) and row["group_kind"] != metrics.ALL,
                }
            )
        for summary in metrics.biased_forgetting(per_group, config.eval.min_group_size):
            ci = intervals.get((summary["group_kind"], summary["worst_group"]), {})
            biased_rows.append({"task": task, **summary, "BF_ci": ci.get("BF")})
    return {
        "units": "pp",
        "forgetting": forgetting_rows,
        "biased_forgetting": biased_rows,
        "cl": metrics.cl_metrics(metrics.accuracy_matrix(rows), trained_at),
        "task_scores": stage_scores(frame),
    }


def start_wandb(config: ChainConfig, run_dir: Path, extra_config: dict | None = None):
    """One W&B run per chain; ``stage`` is the step metric of every ``eval/*`` series."""
    import wandb

    mode = wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return None
    # Under `wandb agent` the run's id, project and entity are the sweep's (W&B ignores them with a warning)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    # a re-run of a killed chain (same run directory) continues the same W&B run instead of starting another
    id_file = run_dir / "wandb_run_id"
    run_id = os.environ.get("WANDB_RUN_ID") or (
        id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    )
    atomic_write_text(id_file, run_id)
    run = wandb.init(
        id=None if in_sweep else run_id,
        resume="allow",
        project=None if in_sweep else config.wandb.project or os.environ.get("WANDB_PROJECT") or "chainforget",
        entity=None if in_sweep else config.wandb.entity,
        group=config.wandb.group or os.environ.get("WANDB_RUN_GROUP") or config.run_name,
        job_type="chain",
        name=config.run_name,
        dir=str(run_dir),
        config={**config.to_dict(), **(extra_config or {})},
        tags=config.wandb.tags,
        mode=mode,
        settings=wandb.Settings(silent=True, console="off"),
    )
    run.define_metric("stage")
    run.define_metric("eval/*", step_metric="stage")
    return run


def wandb_mode(configured: str | None) -> str:
    """The config's ``wandb.mode`` if set, else W&B's own (``$WANDB_MODE``, ``wandb offline``, a sweep agent's
    environment); where that is online but no credentials exist, offline, said once per process on stderr."""
    if configured:
        return configured
    import wandb

    try:
        mode = wandb.setup().settings.mode
    except ValueError as exc:  # pydantic's ValidationError: a malformed WANDB_MODE
        raise ConfigError(
            f"WANDB_MODE={os.environ.get('WANDB_MODE')!r}: not allowed; use online, offline or disabled"
        ) from exc
    if mode in ("online", "run", "shared") and not wandb_credentials():
        say_offline_once()
        return "offline"
    return mode


@functools.cache
def say_offline_once() -> None:
    print(
        "chainforget: no W&B login and no WANDB_MODE: W&B runs are logged offline in each run directory's wandb/ "
        "(`wandb login`, then `wandb sync <dir>` uploads them; WANDB_MODE=disabled turns W&B off)",
        file=sys.stderr,
        flush=True,
    )


def wandb_credentials() -> bool:
    """Whether W&B finds credentials (``$WANDB_API_KEY``, ``.netrc`` from ``wandb login``, its settings) without
    prompting. The lookup lives in a private module that moves between wandb releases: without it, wandb.init
    decides."""
    import wandb

    try:
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:
        return True
    try:
        host = wandb.setup().settings.base_url
        return authenticate_session(host=host, source="chainforget", prompt=False, update_session=False) is not None
    except Exception:  # a malformed key: let wandb.init report it in its own words
        return True


def stage_scores(predictions: pd.DataFrame) -> list[dict]:
    """Task-specific safety scores (BBQ bias scores, ToxiGen per-group detection) of one stage."""
    rows = []
    for (stage, task), part in predictions.groupby(["stage", "task"], sort=True):
        rows += [{"task": task, "stage": int(stage), **row} for row in tasks.get(task).scores(part)]
    return rows


def log_stage_eval(run, predictions: pd.DataFrame, data) -> None:
    """History row of one stage: accuracy per task and group, and the task-specific scores."""
    if run is None:
        return
    stage = int(predictions["stage"].iloc[0])
    rows = metrics.eval_rows(predictions, {name: data[name].group_kinds for name in predictions["task"].unique()})
    history = {"stage": stage}
    for row in rows:
        suffix = "acc" if row["group_kind"] == metrics.ALL else f"{row['group_kind']}/{row['group']}/acc"
        history[f"eval/{row['task']}/{suffix}"] = PP * row["acc"]
    for row in stage_scores(predictions):
        for name, value in score_values(row).items():
            history[f"eval/{row['task']}/{row['group_kind']}/{row['group']}/{name}"] = value
    run.log(history)


def finish_wandb(run, record: dict, run_dir: Path) -> None:
    if run is None:
        return
    import wandb

    run.summary.update(summary_metrics(record))
    run.log({"eval_matrix": wandb.Table(dataframe=pd.DataFrame(record["eval"]))})
    for name in ("run.json", "predictions.parquet"):  # the run's files folder is uploaded as it is at the end
        shutil.copy2(run_dir / name, Path(run.dir) / name)
    run.finish()
