"""``chainforget fit``: one stage through LightningCLI, so every Trainer/model/data flag and
``--print_config`` work as users of Lightning expect."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_modules.stage import StageDataModule, StageModule


class StageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One source of truth: the stage length and the tokenizer's model come from one place each.
        parser.link_arguments("data.steps", "trainer.max_steps")
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.seed", "data.seed")


def run_fit(argv: list[str]) -> None:
    StageCLI(StageModule, StageDataModule, args=["fit", *argv], save_config_kwargs={"overwrite": True})
