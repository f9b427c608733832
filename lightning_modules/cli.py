"""``chainforget fit``: one stage through LightningCLI, so every Trainer/model/data flag and
``--print_config`` work as users of Lightning expect."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger

from lightning_modules.stage import StageDataModule, StageModule


class LoggedConfig(SaveConfigCallback):
    """Writes config.yaml into the run's own directory (the W&B run's files, or the versioned CSV/TensorBoard
    log directory), so two runs under one root never overwrite each other's, and pushes the full resolved
    config to the logger (W&B config, hparams.yaml)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, Logger):
            return
        target = Path(logger.experiment.dir) if isinstance(logger, WandbLogger) else Path(trainer.log_dir)
        target.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, target / self.config_filename, skip_none=False, overwrite=True, multifile=False)
        logger.log_hyperparams(self.config.as_dict())


class StageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One source of truth: the stage length and the tokenizer's model come from one place each.
        parser.link_arguments("data.steps", "trainer.max_steps")
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.seed", "data.seed")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would ``torch.load`` ``--ckpt_path`` here to copy its hyper-parameters into the config.
        Stage checkpoints are safetensors (read by ``SafetensorsCheckpointIO`` when the fit restores them), and
        the stage is defined by the config given, so there is nothing to copy."""


def run_fit(argv: list[str]) -> None:
    # checkpoints (ModelCheckpoint's and --ckpt_path's) go through safetensors, never pickle
    plugins = {"class_path": "lightning_modules.checkpoint.SafetensorsCheckpointIO"}
    StageCLI(StageModule, StageDataModule, args=["fit", *argv], save_config_callback=LoggedConfig,
             save_config_kwargs={"save_to_log_dir": False}, trainer_defaults={"plugins": plugins})  # fmt: skip
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # WandbLogger leaves its run open; the next fit must get its own
