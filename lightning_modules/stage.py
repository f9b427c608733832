"""One fine-tuning stage: ``StageModule`` (answer-only causal-LM loss, AdamW + linear warm-up/decay) and
``StageDataModule`` (a seeded mixture of task training examples). Both run under LightningCLI ``fit`` or
inside the chain runner, which hands them an already loaded model, tokenizer and data.
"""

from __future__ import annotations

import random
import time

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from chainforget.config import ModelSpec, TaskSpec, parse_stage
from chainforget.models import load_model, load_tokenizer
from chainforget.tasks import TaskData, load as load_task
from chainforget.scoring import encode_prompt, left_pad, letter_token_ids


class StageModule(L.LightningModule):
    """Fine-tunes a causal LM on the answer letter only: cross-entropy of the next token after the prompt,
    the same distribution letter-mode scoring reads (prompt tokens carry no loss).

    Args:
        model: which model to load (ignored when the chain runner passes one in).
        lr: peak AdamW learning rate.
        warmup_ratio: share of ``trainer.max_steps`` spent warming up linearly before the linear decay.
        weight_decay: AdamW weight decay.
        seed: seed for model initialisation (LoRA adapters, the tiny model).
    """

    def __init__(
        self, model: ModelSpec | None = None, lr: float = 2e-4, warmup_ratio: float = 0.1, weight_decay: float = 0.0,
        seed: int = 0,
    ):  # fmt: skip
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.spec = model or ModelSpec()
        self.network = None
        self.final_loss: float | None = None
        self.tokens_seen = 0
        self._step_started = 0.0

    @classmethod
    def wrapping(cls, network, *, lr: float, warmup_ratio: float, weight_decay: float) -> StageModule:
        module = cls(lr=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay)
        module.network = network
        return module

    def configure_model(self) -> None:
        if self.network is None:
            self.network = load_model(self.spec, self.hparams.seed)

    def forward(self, input_ids, attention_mask, position_ids):
        """Logits of the token after each (left-padded) prompt: only the last position reaches the LM head."""
        out = self.network(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)
        return out.logits[:, -1]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["answer"])
        tokens = int(batch["attention_mask"].sum())
        self.tokens_seen += tokens
        self.final_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        if elapsed > 0:
            self.log("train/tokens_per_s", float(batch["attention_mask"].sum()) / elapsed)

    def configure_optimizers(self):
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches))
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class StageDataModule(L.LightningDataModule):
    """Training examples for one stage: ``steps * batch_size`` draws from the stage's task mixture.

    Args:
        tasks: task specs by registry name.
        stage: a task name or a mixture such as ``bbq:0.95+csqa:0.05``.
        model: the model whose tokenizer encodes the prompts.
        batch_size: examples per step.
        steps: optimizer steps the stage will take (link it to ``trainer.max_steps``).
        max_seq_len: prompts keep their last ``max_seq_len`` tokens.
        seed: drives splits, caps and the draw order.
    """

    def __init__(
        self, tasks: dict[str, TaskSpec] | None = None, stage: str = "bbq", model: ModelSpec | None = None,
        batch_size: int = 8, steps: int = 100, max_seq_len: int = 384, seed: int = 0,
    ):  # fmt: skip
        super().__init__()
        self.specs = tasks or {name: TaskSpec() for name in parse_stage(stage)}
        self.mixture = parse_stage(stage)
        self.model_spec = model or ModelSpec()
        self.batch_size, self.steps, self.max_seq_len, self.seed = batch_size, steps, max_seq_len, seed
        self.data: dict[str, TaskData] | None = None
        self.tokenizer = None
        self.samples: list[dict] = []

    @classmethod
    def prepared(cls, data, tokenizer, *, stage: str, batch_size: int, steps: int, max_seq_len: int, seed: int):
        module = cls(tasks={}, stage=stage, batch_size=batch_size, steps=steps, max_seq_len=max_seq_len, seed=seed)
        module.data, module.tokenizer = data, tokenizer
        return module

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_spec)
        if self.data is None:
            self.data = {name: load_task(name, self.specs[name], self.seed) for name in self.mixture}
        examples = draw_mixture({n: self.data[n].train for n in self.mixture}, self.mixture, self.steps * self.batch_size, self.seed)
        letters = letter_token_ids(self.tokenizer, max(len(e.choices) for e in examples))
        self.samples = [
            {"ids": encode_prompt(self.tokenizer, e.prompt, self.max_seq_len), "answer": letters[e.label]}
            for e in examples
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = left_pad([s["ids"] for s in samples], self.tokenizer.pad_token_id)
        batch["answer"] = torch.tensor([s["answer"] for s in samples], dtype=torch.long)
        return batch


def draw_mixture(pools: dict[str, list], weights: dict[str, float], total: int, seed: int) -> list:
    """``total`` items, ``weights[t]`` of them from ``pools[t]`` (cycling through seeded permutations), shuffled."""
    counts = {name: int(round(weight * total)) for name, weight in weights.items()}
    first = next(iter(counts))
    counts[first] += total - sum(counts.values())
    rng = random.Random(seed)
    drawn = []
    for name, count in counts.items():
        pool = list(pools[name])
        while count > 0:
            rng.shuffle(pool)
            drawn += pool[:count]
            count -= len(pool[:count])
    rng.shuffle(drawn)
    return drawn
