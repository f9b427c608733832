"""Stage checkpoints without pickle: Lightning's checkpoint dictionary stored as one safetensors file.

Tensors go into the safetensors body; everything else (loop progress, scheduler state, RNG states, the data
position) goes into its header metadata as JSON, with tags that keep what JSON would lose (tuples, non-string
dict keys). Loading therefore never executes code from the file. ``StageCheckpoint`` writes ``last.ckpt``
every ``every_n_steps`` optimizer steps through the trainer, so under DDP only rank 0 writes. A sharded (FSDP)
stage's checkpoint is Lightning's folder of PyTorch distributed-checkpoint shards instead, one a process.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors import safe_open
from safetensors.torch import save_file

from chainforget.errors import DataError
from chainforget.records import atomic_write

METADATA_KEY = "chainforget.checkpoint"


def encode(value, tensors: dict[str, torch.Tensor]):
    """A JSON-ready copy of ``value``; tensors are moved into ``tensors`` and referenced by name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {"__dict__": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode(dataclasses.asdict(value), tensors)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint value of type {type(value).__name__} cannot be stored without pickle")


def decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(decode(v, tensors) for v in value["__tuple__"])
        return {decode(k, tensors): decode(v, tensors) for k, v in value["__dict__"]}
    return value


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing ``encode``d checkpoints atomically (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        structure = json.dumps(encode(checkpoint, tensors))
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: structure}))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        structure, tensors = read_checkpoint(path, with_tensors=True)
        return decode(structure, tensors)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)

    @staticmethod
    def global_step(path) -> int:
        """The optimizer step a checkpoint was saved at, from its metadata alone (no tensor is read). A sharded
        (FSDP) checkpoint is Lightning's folder of PyTorch distributed-checkpoint shards, its metadata in
        ``meta.pt``."""
        metadata = Path(path) / "meta.pt"
        if metadata.exists():  # PyTorch's unpickler for tensors and plain values, which runs no code
            return torch.load(metadata, weights_only=True)["global_step"]
        structure, _ = read_checkpoint(path, with_tensors=False)
        return dict(structure["__dict__"])["global_step"]


def read_checkpoint(path, with_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's encoded structure and (``with_tensors``) its tensors; a damaged file is a DataError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            structure = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise DataError(f"{path}: not a chainforget stage checkpoint ({exc})") from None
    if structure is None:
        raise DataError(f"{path}: not a chainforget stage checkpoint (no {METADATA_KEY} metadata)")
    return json.loads(structure), tensors


class StageCheckpoint(L.Callback):
    """Save ``directory/last.ckpt`` every ``every_n_steps`` optimizer steps (not after the last one: a finished
    stage goes to the stage cache instead)."""

    def __init__(self, directory: Path, every_n_steps: int):
        self.path = Path(directory) / "last.ckpt"
        self.every_n_steps = every_n_steps

    @staticmethod
    def resumable(directory: Path) -> Path | None:
        """The checkpoint a killed stage resumes from: ``last.ckpt``, or, where a sharded save was killed after
        moving the previous one aside and before publishing the new one (``save_shards``), the previous one."""
        latest = Path(directory) / "last.ckpt"
        return next((path for path in (latest, latest.with_name("last.ckpt.old")) if path.exists()), None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0  # not midway through an accumulation
        if stepped and step % self.every_n_steps == 0 and step < trainer.max_steps:
            if isinstance(trainer.strategy, ModelParallelStrategy):
                self.save_shards(trainer)
            else:
                trainer.save_checkpoint(self.path, weights_only=False)  # one file, written atomically

    def save_shards(self, trainer) -> None:
        """A sharded checkpoint, every process writing its shard into one folder, published whole: written beside
        ``last.ckpt`` and swapped in by rank 0 once every shard is in, so a process killed while writing leaves the
        previous checkpoint (killed between the two renames, as ``last.ckpt.old``: ``resumable`` finds it) and
        never a folder of mixed steps."""
        staged, retired = (self.path.with_name(f"{self.path.name}.{suffix}") for suffix in ("new", "old"))
        if trainer.is_global_zero:  # what a killed save left; the folder moved aside only if it is not resumed from
            shutil.rmtree(staged, ignore_errors=True)
            if self.path.exists():
                shutil.rmtree(retired, ignore_errors=True)
        trainer.strategy.barrier()
        trainer.save_checkpoint(staged, weights_only=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            if self.path.exists():
                os.replace(self.path, retired)
            os.replace(staged, self.path)
            shutil.rmtree(retired, ignore_errors=True)
        trainer.strategy.barrier()


class StageCSVLogger(CSVLogger):
    """Lightning's CSV logger for one stage. Lightning starts ``metrics.csv`` over when the file exists; a stage
    resumed from a checkpoint at step ``resumed_at`` keeps the rows its earlier attempt logged before that step
    (the ones after it are logged again), so the file reads as if the stage had never stopped."""

    def __init__(self, *args, resumed_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed_at = resumed_at

    @property
    @rank_zero_experiment  # as CSVLogger's own: the ranks above 0 of a data-parallel stage get a no-op writer
    def experiment(self):
        if self._experiment is None and self.resumed_at is not None:
            path = Path(self.log_dir) / "metrics.csv"
            kept = []
            if path.exists():
                with path.open(newline="") as file:
                    kept = [row for row in csv.DictReader(file) if int(row["step"]) < self.resumed_at]
            writer = super().experiment  # removes the old file
            writer.metrics = [{k: v for k, v in row.items() if v != ""} for row in kept] + writer.metrics
            return writer
        return super().experiment
