"""The chain runner: base model -> stage 1 -> stage 2 ..., evaluated on every task after every stage.

One straight path: plan the stages, load data and model, evaluate stage 0, then for each stage train it (or
take it from the stage cache) and evaluate it, then write the run record. What is measured lives in
``chainforget.evaluation``, the record in ``chainforget.records``, W&B in ``lightning_modules.tracking``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.tensor import DTensor

from chainforget import allocator, curvature, evaluation, metrics, mitigations, tasks
from chainforget.config import ChainConfig, MitigationSpec, complete_config
from chainforget.errors import ConfigError
from chainforget.models import (
    check_quantization,
    frozen_in_fp32,
    load_model,
    load_tokenizer,
    load_trainable,
    lora_layers,
    save_pretrained,
    save_trainable,
    trainable_parameters,
)
from chainforget.plan import StagePlan, plan_chain, safety_stage
from chainforget.progress import bar_options
from chainforget.records import (
    StageCache,
    atomic_write_text,
    content_key,
    environment,
    flat_config,
    new_record,
    summary_metrics,
    write_record,
)
from chainforget.scoring import check_prompt_fits
from chainforget.tasks import TaskData
from lightning_modules import tracking
from lightning_modules.checkpoint import SafetensorsCheckpointIO, StageCheckpoint, StageCSVLogger
from lightning_modules.stage import StageDataModule, StageModule, answer_loss, stage_curvature


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


RUN_CONFIG = "config.json"  # the resolved config of the chain that writes (or wrote) a run directory


def refuse_a_different_run(run_dir: Path, config: ChainConfig) -> None:
    """A run directory belongs to one chain: the same config again resumes it (a killed run continues, a finished
    one is read back from the cache); a config that differs in what it computes (``records.NON_RESULT_KEYS``
    aside) is refused, so an earlier run is never overwritten."""
    written = run_dir / RUN_CONFIG
    if not written.exists() and (run_dir / "run.json").exists():  # a run written before config.json existed
        written = run_dir / "run.json"
    if not written.exists():
        return
    try:
        content = json.loads(written.read_text(encoding="utf-8"))
        # a setting added since the run was written counts as the same at its default
        earlier = flat_config(complete_config(content["config"] if written.name == "run.json" else content))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{written}: unreadable ({exc}); move the run directory away to start over") from None
    now = flat_config(config.to_dict())
    changed = [key for key in dict.fromkeys([*earlier, *now]) if earlier.get(key, "unset") != now.get(key, "unset")]
    if changed:
        shown = ", ".join(f"{key}: {earlier.get(key, 'unset')!r} -> {now.get(key, 'unset')!r}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"run_name {config.run_name!r}: {run_dir} holds a run with a different config ({shown}{more}); the same "
            "config resumes it; pass --run_name=NEW or another --out to keep both, or move that directory away"
        )


def hold_run_dir(run_dir: Path, name: str, held: ExitStack) -> None:
    """Lock ``run_dir`` for this process until ``held`` closes (or the process dies): two independent processes on
    one run would interleave their logs and write two W&B runs with one id, so the second is refused. The ranks
    above 0 of one data-parallel run (Lightning's launcher sets ``LOCAL_RANK``/``NODE_RANK``) share rank 0's."""
    if not writes_the_run():
        return
    descriptor = os.open(run_dir, os.O_RDONLY)
    held.callback(os.close, descriptor)  # closing it releases the lock
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"run_name {name!r}: {run_dir} is in use by another running chain; wait for it to end (then the same "
            "command resumes or reads back its run), or pass --run_name=NEW"
        ) from None
    except OSError:  # a filesystem without flock (some network mounts): run unlocked rather than not at all
        pass


def writes_the_run() -> bool:
    """Whether this process writes the run (its directory, record, stage cache entries, W&B run): the only process,
    or rank 0 of a data-parallel chain. Every rank runs the whole chain (srun and torchrun start them so, and
    Lightning's own launcher starts the others at the first fit by running the same command again): the ranks
    above 0 repeat its evaluations, so that all reach each fit together, and write nothing. Before the first fit
    only the environment tells them apart (``rank_zero_only.rank``: RANK, LOCAL_RANK or SLURM_PROCID; NODE_RANK
    for Lightning's launcher on several nodes)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def preflight(config: ChainConfig) -> tuple[ChainConfig, list[StagePlan]]:
    """What a chain checks before it reads data or loads a model: its run name, that its run directory holds no
    different run, Lightning's trainer options, its stage plan. A user's error raises ChainforgetError; nothing is
    written. Returns the config with its run name, and the plan."""
    config = replace(config, run_name=run_name(config))
    for key in ("out", "cache_dir"):
        folder = getattr(config, key)
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{key}: {folder!r} is a file; use a folder (it is created where missing)")
    refuse_a_different_run(Path(config.out) / config.run_name, config)
    check_quantization(config.model)
    processes = check_trainer_options(trainer_options(config) | {"strategy": stage_strategy(config)})
    if processes > 1:
        check_data_parallel(config, processes)
    if config.trainer.strategy == "fsdp":
        check_sharding(config)
    tracking.check_settings(config)
    return config, plan_chain(config)


def check_data_parallel(config: ChainConfig, processes: int) -> None:
    """What a data-parallel chain needs: a batch that splits over its processes, processes that each run the whole
    chain (Lightning's ``ddp``, or ranks started by srun or torchrun: a spawned or forked worker would hand back
    the weights but not the stage's record), and one answer from the stage cache for all of them (only rank 0
    would see a W&B artifact)."""
    StageDataModule.check_split(config.train.batch_size, processes, "train.batch_size")
    strategy = config.trainer.strategy
    if strategy not in ("auto", "ddp", "fsdp") and not strategy.startswith("ddp_find"):
        raise ConfigError(
            f"trainer.strategy: {strategy!r} is not supported for a chain of {processes} processes: spawned and "
            "forked workers (ddp_spawn, ddp_fork, ddp_notebook) and deepspeed do not hand the whole model and the "
            "stage's record back to the chain; use ddp, or fsdp to shard the weights and optimizer state"
        )
    if config.cache == "wandb":
        raise ConfigError(
            "cache: wandb fetches stages on rank 0 alone, so the ranks of a data-parallel chain could disagree on "
            "which stages to train; use a shared cache_dir with cache: true"
        )


def check_sharding(config: ChainConfig) -> None:
    """What a sharded (FSDP) chain cannot do: a mitigation that reads the weights inside each training step (a
    penalty on them, SAM's ascent) would see only this process's shard of them; a 4-bit base is not sharded by
    FSDP."""

    def reads_weights(rule: mitigations.Mitigation) -> bool:
        return rule.kind == "sam" or (rule.kind == "penalty" and bool(rule.needs & {"anchor", "fisher", "safety"}))

    if reads_weights(config.mitigation.rule):
        allowed = ", ".join(name for name, rule in mitigations.MITIGATIONS.items() if not reads_weights(rule))
        raise ConfigError(
            f"mitigation.name: {config.mitigation.name!r} reads the weights in every training step, which "
            f"trainer.strategy fsdp shards across processes; with fsdp use {allowed}, or use ddp"
        )
    if config.model.quantization != "none":
        raise ConfigError(
            f"model.quantization: {config.model.quantization!r} cannot be sharded by trainer.strategy fsdp; use ddp "
            "(one 4-bit model per process) or quantization: none"
        )


def check_trainer_options(options: dict) -> int:
    """Lightning's own checks of ``lightning.Trainer`` arguments (accelerator, precision, strategy, devices, profiler
    names), run on a throwaway Trainer before anything loads or is written; its refusal becomes one line. A Trainer
    built from the user's options alone raises TypeError for a form it cannot take (a device list on the CPU).
    Returns how many processes a fit runs (its ``world_size``)."""
    try:
        with quiet_libraries():  # Lightning's hardware notes about a Trainer that never runs
            trainer = L.Trainer(**options, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        return trainer.world_size
    except (ValueError, TypeError, MisconfigurationException) as exc:
        raise ConfigError(f"trainer: {str(exc).strip().splitlines()[0]}") from None


def trainer_options(config: ChainConfig) -> dict:
    """The ``lightning.Trainer`` arguments the config's ``trainer`` block sets."""
    return {name: value for name, value in asdict(config.trainer).items() if name != "checkpoint_every"}


def run_name(config: ChainConfig) -> str:
    """The configured name, else the sweep agent's run id, else stages + seed + a hash of the config."""
    if config.run_name:
        return config.run_name
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    stages = "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", entry) for entry in config.order)
    return f"{stages}-seed{config.seed}-{content_key(config.to_dict())[:8]}"


@dataclass
class ChainRun:
    """What every stage of one chain shares, loaded once: its config and stage plan, the data of the tasks it
    trains or probes (in evaluation order), the model being tuned, the stage cache, the run directory and the
    W&B run (``None`` when W&B is disabled)."""

    config: ChainConfig
    plans: list[StagePlan]
    data: dict[str, TaskData]
    tokenizer: object
    model: torch.nn.Module
    cache: StageCache
    run_dir: Path
    tracker: object | None
    progress: bool
    # the safety direction, once the safety stage has run (mitigations that keep to it): each adapted layer's
    # subspace and the trainable weights that stage ended with
    safety_layers: dict[str, mitigations.SafetyLayer] | None = None
    safety_weights: dict[str, torch.Tensor] | None = None


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
    run_dir = Path(config.out) / config.run_name
    with ExitStack() as held:
        resuming = run_dir.exists()
        if resuming:  # refuse a second process on this run before either loads anything
            hold_run_dir(run_dir, config.run_name, held)
        config, plans = preflight(config)  # before anything is written or removed
        # only the tasks this chain trains or probes: a config may list more (e.g. paper.yaml for a sweep)
        names = dict.fromkeys([task for plan in plans for task in plan.mixture] + config.eval.probes)
        data = tasks.load_all({name: config.tasks[name] for name in names}, config.seed, config.train_size)
        tokenizer = load_tokenizer(config.model)
        check_prompt_fits(tokenizer, data, config.train.max_seq_len, "train.max_seq_len")
        allocator.release_free_memory()  # what an earlier chain of this process freed, before this one's model
        model = load_model(config.model, config.seed).to(eval_device(config))
        run_dir.mkdir(parents=True, exist_ok=True)  # created only once data and model have loaded
        if not resuming:
            hold_run_dir(run_dir, config.run_name, held)
            refuse_a_different_run(run_dir, config)  # another process may have written it while this one loaded
        writes = writes_the_run()
        if writes:
            atomic_write_text(run_dir / RUN_CONFIG, json.dumps(config.to_dict(), indent=1))
        tracker = tracking.start_run(config, run_dir, wandb_config) if writes else None
        remote = tracking.ArtifactCache(tracker) if config.cache == "wandb" and writes else None
        cache = StageCache.at(config.cache_dir, read=config.cache is not False, remote=remote, write=writes)
        chain = ChainRun(config, plans, data, tokenizer, model, cache, run_dir, tracker, progress)
        try:
            record, frame = run_stages(chain, on_stage)
        except ChainStopped as stop:
            tracking.stop_run(tracker, str(stop))
            raise
        except BaseException:
            tracking.stop_run(tracker, None)
            raise
        if writes:
            write_record(run_dir, record, frame)
            tracking.finish_run(tracker, record, run_dir)
        return record


def run_stages(chain: ChainRun, on_stage: Callable[[int, dict], None] | None) -> tuple[dict, pd.DataFrame]:
    """Evaluate the base model, then train (or take from the cache) and evaluate every stage."""
    config, data = chain.config, chain.data
    kinds = {name: task.group_kinds for name, task in data.items()}
    key = content_key("base", keyed(config.model), config.seed)
    predictions = [evaluate(chain, 0, key)]
    tracking.log_stage(chain.tracker, predictions[-1], data)
    stages = []
    direction_from = safety_stage(config.order) if "safety" in config.mitigation.rule.needs else None
    for plan in chain.plans:
        before = mitigations.snapshot(trainable_parameters(chain.model)) if plan.index == direction_from else None
        stage, key = train_or_reuse(chain, plan, key)
        if before is not None:
            chain.safety_weights = mitigations.snapshot(trainable_parameters(chain.model))
            chain.safety_layers = mitigations.safety_layers(lora_layers(chain.model), before, chain.safety_weights)
        stages.append(stage)
        predictions.append(evaluate(chain, plan.index, key))
        tracking.log_stage(chain.tracker, predictions[-1], data)
        if on_stage is not None:
            frame = pd.concat(predictions, ignore_index=True)
            rows = metrics.eval_rows(frame, kinds)
            so_far = evaluation.chain_metrics(frame, rows, chain.plans[: plan.index], data, config)
            on_stage(plan.index, summary_metrics({"eval": rows, "stages": stages, "metrics": so_far}))
    frame = pd.concat(predictions, ignore_index=True)
    rows = metrics.eval_rows(frame, kinds)
    record = new_record(
        config=config.to_dict(),
        environment=environment(str(next(chain.model.parameters()).device), torch.get_num_threads()),
        stages=stages,
        eval_rows=rows,
        metrics=evaluation.chain_metrics(frame, rows, chain.plans, data, config),
        tasks=evaluation.task_facts(chain.plans, data),
        mitigation=mitigations.facts(config.mitigation.name),
        data={
            name: {"fingerprint": d.fingerprint, "train": len(d.train), "eval": len(d.eval)} for name, d in data.items()
        },
    )
    return record, frame


def train_or_reuse(chain: ChainRun, plan: StagePlan, previous_key: str) -> tuple[dict, str]:
    """Train one stage, or take it from the stage cache when the same stage ran before (same model, same stages
    before it, same data, settings and seed); either way its weights end up in ``run_dir/stage<k>/`` in
    ``save_pretrained`` form. Returns the stage's record entry and its cache key."""
    config, model = chain.config, chain.model
    mitigation = plan.mitigation
    key = content_key(
        "stage",
        TRAINING_NUMERICS,
        previous_key,
        plan.entry,
        keyed(config.train),
        {name: chain.data[name].fingerprint for name in plan.mixture},
        plan.seed,
        config.trainer.precision,
        keyed(mitigation) if mitigation else None,
        asdict(config.curvature) if plan.curvature else None,
        *([config.trainer.numerics()] if config.trainer.numerics() else []),
    )
    cached = chain.cache.get_stage(key)
    if cached is not None:
        weights, outcome = cached
        load_trainable(model, weights)
    else:
        needs_fisher = mitigation is not None and "fisher" in mitigation.rule.needs
        fisher = estimate_fisher(chain, chain.plans[plan.index - 2].entry) if needs_fisher else None
        checkpoints = chain.run_dir / "checkpoints" / key
        outcome = train_stage(chain, plan, fisher, checkpoints)
        model = chain.model.to(eval_device(config))  # Lightning hands the module back on the CPU
        chain.cache.put_stage(key, lambda path: save_trainable(model, path), outcome)
        if writes_the_run():
            shutil.rmtree(checkpoints, ignore_errors=True)  # the cache entry supersedes them
    if plan.curvature:
        outcome = outcome | {"curvature": measured_curvature(chain, plan, key)}
    if writes_the_run():
        save_pretrained(model, chain.tokenizer, chain.run_dir / f"stage{plan.index}")
    facts = {"index": plan.index, "name": plan.entry, "tasks": plan.mixture, "trains": list(plan.trains)}
    stage = facts | {"replays": list(plan.replays), **outcome, "cache_hit": cached is not None, "cache_key": key}
    return stage, key


def measured_curvature(chain: ChainRun, plan: StagePlan, stage_key: str) -> dict:
    """The Hessian of the stage's training loss at its end, on the first ``curvature.batches`` of its training
    batches (``stage_curvature``), cached apart from the stage under its key and ``curvature.METHOD`` (a stage
    cached before the method changed is measured again, not retrained)."""
    config, spec = chain.config, chain.config.curvature
    key = content_key("curvature", stage_key, curvature.METHOD, asdict(spec), config.trainer.precision)
    found = chain.cache.get_measurement(key)
    if found is not None:
        return found
    datamodule = stage_data(chain, plan.entry, config.train.steps * config.trainer.accumulate_grad_batches, plan.seed)
    loader = iter(datamodule.loader())
    batches = [next(loader) for _ in range(spec.batches)]
    return chain.cache.put_measurement(key, stage_curvature(chain.model, batches, spec, config.trainer.precision))


# Settings added after stages were first cached, left out of the cache keys while they are at their defaults (or, for
# a mitigation, where it does not read them), so that entries cached before they existed stay valid; gradient
# checkpointing never, since it recomputes the same activations and so never changes a gradient.
ADDED_LATER = ("quantization", "replay_share", "group_kind")
NEVER_KEYED = ("gradient_checkpointing",)


def keyed(spec) -> dict:
    """A settings block as a cache key part: ``asdict`` less ``NEVER_KEYED`` and the ``ADDED_LATER`` settings at
    their defaults (a mitigation's: where it does not read them)."""
    reads = spec.rule.knobs if isinstance(spec, MitigationSpec) else ()
    defaults = {f.name: f.default for f in fields(spec)}
    return {
        key: value
        for key, value in asdict(spec).items()
        if key not in NEVER_KEYED and not (key in ADDED_LATER and key not in reads and value == defaults[key])
    }


# How a stage computes, where it changed results at the rounding level (a cached stage of other numerics is not the
# same stage): fused AdamW since 2026-12-01.
TRAINING_NUMERICS = "adamw-fused"

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
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # each rank its own GPU, before a fit
    return torch.device("cpu")


def stage_data(
    chain: ChainRun, entry: str, batches: int, seed: int, group_by: dict[str, str] | None = None
) -> StageDataModule:
    """The stage's data module over the chain's loaded data: ``batches`` batches drawn from ``entry``'s mixture,
    the examples of the tasks in ``group_by`` labelled with their group of that kind."""
    train = chain.config.train
    datamodule = StageDataModule.prepared(
        chain.data,
        chain.tokenizer,
        mixture=entry,
        batch_size=train.batch_size,
        steps=batches,
        max_seq_len=train.max_seq_len,
        seed=seed,
        bucket=train.bucket,
        answer=train.answer,
    )
    datamodule.group_by = group_by or {}
    datamodule.setup()
    return datamodule


def estimate_fisher(chain: ChainRun, previous_entry: str) -> dict[str, torch.Tensor]:
    """EWC's diagonal Fisher at the end of the previous stage, on that stage's training data."""
    datamodule = stage_data(chain, previous_entry, chain.config.mitigation.fisher_batches, chain.config.seed)
    model = chain.model
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in datamodule.train_dataloader()]
    losses = [lambda batch=batch: answer_loss(model, batch) for batch in batches]
    with frozen_in_fp32(model):  # an fp32 computation, outside autocast
        return mitigations.diagonal_fisher(trainable_parameters(model), losses)


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


def train_stage(chain: ChainRun, plan: StagePlan, fisher: dict | None, checkpoints: Path) -> dict:
    """Fit one stage, resuming from the checkpoint an earlier attempt left (``StageCheckpoint.resumable``); returns its
    ``train``, ``mitigation`` and ``curvature`` summaries."""
    config, run_dir, index = chain.config, chain.run_dir, plan.index
    L.seed_everything(plan.seed, workers=True, verbose=False)
    module = StageModule.wrapping(
        chain.model,
        lr=config.train.lr,
        warmup_ratio=config.train.warmup_ratio,
        weight_decay=config.train.weight_decay,
        mitigation=plan.mitigation,
        attention=config.train.attention,
        compile=config.train.compile,
        gradient_checkpointing=config.train.gradient_checkpointing,
    )
    module.fisher, module.safety = fisher, chain.safety_layers
    batches = config.train.steps * config.trainer.accumulate_grad_batches
    spec = plan.mitigation
    group_by = None
    if spec is not None and spec.rule.weighs_replay:
        kinds = {task: chain.data[task].group_kinds for task in plan.replays}
        group_by = {task: (spec.group_kind or kinds[task][0]) if kinds[task] else None for task in plan.replays}
    datamodule = stage_data(chain, plan.entry, batches, plan.seed, group_by)
    resume = StageCheckpoint.resumable(checkpoints)
    resumed_at = SafetensorsCheckpointIO.global_step(resume) if resume else None
    loggers = [StageCSVLogger(run_dir, name="lightning_logs", version=f"stage{index}", resumed_at=resumed_at)]
    callbacks = [StageProgressBar(f"train stage {index} ({plan.entry})")] if chain.progress else []
    if config.trainer.checkpoint_every:
        callbacks.append(StageCheckpoint(checkpoints, config.trainer.checkpoint_every))
    if chain.tracker is not None:
        loggers.append(WandbLogger(experiment=chain.tracker, prefix=f"stage{index}"))
    trainer = L.Trainer(
        **(trainer_options(config) | {"strategy": stage_strategy(config)}),
        max_steps=config.train.steps,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=chain.progress,
        default_root_dir=run_dir,
        plugins=[SafetensorsCheckpointIO()],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    if resume:
        print(f"chainforget: stage {index} resumes from its checkpoint {resume}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # weights_only: a sharded checkpoint's metadata is a pickle, read with PyTorch's unpickler that runs no code
    trainer.fit(module, datamodule, ckpt_path=resume, weights_only=True)
    if config.trainer.strategy == "fsdp":
        chain.model = gathered_network(config, chain.model)
    projection = project_onto_safety(chain, plan.mitigation) if plan.mitigation else None
    train = {
        "steps": int(trainer.global_step),
        "tokens": int(module.tokens_seen),
        "wall_s": round(time.perf_counter() - started, 3),
        "final_loss": None if module.final_loss is None else float(module.final_loss),
        "weight_drift": module.weight_drift(),
    }
    return {
        "train": train,
        "mitigation": mitigation_summary(config, plan, module, datamodule, projection),
        "curvature": None,  # measured by the runner for a trained and a cached stage alike (measured_curvature)
    }


def stage_strategy(config: ChainConfig) -> str | ModelParallelStrategy:
    """The Trainer's strategy for a stage: the config's, except ``fsdp``, which is PyTorch's FSDP2 (``fully_shard``)
    through Lightning's ``ModelParallelStrategy``, data-parallel over every process (``StageModule.configure_model``
    shards the network), each process checkpointing its own shard."""
    if config.trainer.strategy != "fsdp":
        return config.trainer.strategy
    processes = check_trainer_options(trainer_options(config) | {"strategy": "ddp"})  # how many, on any device
    return ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)


def gathered_network(config: ChainConfig, sharded: torch.nn.Module) -> torch.nn.Module:
    """The whole network an FSDP stage trained, gathered from every process's shard into a model of its own on each
    process (``fully_shard`` converted the one it trained in place): as under ddp, every process evaluates the whole
    model and trains the next stage from it."""
    state = {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
        for name, tensor in sharded.state_dict().items()
    }
    network = load_model(config.model, config.seed)
    network.load_state_dict(state)
    return network


def project_onto_safety(chain: ChainRun, spec) -> dict | None:
    """Safe LoRA's projection of the stage just trained (``mitigations.project_layers``), in place; what it did."""
    if spec.rule.kind != "projection":
        return None
    started = time.perf_counter()
    parameters = trainable_parameters(chain.model)
    done = mitigations.project_layers(parameters, chain.safety_layers, chain.safety_weights, spec.strength)
    similarity = {name: round(value, 6) for name, value in done["similarity"].items()}
    return {"projected": done["projected"], "similarity": similarity, "wall_s": round(time.perf_counter() - started, 3)}


def mitigation_summary(
    config: ChainConfig, plan: StagePlan, module: StageModule, datamodule, projection: dict | None
) -> dict | None:
    """What the mitigation did in this stage: the replayed example ids, the layers projected with every layer's
    similarity, or its mean penalty (SAM: perturbation) with the settings it read."""
    spec = config.mitigation
    if plan.replays:
        ids = {name: datamodule.drawn_ids.get(name, []) for name in plan.replays}
        summary = {"name": spec.name, "strength": spec.strength, "replay_ids": ids}
        if module.group_weights is not None:  # group_replay: the DRO weights the stage ended with
            weights = module.group_weights.tolist()
            summary |= {"replay_share": spec.replay_share, "group_kind": datamodule.group_by}
            summary["group_weights"] = {name: round(w, 6) for name, w in zip(datamodule.group_names, weights)}
        return summary
    if plan.mitigation is None:
        return None
    if projection is not None:
        return {"name": spec.name, "strength": spec.strength, **projection}
    mean = float(module.mitigation_total) / max(1, config.train.steps)
    settings = {knob: getattr(spec, knob) for knob in spec.rule.knobs if knob not in ("strength", "stages")}
    field = "mean_perturbation" if spec.rule.kind == "sam" else "mean_penalty"
    return {"name": spec.name, "strength": spec.strength, field: mean, **settings}


def evaluate(chain: ChainRun, stage: int, stage_key: str) -> pd.DataFrame:
    """Per-example predictions of every task of the chain at one stage (cached under the stage's key)."""
    config, frames = chain.config, []
    for name, task in chain.data.items():
        settings = (config.train.max_seq_len, config.trainer.precision, config.eval.mode)
        key = content_key("eval", stage_key, task.fingerprint, *settings)
        frame = chain.cache.get_predictions(key)
        if frame is None:
            desc = f"eval {name} @ stage {stage}"
            frame = evaluation.predictions_frame(chain.model, chain.tokenizer, task, config, chain.progress, desc)
            frame = chain.cache.put_predictions(key, frame)
        frames.append(frame.assign(stage=stage))
    return pd.concat(frames, ignore_index=True)
