"""Lightning wrappers around the chainforget core: one stage, and the chain runner."""

from lightning_modules.stage import StageDataModule, StageModule

__all__ = ["StageDataModule", "StageModule"]
