"""One fine-tuning stage: ``StageModule`` (answer-only causal-LM loss, AdamW + linear warm-up/decay, one
optional mitigation; letter-mode validation, test and prediction) and ``StageDataModule`` (a seeded mixture of
task training examples, and the tasks' eval splits), plus ``stage_curvature``, the Hessian of a trained stage's
training loss. All run under LightningCLI (``fit``, ``validate``, ``test``, ``predict``) or inside the
chain runner, which hands them an already loaded model, tokenizer and data.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import time
import typing
import warnings
from contextlib import ExitStack, contextmanager
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch.core.saving import load_hparams_from_yaml
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from transformers import get_linear_schedule_with_warmup

from chainforget import curvature, mitigations
from chainforget.config import (
    CurvatureSpec,
    MitigationSpec,
    ModelSpec,
    TaskSpec,
    TrainSpec,
    check_attention,
    check_field,
    parse_stage,
)
from chainforget.errors import ConfigError, DataError
from chainforget.models import (
    frozen_in_fp32,
    hold_frozen_in,
    load_model,
    load_tokenizer,
    load_trainable,
    trainable_parameters,
)
from chainforget.records import StageCache
from chainforget.scoring import (
    autocast_for,
    check_prompt_fits,
    encode_option,
    encode_prompt,
    left_pad,
    letter_token_ids,
    option_bytes,
)
from chainforget.tasks import TaskData
from chainforget.tasks import load as load_task
from lightning_modules.checkpoint import SafetensorsCheckpointIO


def answer_logits(network, batch) -> torch.Tensor:
    """Logits where the loss reads them, and only there (the rest never reach the LM head): of the token after
    each (left-padded) prompt (examples x vocabulary) for letter answers; for text answers (a batch with
    ``targets``), of the last ``targets.shape[1]`` tokens, each predicted from the position before it."""
    keep = batch["targets"].shape[1] + 1 if "targets" in batch else 1
    out = network(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    return out.logits[:, :-1] if "targets" in batch else out.logits[:, -1]


def loss_of(logits: torch.Tensor, batch) -> torch.Tensor:
    """Cross-entropy of the answer letter, or the mean over the batch's answer-text tokens (``-100`` elsewhere);
    a data-parallel process's share of a batch divides its sum by ``loss_tokens`` (``StageDataModule``)."""
    if "loss_tokens" in batch:
        flat = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100, reduction="sum"
        )
        return flat / batch["loss_tokens"]
    if "targets" in batch:
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
    return F.cross_entropy(logits.float(), batch["answer"])


def example_losses(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed cross-entropy of its answer tokens and how many there are (1 for a letter)."""
    if "targets" in batch:
        targets = batch["targets"]
        flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        counted = (targets != -100).sum(dim=1)
        return flat.view_as(targets).sum(dim=1), counted.to(flat.dtype)
    losses = F.cross_entropy(logits.float(), batch["answer"], reduction="none")
    return losses, torch.ones_like(losses)


def answer_loss(network, batch) -> torch.Tensor:
    return loss_of(answer_logits(network, batch), batch)


class StageModule(L.LightningModule):
    """Fine-tunes a causal LM on the answer only (prompt tokens carry no loss): the answer letter's cross-entropy
    after the lettered prompt, the distribution letter-mode scoring reads, or, when the data module trains text
    answers, the correct option's text tokens after the question. Validation and test score the data module's eval
    split the same way (argmax over the option letters' next-token log-probabilities, or over each option's
    log-probability per byte) and log ``val/loss`` and ``val/acc`` (``test/...``), also per task
    (``val/<task>/acc``) when the stage mixes tasks; prediction returns one record per example (task, example id,
    label, prediction, option scores). Under a mixed precision the frozen linear weights are held in its dtype.

    Hyper-parameters are kept as plain values (specs as dicts), so ``hparams.yaml`` and a checkpoint's
    ``hyper_parameters`` read back without Python tags. Checkpoints are safetensors files (no pickle, so loading
    one never runs code from it): :meth:`load_from_checkpoint` reads them through ``SafetensorsCheckpointIO``.

    Args:
        model: which model to load (ignored when the chain runner passes one in).
        lr: peak AdamW learning rate.
        warmup_ratio: share of ``trainer.max_steps`` spent warming up linearly before the linear decay.
        weight_decay: AdamW weight decay.
        seed: seed for model initialisation (LoRA adapters, the tiny model).
        mitigation: ``l2sp``, ``lwf`` and ``sam`` anchor to the weights at the start of the fit; ``ewc``
            also needs the previous stage's Fisher, which the chain runner provides. Replay is data, not
            a loss: it lives in the stage's mixture.
        init_from: start from a previous stage's trained weights: a chain's run directory (its last stage),
            a stage-cache key or entry directory, or a ``.safetensors`` file.
        cache_dir: the stage cache that ``init_from`` keys and run directories refer to (default: user cache).
        attention: the attention kernel while training (evaluation keeps the model's own): ``auto`` is
            ``eager`` on CPU, whose fused-attention backward is slow, and the model's own elsewhere; or any
            transformers ``attn_implementation``.
        compile: train through ``torch.compile``d decoder blocks (about 1.6x the tokens/s on a CPU; the
            first compile takes about a minute there, later processes reuse inductor's on-disk cache).
        gradient_checkpointing: recompute each decoder block's activations in the backward pass instead of
            keeping them (transformers' activation checkpointing): less memory, the same gradients.
        optimizer: ``{"class_path": ..., "init_args": {...}}`` of a ``torch.optim`` optimizer over the trainable
            parameters in place of AdamW (``lr`` and ``weight_decay`` then do not apply); set by ``--optimizer``.
        lr_scheduler: the same for a scheduler in place of the linear warm-up/decay (``warmup_ratio`` then does
            not apply), returned to Lightning as ``LightningCLI.configure_optimizers`` does; set by
            ``--lr_scheduler``.
    """

    def __init__(
        self,
        model: ModelSpec | None = None,
        lr: float = TrainSpec.lr,
        warmup_ratio: float = TrainSpec.warmup_ratio,
        weight_decay: float = TrainSpec.weight_decay,
        seed: int = 0,
        mitigation: MitigationSpec | None = None,
        init_from: str | None = None,
        cache_dir: str | None = None,
        attention: str = TrainSpec.attention,
        compile: bool = TrainSpec.compile,
        gradient_checkpointing: bool = TrainSpec.gradient_checkpointing,
        optimizer: dict | None = None,
        lr_scheduler: dict | None = None,
    ):
        super().__init__()
        check_attention(attention, "model.attention")
        self.spec = as_spec(ModelSpec, model, "model.model") or ModelSpec()
        self.mitigation = as_spec(MitigationSpec, mitigation, "model.mitigation") or MitigationSpec()
        # plain values only (specs as dicts), so hparams.yaml and checkpoints read back without Python tags; given
        # explicitly, as LightningCLI's own record of the arguments would otherwise take their place
        hparams = {
            "model": dataclasses.asdict(self.spec),
            "lr": lr,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "seed": seed,
            "mitigation": dataclasses.asdict(self.mitigation),
            "init_from": init_from,
            "cache_dir": cache_dir,
            "attention": attention,
            "compile": compile,
            "gradient_checkpointing": gradient_checkpointing,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
        }
        self.save_hyperparameters(hparams, logger=False)
        self.automatic_optimization = self.mitigation.rule.kind != "sam"
        self.network = None
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.teacher: torch.Tensor | None = None
        self.safety: dict[str, mitigations.SafetyLayer] | None = None  # set by the chain runner, as ``fisher``
        self.group_weights: torch.Tensor | None = None  # group_replay's q over the data module's group_names
        self.final_loss: torch.Tensor | float | None = None  # tensors while training (no per-step wait on a GPU)
        self.tokens_seen = 0
        self.mitigation_total: torch.Tensor | float = 0.0
        self._step_started = 0.0
        self._training_kernels = ExitStack()
        self._tallies: torch.Tensor | None = None  # per eval task: loss sum, correct, count
        self.strict_loading = False  # checkpoints hold the trainable weights only

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs,
    ) -> StageModule:
        """Lightning's ``load_from_checkpoint`` for stage checkpoints, which are safetensors files (read through
        ``SafetensorsCheckpointIO``, never unpickled): the module is rebuilt from the stored hyper-parameters,
        ``configure_model`` loads the model and the checkpoint's trainable weights go into it.

        Args:
            checkpoint_path: a ``.ckpt`` written by ``chainforget fit`` (or a chain's stage checkpoint).
            map_location: the device to move the module to (a ``str`` or ``torch.device``); tensors load on CPU.
            hparams_file: a YAML of this class's arguments (such as fit's ``hparams.yaml``) used in place of the
                checkpoint's hyper-parameters.
            strict: also require every weight of the module (frozen ones included) in the checkpoint; by default
                (``strict_loading``) only the trainable ones, which is what stage checkpoints hold.
            weights_only: accepted for Lightning's signature; safetensors files hold tensors and JSON only.
            **kwargs: arguments overriding the stored hyper-parameters (e.g. ``init_from=None``).
        """
        checkpoint = SafetensorsCheckpointIO().load_checkpoint(checkpoint_path)
        hparams = load_hparams_from_yaml(hparams_file) if hparams_file else checkpoint.get("hyper_parameters", {})
        arguments = inspect.signature(cls).parameters
        module = cls(**{k: v for k, v in {**hparams, **kwargs}.items() if k in arguments})
        module.configure_model()
        strict = module.strict_loading if strict is None else strict
        keys = module.load_state_dict(checkpoint["state_dict"], strict=strict)
        missing = sorted({f"network.{name}" for name in module.trainable()} & set(keys.missing_keys))
        if missing or keys.unexpected_keys:
            raise DataError(
                f"{checkpoint_path}: its weights do not fit model {module.spec.name!r} ({module.spec.finetune}): "
                f"missing {missing[:3]}, unexpected {keys.unexpected_keys[:3]}"
            )
        return module if map_location is None else module.to(torch.device(map_location))

    @classmethod
    def wrapping(cls, network, **hparams):
        module = cls(**hparams)
        module.network = network
        return module

    def configure_model(self) -> None:
        if self.network is None:
            self.network = load_model(self.spec, self.hparams.seed)
            if self.hparams.init_from:
                load_trainable(self.network, StageCache.at(self.hparams.cache_dir).weights_for(self.hparams.init_from))
        if self.sharded:
            shard_blocks(self.network, self.device_mesh["data_parallel"])

    @property
    def sharded(self) -> bool:
        """Whether the network is trained sharded (FSDP2 through Lightning's ``ModelParallelStrategy``)."""
        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    def trainable(self) -> dict[str, torch.Tensor]:
        return trainable_parameters(self.network)

    def on_fit_start(self) -> None:
        self.network.train()  # from_pretrained and evaluation leave the network in eval mode
        compute = AUTOCAST_DTYPES.get(str(self.trainer.precision))
        # autocast would cast the frozen weights to it on every pass; once is enough (not where they are FSDP's
        # shards, which it gathers in the dtype it sharded them in)
        if compute is not None and not self.sharded:
            hold_frozen_in(self.network, compute)

    def on_train_start(self) -> None:
        needs = self.mitigation.rule.needs
        if "fisher" in needs and self.fisher is None:
            raise ConfigError(
                f"mitigation {self.mitigation.name} needs the previous stage's data for its Fisher; "
                "run it inside `chainforget chain`"
            )
        if "safety" in needs and self.safety is None:
            raise ConfigError(
                f"mitigation {self.mitigation.name} needs the chain's safety stage for its direction; "
                "run it inside `chainforget chain`"
            )
        groups = self.trainer.datamodule.group_names
        if self.mitigation.name == "group_replay" and groups and self.group_weights is None:
            self.group_weights = torch.full((len(groups),), 1.0 / len(groups))  # float32: every device has it
        if "anchor" in needs and self.anchor is None:  # a resumed stage keeps its stage-start anchor
            self.anchor = mitigations.snapshot(self.trainable())
        if "teacher" in needs and self.teacher is None:
            self.teacher = self._teacher_logits()
        attention = self.hparams.attention
        if attention == "auto":
            attention = "eager" if self.device.type == "cpu" else self.network.config._attn_implementation
        self._training_kernels.enter_context(attention_kernel(self.network, attention))
        if self.hparams.compile:
            self._training_kernels.enter_context(compiled_blocks(self.network))
        if self.hparams.gradient_checkpointing:
            self._training_kernels.enter_context(checkpointed_blocks(self.network))

    def on_train_end(self) -> None:
        self._training_kernels.close()  # evaluation and the next stage get the model's own kernels back
        if self.trainer.world_size > 1:  # the global batch's, not this share's (every rank reaches here)
            reduce = self.trainer.strategy.reduce
            total = torch.as_tensor(self.mitigation_total, dtype=torch.float32, device=self.device)
            self.mitigation_total = reduce(total, reduce_op="mean")
            if self.final_loss is not None:
                loss = torch.as_tensor(self.final_loss, dtype=torch.float32, device=self.device)
                self.final_loss = reduce(loss, reduce_op="mean")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable weights (sharded: all, which the distributed checkpoint loads by every name),
        plus what a resumed stage needs to continue bit for bit."""
        if not self.sharded:
            trainable = {f"network.{name}" for name in self.trainable()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        numpy_state = np.random.get_state()
        checkpoint["stage"] = {
            "tokens_seen": self.tokens_seen,
            "mitigation_total": float(self.mitigation_total),
            "final_loss": None if self.final_loss is None else float(self.final_loss),
            "anchor": self.anchor,
            "teacher": self.teacher,
            "group_weights": self.group_weights,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {f"network.{name}" for name in self.trainable()}
        # Lightning restores non-strictly: a mismatch would pass (a sharded checkpoint it has loaded strictly itself)
        if not self.sharded and set(checkpoint["state_dict"]) != expected:
            stray = sorted(set(checkpoint["state_dict"]) ^ expected)
            raise DataError(
                f"checkpoint: its weights do not fit model {self.spec.name!r} ({self.spec.finetune}): "
                f"{len(stray)} trainable weights differ, e.g. {stray[0]}"
            )
        state = checkpoint["stage"]
        self.tokens_seen, self.mitigation_total, self.final_loss = (
            state["tokens_seen"],
            state["mitigation_total"],
            state["final_loss"],
        )
        self.anchor, self.teacher = state["anchor"], state["teacher"]
        self.group_weights = state.get("group_weights")  # absent from checkpoints written before group_replay
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        kind, keys, *rest = state["rng"]["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))

    @torch.no_grad()
    def _teacher_logits(self) -> torch.Tensor:
        """The stage-start model's answer-letter logits on every training sample (the frozen LwF teacher)."""
        datamodule = self.trainer.datamodule
        teacher = torch.zeros(len(datamodule.samples), len(datamodule.letters))
        was_training = self.network.training
        self.network.eval()
        for batch in datamodule.loader():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_for(self.device, str(self.trainer.precision)):
                teacher[batch["index"].cpu()] = answer_logits(self.network, batch)[:, datamodule.letters].float().cpu()
        self.network.train(was_training)
        return teacher

    def penalty(self, batch, logits: torch.Tensor) -> torch.Tensor | None:
        penalty = self.mitigation.rule.penalty
        if penalty is None:
            return None
        letters = self.trainer.datamodule.letters
        teacher = None if self.teacher is None else self.teacher[batch["index"].cpu()].to(logits.device)
        answers = None if "targets" in batch else logits[:, letters]
        step = mitigations.StepState(self.trainable(), answers, self.anchor, self.fisher, teacher, self.safety)
        return penalty(step, self.mitigation)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        logits = answer_logits(self.network, batch)
        loss = loss_of(logits, batch) if self.group_weights is None else self.group_dro_loss(logits, batch)
        penalty = self.penalty(batch, logits)
        if penalty is not None:
            self.mitigation_total += penalty.detach()  # a tensor: reading it every step would wait on a GPU
            self.log("train/penalty", penalty)
        objective = loss if penalty is None else loss + penalty
        if not self.automatic_optimization:
            self.sam_step(batch, objective)
        self.tokens_seen += self.trainer.datamodule.batch_tokens
        self.final_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/tokens", float(self.tokens_seen))
        return objective if self.automatic_optimization else None

    def group_dro_loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """The batch's loss with each replayed example weighted by its group's DRO weight, after the weights took
        their step on this batch's group losses (as group DRO does). At eta = 0 every weight stays 1 and the loss
        is ``loss_of``'s, computed the same way."""
        if self.mitigation.strength == 0:
            return loss_of(logits, batch)
        sums, counts = example_losses(logits, batch)
        groups, weights = batch["group"], self.group_weights.to(sums.device)
        totals, sizes = mitigations.group_loss_sums((sums / counts).detach(), groups, len(weights))
        # data-parallel ranks step the same weights on the whole global batch's group losses
        totals, sizes = (self.trainer.strategy.reduce(x, reduce_op="sum") for x in (totals, sizes))
        means, present = totals / sizes.clamp(min=1), sizes > 0
        self.group_weights = mitigations.group_dro_step(weights, means, present, self.mitigation.strength)
        self.log("train/dro_max_weight", self.group_weights.max())
        weighted = (mitigations.example_weights(groups, self.group_weights) * sums).sum()
        return weighted / batch.get("loss_tokens", counts.sum())

    def sam_step(self, batch, loss: torch.Tensor) -> None:
        """SAM: gradient at the current point, step of radius rho uphill, gradient there, step back, update."""
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        parameters = list(self.trainable().values())
        self.manual_backward(loss)
        steps = mitigations.sam_ascent(parameters, self.mitigation.strength)
        optimizer.zero_grad()
        self.manual_backward(answer_loss(self.network, batch))
        mitigations.sam_descent(parameters, steps)
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
        perturbation = torch.sqrt(sum((s.float() ** 2).sum() for s in steps))
        self.mitigation_total += perturbation
        self.log("train/sam_perturbation", perturbation)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0:
            self.log("train/tokens_per_s", self.trainer.datamodule.batch_tokens / elapsed)

    def weight_drift(self) -> float | None:
        """L2 distance the trainable weights moved from the stage-start anchor (when one was kept)."""
        if self.anchor is None:
            return None
        return float(torch.sqrt(sum(((p.detach() - self.anchor[n]) ** 2).sum() for n, p in self.trainable().items())))

    def configure_optimizers(self):
        parameters = list(self.trainable().values())
        if self.hparams.optimizer:
            optimizer = instantiate_class(parameters, self.hparams.optimizer)
        else:
            optimizer = adamw(parameters, self.hparams.lr, self.hparams.weight_decay)
        if self.hparams.lr_scheduler:
            schedule = instantiate_class(optimizer, self.hparams.lr_scheduler)
            return LightningCLI.configure_optimizers(self, optimizer, schedule)
        total = max(
            1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches)
        )
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def score(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example of an eval batch: the answer's cross-entropy and a score per option (``-inf`` past an
        example's own options). Letter answers: the answer token's, and the option letters' next-token
        log-probabilities, as ``eval.mode: letter`` reads them. Text answers (one row per option): the correct
        option's mean over its tokens, and each option's summed log-probability per byte, ``text_norm``'s."""
        if "targets" in batch:
            return self.score_text(batch)
        logits = answer_logits(self.network, batch).float()
        losses = F.cross_entropy(logits, batch["answer"], reduction="none")
        options = logits.log_softmax(-1)[:, batch["letters"]]
        beyond = torch.arange(options.shape[1], device=options.device) >= batch["choices"][:, None]
        return losses, options.masked_fill(beyond, float("-inf"))

    def score_text(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        targets, example, option = batch["targets"], batch["row_example"], batch["row_option"]
        logits = answer_logits(self.network, batch).float()
        token_logprobs = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        totals = token_logprobs.sum(1)  # ignored positions count 0
        labels = batch["label"]
        options = torch.full((len(labels), int(batch["choices"].max())), float("-inf"), device=totals.device)
        options[example, option] = totals / batch["row_bytes"]
        correct = option == labels[example]
        losses = torch.zeros(len(labels), device=totals.device)
        losses[example[correct]] = -totals[correct] / (targets[correct] >= 0).sum(1)
        return losses, options

    def on_validation_epoch_start(self) -> None:
        self._tallies = torch.zeros(len(self.trainer.datamodule.eval_tasks), 3, device=self.device)

    def validation_step(self, batch, batch_idx) -> None:
        losses, options = self.score(batch)
        correct = (options.argmax(-1) == batch["label"]).float()
        self._tallies.index_add_(0, batch["task"], torch.stack([losses, correct, torch.ones_like(losses)], dim=1))

    def on_validation_epoch_end(self) -> None:
        self.log_tallies("val")

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.log_tallies("test")

    def log_tallies(self, prefix: str) -> None:
        """``<prefix>/loss`` and ``<prefix>/acc`` over every rank's examples, and per task when there are several."""
        tallies = self.trainer.strategy.reduce(self._tallies, reduce_op="sum")
        tasks = self.trainer.datamodule.eval_tasks
        rows = {prefix: tallies.sum(0)}
        if len(tasks) > 1:
            rows.update({f"{prefix}/{task}": tallies[i] for i, task in enumerate(tasks)})
        for name, (loss, correct, count) in rows.items():
            self.log(f"{name}/loss", loss / count)
            self.log(f"{name}/acc", correct / count)

    def predict_step(self, batch, batch_idx) -> list[dict]:
        _, options = self.score(batch)
        labels, counts = batch["label"].tolist(), batch["choices"].tolist()
        rows = zip(batch["task_name"], batch["example_id"], labels, options.cpu(), counts)
        return [
            {
                "task": task,
                "example_id": example_id,
                "label": label,
                "pred": int(values.argmax()),
                "option_logprobs": values[:count].tolist(),
            }
            for task, example_id, label, values, count in rows
        ]


def adamw(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (one pass over each tensor instead of a dozen: 8x faster on a CPU,
    a fifth of a full fine-tuning step); it rounds differently from the for-each kernel in the last bit."""
    fused = all(p.device.type in ("cpu", "cuda", "mps") and p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # Lightning's mixed precisions


def as_spec(kind: type, value, field: str):
    """``value`` as the dataclass ``kind``: the instance itself, or one built from the plain dict that hparams.yaml
    and checkpoints hold (nested specs too); ``None`` stays ``None``."""
    if value is None or isinstance(value, kind):
        return value
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(value) - set(hints))
    if unknown:
        raise ConfigError(f"{field}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(hints)}")
    nested = {k: as_spec(hints[k], v, f"{field}.{k}") for k, v in value.items() if dataclasses.is_dataclass(hints[k])}
    return kind(**{**value, **nested})


def stage_curvature(network, batches: list[dict], spec: CurvatureSpec, precision: str) -> dict:
    """Top Hessian eigenvalue (and optional trace) of the mean training loss over ``batches`` w.r.t. the trainable
    parameters, in fp32 with eager attention (the fused CPU attention kernel has no double backward). Under a mixed
    precision the frozen weights are first held in its dtype as in training, so a stage measured right after its
    training and one read back from the cache in a fresh process give the same number."""
    compute = AUTOCAST_DTYPES.get(precision)
    if compute is not None:
        hold_frozen_in(network, compute)
    device = next(network.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    parameters = list(trainable_parameters(network).values())
    was_training = network.training
    network.eval()
    with (
        attention_kernel(network, "eager"),
        torch.compiler.set_stance("force_eager"),
        torch.autocast(device.type, enabled=False),
        frozen_in_fp32(network),
    ):
        result = curvature.measure(
            lambda: sum(answer_loss(network, b) for b in batches) / len(batches),
            parameters,
            max_iter=spec.max_iter,
            tol=spec.tol,
            trace_samples=spec.trace_samples,
            seed=spec.seed,
        )
    network.train(was_training)
    return {
        "top_eigenvalue": result.top_eigenvalue,
        "method": curvature.METHOD,
        "trace": result.trace,
        "iterations": result.iterations,
        "converged": result.converged,
        "parameters": f"trainable ({result.num_parameters})",
        "batches": spec.batches,
        "batch_size": int(batches[0]["input_ids"].shape[0]),
        "max_iter": spec.max_iter,
        "tol": spec.tol,
        "trace_samples": spec.trace_samples,
        "seed": spec.seed,
        "dtype": "float32",
    }


@contextmanager
def attention_kernel(network, name: str):
    previous = network.config._attn_implementation
    network.set_attn_implementation(name)
    try:
        yield
    finally:
        network.set_attn_implementation(previous)


def shard_blocks(network, mesh) -> None:
    """FSDP2 over ``mesh``: each decoder block (the model's ``_no_split_modules``, the blocks accelerate wraps too) a
    unit of its own, so a process gathers the whole weights of one block at a time, and the rest (embeddings, head)
    one unit. Once per network: a resumed fit finds it sharded already."""
    if isinstance(network, FSDPModule):
        return
    names = set(getattr(network, "_no_split_modules", None) or ())
    for block in [module for module in network.modules() if type(module).__name__ in names]:
        fully_shard(block, mesh=mesh)
    fully_shard(network, mesh=mesh)


@contextmanager
def checkpointed_blocks(network):
    """Activation checkpointing of the decoder blocks while training (transformers' own, non-reentrant, so LoRA's
    frozen inputs need no ``requires_grad``), off again afterwards for evaluation."""
    if not getattr(network, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing (fit: model.gradient_checkpointing): {type(network).__name__} does not "
            "support it; set it false"
        )
    network.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        network.activation_checkpointing_disable()


@contextmanager
def compiled_blocks(network):
    """``torch.compile`` on each of the model's repeated blocks (the classes transformers lists in
    ``_no_split_modules``, e.g. the decoder layer): the layers share one compiled graph, so compiling
    takes seconds to a minute rather than the many minutes a whole-model compile takes on a CPU."""
    kinds = set(getattr(network, "_no_split_modules", None) or [])
    blocks = [module for module in network.modules() if type(module).__name__ in kinds]
    if not blocks:
        raise ConfigError(
            f"train.compile (fit: model.compile): {type(network).__name__} lists no repeated blocks "
            "(_no_split_modules) to compile; set it false"
        )
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class StageDataModule(L.LightningDataModule):
    """Training examples for one stage: ``steps * accumulate_grad_batches * batch_size`` draws from the stage's task
    mixture; validation, test and prediction run over the eval split of each of the stage's tasks.

    Args:
        tasks: task specs by registry name.
        mixture: a task name or a mixture of tasks with weights, such as ``bbq:0.95+csqa:0.05``.
        model: the model whose tokenizer encodes the prompts.
        batch_size: examples per batch (training and evaluation). Under data parallelism this is the global
            batch: each of ``N`` processes trains ``batch_size / N`` of every batch (its rows ``rank::N``), so a
            stage draws the same examples and takes the same steps on any number of processes.
        steps: optimizer steps the stage will take (under ``chainforget fit``: ``trainer.max_steps``).
        max_seq_len: prompts keep their last ``max_seq_len`` tokens.
        seed: drives splits, caps and the draw order.
        bucket: group samples of similar length into batches (within windows of 32 batches, batch order then
            shuffled by ``seed``), so little compute goes to padding.
        accumulate_grad_batches: batches per optimizer step (under ``chainforget fit``: the trainer's).
        answer: ``letter`` trains (and validation, test and prediction score) the answer letter after the lettered
            prompt; ``text`` the correct option's text after ``<question>\nAnswer:`` (scored as ``text_norm``:
            each option's log-probability per byte, one row per option).
    """

    def __init__(
        self,
        tasks: dict[str, TaskSpec] | None = None,
        mixture: str = "bbq",
        model: ModelSpec | None = None,
        batch_size: int = TrainSpec.batch_size,
        steps: int = TrainSpec.steps,
        max_seq_len: int = TrainSpec.max_seq_len,
        seed: int = 0,
        bucket: bool = TrainSpec.bucket,
        accumulate_grad_batches: int = 1,
        answer: Literal["letter", "text"] = TrainSpec.answer,
    ):
        super().__init__()
        self.check_arguments(list(tasks or []), mixture, batch_size, max_seq_len)
        self.specs = tasks or {name: TaskSpec() for name in parse_stage(mixture)}
        self.mixture = parse_stage(mixture)
        self.model_spec = model or ModelSpec()
        self.batch_size, self.steps, self.max_seq_len, self.seed, self.bucket = (
            batch_size,
            steps,
            max_seq_len,
            seed,
            bucket,
        )
        self.accumulate_grad_batches = accumulate_grad_batches
        self.answer = answer
        self.data: dict[str, TaskData] | None = None
        self.tokenizer = None
        self.samples: list[dict] = []
        self.letters: list[int] = []
        self.drawn_ids: dict[str, list[str]] = {}
        self.position = 0  # batches already trained on (a resumed stage starts after them)
        self.eval_tasks = list(self.mixture)  # the tasks whose eval split validation, test and predict read
        self.eval_samples: list[dict] = []
        self.eval_letters: torch.Tensor | None = None
        self.batch_tokens = 0  # real tokens of the training batch on its way to the device
        # under data parallelism, per sample: its global batch's real tokens, and for text answers that batch's
        # answer tokens over the process count
        self.global_batch: dict[int, dict] = {}
        # group_replay: the group kind to label each replayed task's examples with (None: the task has none, its
        # examples stay ungrouped, weight 1), and the groups found
        self.group_by: dict[str, str] = {}
        self.group_names: list[str] = []

    @staticmethod
    def check_arguments(tasks: list[str], mixture: str, batch_size: int, max_seq_len: int) -> None:
        """The data settings a user gives ``fit``, checked by the chain's rules for the same settings; ``tasks``
        (when any are configured) must hold every task the mixture draws from."""
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            check_field(TrainSpec, name, value, f"data.{name}")
        missing = [name for name in parse_stage(mixture) if tasks and name not in tasks]
        if missing:
            raise ConfigError(
                f"data.mixture: {mixture!r} names task {missing[0]!r}, which is not under data.tasks "
                f"(configured: {', '.join(sorted(tasks))})"
            )

    @staticmethod
    def check_split(batch_size: int, processes: int, key: str) -> None:
        """The global batch ``batch_size`` (setting ``key``) must split evenly over the data-parallel processes."""
        if batch_size % processes:
            raise ConfigError(
                f"{key}: {batch_size} is the global batch and does not split over {processes} data-parallel "
                f"processes; use a multiple of {processes}"
            )

    @classmethod
    def prepared(
        cls,
        data,
        tokenizer,
        *,
        mixture: str,
        batch_size: int,
        steps: int,
        max_seq_len: int,
        seed: int,
        bucket: bool = TrainSpec.bucket,
        answer: str = TrainSpec.answer,
    ):
        """A module over already loaded data and tokenizer, drawing ``steps`` batches, without eval data: the chain
        runner evaluates between stages itself."""
        module = cls(
            tasks={},
            mixture=mixture,
            batch_size=batch_size,
            steps=steps,
            max_seq_len=max_seq_len,
            seed=seed,
            bucket=bucket,
            answer=answer,
        )
        module.data, module.tokenizer = data, tokenizer
        module.eval_tasks = []
        return module

    def load(self) -> None:
        """The tokenizer and the data, once, checked against ``max_seq_len`` (the chain hands in data it has
        checked against ``train.max_seq_len``). ``chainforget fit`` calls it before Lightning creates the log
        directory, so bad data or settings leave nothing behind."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_spec)
        if self.data is None:
            self.data = {name: load_task(name, self.specs[name], self.seed) for name in self.mixture}
            if self.answer == "letter":  # text answers never show the lettered options
                check_prompt_fits(self.tokenizer, self.data, self.max_seq_len, "data.max_seq_len")

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if stage in (None, "fit"):
            self.draw_training()
        if stage is not None:
            self.encode_eval()

    def draw_training(self) -> None:
        total = self.steps * self.accumulate_grad_batches * self.batch_size
        drawn = draw_mixture({n: self.data[n].train for n in self.mixture}, self.mixture, total, self.seed)
        self.drawn_ids = {name: sorted({e.id for task, e in drawn if task == name}) for name in self.mixture}
        self.letters = letter_token_ids(self.tokenizer, max(len(e.choices) for _, e in drawn))
        self.samples = [{"index": i, **self.encode_answer(e)} for i, (_, e) in enumerate(drawn)]
        if self.group_by:  # every group of the replayed tasks' training data, drawn this time or not
            labels = [(t, e.groups.get(self.group_by[t], "")) if self.group_by.get(t) else None for t, e in drawn]
            pool = [(t, e.groups.get(k, "")) for t, k in self.group_by.items() if k for e in self.data[t].train]
            self.group_names = [f"{t}/{g}" for t, g in sorted(set(pool))]
            index = {name: i for i, name in enumerate(self.group_names)}
            for sample, label in zip(self.samples, labels):
                sample["group"] = -1 if label is None else index[f"{label[0]}/{label[1]}"]

    def encode_answer(self, example) -> dict:
        """A training sample: the prompt and its answer letter, or question + correct option text and how many of
        its last tokens are the option's (the loss reads those only)."""
        if self.answer == "text":
            ids, length = encode_option(self.tokenizer, example, example.label, self.max_seq_len)
            return {"ids": ids, "answer_length": length}
        ids = encode_prompt(self.tokenizer, example.prompt, self.max_seq_len)
        return {"ids": ids, "answer": self.letters[example.label]}

    def encode_eval(self) -> None:
        """The eval split of every task in ``eval_tasks``, longest prompts first (batches with little padding)."""
        examples = [(t, e) for t, name in enumerate(self.eval_tasks) for e in self.data[name].eval]
        self.eval_samples = []
        if not examples:
            return
        letters = letter_token_ids(self.tokenizer, max(len(e.choices) for _, e in examples))
        samples = []
        for t, e in examples:
            sample = {"task": t, "task_name": self.eval_tasks[t], "example_id": e.id, "label": e.label}
            if self.answer == "text":
                options = [encode_option(self.tokenizer, e, j, self.max_seq_len) for j in range(len(e.choices))]
                sample |= {"options": options, "bytes": option_bytes(e), "length": max(len(o[0]) for o in options)}
            else:
                ids = encode_prompt(self.tokenizer, e.prompt, self.max_seq_len)
                sample |= {"ids": ids, "answer": letters[e.label], "length": len(ids)}
            samples.append(sample | {"choices": len(e.choices)})
        self.eval_letters = torch.tensor(letters, dtype=torch.long)
        self.eval_samples = sorted(samples, key=lambda sample: -sample["length"])

    def train_dataloader(self) -> DataLoader:
        if self.position:
            # the batch order is a pure function of the seed, so skipping `position` batches resumes it exactly;
            # Lightning cannot know that and warns about resuming mid-epoch
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
            )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.check_split(self.batch_size, world, "batch_size")
        batches = self.batches()
        if world > 1:  # this process's rows of every batch, whatever sampler Lightning hands the batch sampler
            self.global_batch = {i: self.global_counts([self.samples[j] for j in b], world) for b in batches for i in b}
            batches = [batch[rank::world] for batch in batches]
        return self.loader(self.position, batches)

    def global_counts(self, batch: list[dict], world: int) -> dict:
        """What each process needs to know of its whole global batch: the real tokens (the stage counts them all),
        and for text answers the answer tokens over the process count: DDP averages the processes' gradients, so
        each divides its summed answer-token loss by that, and the average is the global batch's mean."""
        counts = {"tokens": sum(len(sample["ids"]) for sample in batch)}
        if self.answer == "text":
            counts["loss_tokens"] = sum(sample["answer_length"] for sample in batch) / world
        return counts

    def loader(self, start: int = 0, batches: list[list[int]] | None = None) -> DataLoader:
        """The stage's batches (or ``batches``) from batch ``start`` on (the length stays that of the whole
        stage)."""
        sampler = BatchesFrom(SequentialSampler(self.samples), batches or self.batches(), start)
        return DataLoader(self.samples, batch_sampler=sampler, collate_fn=self.collate)

    def eval_loader(self) -> DataLoader | list:
        """Batches of the eval split (none for a module without eval tasks, so Lightning skips the loop)."""
        if not self.eval_samples:
            # a `prepared` module (the chain runner's, the benchmarks'): no eval data is meant, nothing to warn about
            warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
            return []
        return DataLoader(self.eval_samples, batch_size=self.batch_size, collate_fn=self.collate_eval)

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_loader()

    def test_dataloader(self) -> DataLoader | list:
        return self.eval_loader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.eval_loader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer.training:  # counted on the host, before the batch reaches the device (no wait on a GPU)
            whole = self.global_batch.get(int(batch["index"][0]))  # a data-parallel process's share: all of it
            self.batch_tokens = whole["tokens"] if whole else int(batch["attention_mask"].sum())
        return batch

    def state_dict(self) -> dict:
        # batches consumed: every optimizer step took `accumulate_grad_batches` of them
        return {"position": int(self.trainer.global_step * self.trainer.accumulate_grad_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def batches(self) -> list[list[int]]:
        """Sample indices per step: in draw order, or length-bucketed within windows of 32 batches."""
        indices = list(range(len(self.samples)))
        if not self.bucket:
            return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        window = 32 * self.batch_size
        batches = []
        for start in range(0, len(indices), window):
            chunk = sorted(indices[start : start + window], key=lambda i: len(self.samples[i]["ids"]))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        random.Random(self.seed).shuffle(batches)
        return batches

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = left_pad([s["ids"] for s in samples], self.tokenizer.pad_token_id)
        if self.answer == "text":
            batch["targets"] = answer_targets(batch["input_ids"], [s["answer_length"] for s in samples])
        else:
            batch["answer"] = torch.tensor([s["answer"] for s in samples], dtype=torch.long)
        if "loss_tokens" in self.global_batch.get(samples[0]["index"], {}):
            batch["loss_tokens"] = torch.tensor(self.global_batch[samples[0]["index"]]["loss_tokens"])
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        if self.group_names:
            batch["group"] = torch.tensor([s["group"] for s in samples], dtype=torch.long)
        return batch

    def collate_eval(self, samples: list[dict]) -> dict:
        if self.answer == "text":  # one row per option, each remembering its example and option
            rows = [(i, j, option) for i, s in enumerate(samples) for j, option in enumerate(s["options"])]
            batch = left_pad([ids for _, _, (ids, _) in rows], self.tokenizer.pad_token_id)
            batch["targets"] = answer_targets(batch["input_ids"], [length for _, _, (_, length) in rows])
            batch["row_example"] = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
            batch["row_option"] = torch.tensor([j for _, j, _ in rows], dtype=torch.long)
            batch["row_bytes"] = torch.tensor([samples[i]["bytes"][j] for i, j, _ in rows], dtype=torch.float)
        else:
            batch = left_pad([s["ids"] for s in samples], self.tokenizer.pad_token_id)
            batch["answer"] = torch.tensor([s["answer"] for s in samples], dtype=torch.long)
            batch["letters"] = self.eval_letters
        for key in ("label", "choices", "task"):
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
        batch["task_name"] = [s["task_name"] for s in samples]
        batch["example_id"] = [s["example_id"] for s in samples]
        return batch


def answer_targets(input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The last ``max(lengths)`` tokens of each left-padded row, ``-100`` (ignored by the loss) except a row's
    own last ``lengths[i]``: the answer tokens the loss and text scoring read."""
    width = max(lengths)
    keep = torch.arange(width) >= width - torch.tensor(lengths)[:, None]
    return input_ids[:, -width:].masked_fill(~keep, -100)


class BatchesFrom(BatchSampler):
    """A batch sampler over fixed batches that starts at ``start``; its length counts them all, so a resumed
    fit's restored progress and the batches it sees line up. It takes a ``sampler`` only so that Lightning can
    re-create it with a ``DistributedSampler`` under data parallelism, as it does every batch sampler; it reads
    nothing of it, since a data-parallel process's batches are already its share (``train_dataloader``)."""

    def __init__(self, sampler, batches: list[list[int]], start: int = 0):  # BatchSampler's init checks nothing we use
        self.sampler, self.batches, self.start = sampler, batches, start
        self.batch_size, self.drop_last = len(batches[0]) if batches else 1, False

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start :])


def draw_mixture(pools: dict[str, list], weights: dict[str, float], total: int, seed: int) -> list[tuple[str, object]]:
    """``total`` ``(task, item)`` pairs, ``weights[t]`` of them from ``pools[t]`` (cycling through seeded
    permutations), shuffled."""
    counts = {name: int(round(weight * total)) for name, weight in weights.items()}
    first = max(counts, key=counts.get)
    counts[first] += total - sum(counts.values())
    rng = random.Random(seed)
    drawn = []
    for name, count in counts.items():
        pool = list(pools[name])
        while count > 0:
            rng.shuffle(pool)
            drawn += [(name, item) for item in pool[:count]]
            count -= len(pool[:count])
    rng.shuffle(drawn)
    return drawn
