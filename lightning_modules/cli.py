"""``chainforget fit|validate|test|predict``: one stage through LightningCLI, so every Trainer/model/data flag,
``--optimizer``/``--lr_scheduler``, ``--ckpt_path`` and ``--print_config`` work as users of Lightning expect."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pandas as pd
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from chainforget.config import (
    ChainConfig,
    MitigationSpec,
    ModelSpec,
    TrainerSpec,
    TrainSpec,
    check_answer_and_mitigation,
    check_field,
    config_files,
    read_mapping,
)
from chainforget.errors import ConfigError
from chainforget.records import StageCache, atomic_write
from lightning_modules.chain import check_trainer_options
from lightning_modules.checkpoint import decode, read_checkpoint
from lightning_modules.stage import StageDataModule, StageModule, as_spec

DEFAULT_MAX_STEPS = 100  # the stage length when neither the config nor the command line gives trainer.max_steps


class LoggedConfig(SaveConfigCallback):
    """Writes the resolved config into each logger's own directory, so two runs under one root never overwrite
    each other's: ``config.yaml`` in a CSV/TensorBoard version directory, beside the module's hyper-parameters
    (``hparams.yaml``, what ``load_from_checkpoint(hparams_file=...)`` reads); ``lightning_config.yaml`` in a W&B
    run's files (W&B writes its own ``config.yaml`` there), whose run config gets the full resolved config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            wandb = isinstance(logger, WandbLogger)
            directory = logger.experiment.dir if wandb else logger.log_dir
            if directory:
                path = Path(directory) / ("lightning_config.yaml" if wandb else self.config_filename)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
            if wandb:  # plain values: the dump, not the namespace (which holds jsonargparse Path objects)
                logger.log_hyperparams(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))
            else:
                logger.log_hyperparams(dict(pl_module.hparams))


class PredictionsWriter(BasePredictionWriter):
    """Writes ``predict``'s per-example records (task, example id, label, prediction, option log-probabilities)
    to ``predictions.parquet`` in the run's log directory (``predictions.rank<k>.parquet`` per rank under DDP)."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        name = "predictions.parquet" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.parquet"
        path = Path(trainer.log_dir) / name
        frame = pd.DataFrame([row for batch in predictions for row in batch])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
        rank_zero_info(f"predictions of {len(frame)} examples written to {path}")


class StageCLI(LightningCLI):
    """LightningCLI over ``StageModule`` and ``StageDataModule``, whose length is ``trainer.max_steps``."""

    def add_arguments_to_parser(self, parser) -> None:
        # One source of truth each: the stage length is the trainer's (the data module draws max_steps times
        # accumulate_grad_batches batches), the tokenizer's model and the data seed are the module's.
        parser.link_arguments("trainer.max_steps", "data.steps")
        parser.link_arguments("trainer.accumulate_grad_batches", "data.accumulate_grad_batches")
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.seed", "data.seed")
        # --optimizer/--lr_scheduler as LightningCLI offers them, but handed to the module (Lightning's
        # `link_to`): it builds them over the trainable parameters, which exist only after configure_model
        parser.add_optimizer_args((Optimizer,), link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # checked here, before anything is seeded, built or written
        config = self.config[self.config.subcommand]
        data = config.data
        StageDataModule.check_arguments(list(data.tasks or {}), data.mixture, data.batch_size, data.max_seq_len)
        trainer = config.trainer
        meanings = {"max_steps": "the stage's length in optimizer steps", "accumulate_grad_batches": "batches per step"}
        for field, meaning in meanings.items():
            value = trainer[field]
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"trainer.{field}: {value} is not allowed; use a positive integer ({meaning})")
        check_stage_arguments(config)

    def before_fit(self) -> None:
        self.datamodule.load()  # Lightning creates the log directory before its own data setup

    before_validate = before_test = before_predict = before_fit

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would ``torch.load`` ``--ckpt_path`` here to copy its hyper-parameters into the config.
        Stage checkpoints are safetensors (read by ``SafetensorsCheckpointIO`` when the trainer restores them), and
        the stage is defined by the config given, so there is nothing to copy."""


def check_stage_arguments(config) -> None:
    """What the chain checks for the same settings, checked for a stage before anything is seeded or written: the
    module's numbers and specs by the chain's rules (``TrainSpec``'s ranges, the seed's, ``ModelSpec`` with its
    LoRA, ``MitigationSpec``), ``init_from`` found in the stage cache, the Trainer's options by Lightning on a
    throwaway Trainer, and a ``ckpt_path`` that is a readable stage checkpoint of the configured model."""
    model = config.model
    for name in ("lr", "warmup_ratio", "weight_decay"):
        check_field(TrainSpec, name, model[name], f"model.{name}")
    check_field(ChainConfig, "seed", model.seed, "model.seed")
    if type(config.seed_everything) is int:  # true/false are LightningCLI's own switches
        check_field(ChainConfig, "seed", config.seed_everything, "seed_everything")
    try:  # the specs name their keys as a chain config does (model.lora.rank); under fit they sit in `model`
        spec = as_spec(ModelSpec, plain(model.model), "model.model") or ModelSpec()
        mitigation = as_spec(MitigationSpec, plain(model.mitigation), "model.mitigation") or MitigationSpec()
    except ConfigError as exc:
        raise ConfigError(f"model.{exc}") from None
    check_answer_and_mitigation(config.data.answer, mitigation, "data.answer", "model.mitigation.name")
    if model.init_from:
        StageCache.at(model.cache_dir).weights_for(model.init_from)
    shared = {field.name for field in dataclasses.fields(TrainerSpec)} - {"checkpoint_every"}
    trainer = plain(config.trainer)
    options = {k: v for k, v in trainer.items() if k in shared and v is not None and not isinstance(v, dict)}
    TrainerSpec(**options)  # the ranges the chain's trainer block has
    check_trainer_options(options)
    if config.get("ckpt_path") and config.ckpt_path not in ("last", "best", "hpc", "registry"):
        structure, _ = read_checkpoint(config.ckpt_path, with_tensors=False)
        stored = decode(dict(structure["__dict__"]).get("hyper_parameters"), {}) or {}
        configured = dataclasses.asdict(spec)
        if stored.get("model") and stored["model"] != configured:  # its weights would not fit this model
            raise ConfigError(
                f"--ckpt_path {config.ckpt_path}: a checkpoint of model {stored['model']}, not of model.model "
                f"{configured}; pass the config it was trained with"
            )


def plain(namespace) -> dict | None:
    """A jsonargparse namespace as plain dicts (what the config specs take)."""
    return None if namespace is None else namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def run_stage(subcommand: str, argv: list[str]) -> None:
    """Run ``subcommand`` (``fit``, ``validate``, ``test`` or ``predict``) of the stage CLI on ``argv``."""
    for config_file in config_files(argv):  # LightningCLI's YAML reader keeps the later of two equal keys, silently
        read_mapping(Path(config_file), "LightningCLI config", "keys such as trainer, model, data")
    defaults = {
        # checkpoints (ModelCheckpoint's and --ckpt_path's) go through safetensors, never pickle
        "plugins": {"class_path": "lightning_modules.checkpoint.SafetensorsCheckpointIO"},
        "max_steps": DEFAULT_MAX_STEPS,
        "callbacks": [PredictionsWriter()],
    }
    # `chainforget` hands LightningCLI its own command line as `args`; LightningCLI would warn that both are given
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    StageCLI(
        StageModule,
        StageDataModule,
        args=[subcommand, *argv],
        save_config_callback=LoggedConfig,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults=defaults,
        parser_kwargs={"prog": "chainforget", "exit_on_error": False},  # parse errors: one line from `chainforget`
    )
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # WandbLogger leaves its run open; the next run must get its own
