"""Tasks: multiple-choice examples with demographic groups, registered by name.

Adding a task is one module that subclasses :class:`Task` and decorates it with :func:`register`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from chainforget.config import TaskSpec
from chainforget.errors import ConfigError, DataError
from chainforget.tasks.splits import hash_split, stratified_cap, with_shares

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    """One multiple-choice question. ``prompt`` lists lettered choices and ends with ``Answer:``."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    label: int
    groups: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def multiple_choice_prompt(question: str, choices: list[str] | tuple[str, ...]) -> str:
    return question.strip() + _options_suffix(choices)


def _options_suffix(choices) -> str:
    return "".join(f"\n{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(choices)) + "\nAnswer:"


def question_text(example: Example) -> str:
    """The prompt without its lettered options (the context of ``text``-mode scoring)."""
    suffix = _options_suffix(example.choices)
    if not example.prompt.endswith(suffix):
        raise ValueError(f"example {example.id}: prompt was not built by multiple_choice_prompt")
    return example.prompt[: -len(suffix)]


@dataclass
class TaskData:
    """A task's examples after splitting and capping, with a content fingerprint for the stage cache."""

    name: str
    role: str
    group_kinds: tuple[str, ...]
    train: list[Example]
    eval: list[Example]
    fingerprint: str


class Task:
    """A task family. Subclasses set the class attributes and implement :meth:`read`."""

    name: ClassVar[str]
    role: ClassVar[Literal["safety", "capability"]]
    group_kinds: ClassVar[tuple[str, ...]] = ()
    sources: ClassVar[tuple[str, ...]] = ("release",)

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        """Return examples keyed ``train``/``eval`` when the source has its own split, else under ``all``.

        ``spec.source`` is one of :attr:`sources` (``auto`` is resolved before this is called)."""
        raise NotImplementedError

    def split_key(self, example: Example) -> str:
        """Examples with the same key always fall in the same split."""
        return example.id

    def stratum(self, example: Example) -> tuple:
        """Caps keep every stratum represented."""
        return tuple(example.groups.get(kind) for kind in self.group_kinds)

    def scores(self, predictions) -> list[dict]:
        """Task-specific safety scores from a predictions table (one row per eval example, with the
        example's groups and scalar ``meta`` fields as columns). Rows carry ``group_kind`` and ``group``."""
        return []


_REGISTRY: dict[str, type[Task]] = {}
_MODULES = ("arc", "bbq", "csqa", "csqa2", "saferdialogues", "toxigen")


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    for module in _MODULES:
        importlib.import_module(f"chainforget.tasks.{module}")
    return sorted(_REGISTRY)


def get(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in names():
        raise ConfigError(f"task {name!r} is unknown; registered tasks: {', '.join(names())}")
    return _REGISTRY[name]()


def load(name: str, spec: TaskSpec, seed: int) -> TaskData:
    """Read, split and cap one task deterministically."""
    task = get(name)
    parts = task.read(resolve_source(task, spec))
    if "all" in parts:
        train, evaluation = hash_split(parts["all"], task.split_key, spec.eval_fraction, seed)
    else:
        train, evaluation = parts["train"], parts["eval"]
    duplicates = [i for i, n in Counter(e.id for e in train + evaluation).items() if n > 1]
    if duplicates:
        raise DataError(f"task {name}: duplicate example id {duplicates[0]!r} ({len(duplicates)} duplicated ids)")
    train = stratified_cap(train, task.stratum, spec.max_train, seed)
    if spec.train_shares:
        train = shared_out(task, train, spec.train_shares, seed)
    evaluation = stratified_cap(evaluation, task.stratum, spec.max_eval, seed)
    if not train or not evaluation:
        raise DataError(
            f"task {name}: {len(train)} train and {len(evaluation)} eval examples after splitting; "
            "both must be non-empty (check path, eval_fraction and max_train/max_eval)"
        )
    return TaskData(name, task.role, task.group_kinds, train, evaluation, _fingerprint(train, evaluation))


def shared_out(task: Task, train: list[Example], train_shares: dict[str, dict[str, float]], seed: int) -> list[Example]:
    """``train`` cut to ``train_shares`` (``TaskSpec.train_shares``), its group kind and groups checked against the
    task's own."""
    ((kind, shares),) = train_shares.items()
    if kind not in task.group_kinds:
        allowed = ", ".join(task.group_kinds) or "none"
        raise ConfigError(f"tasks.{task.name}.train_shares: {kind!r} is not a group kind of {task.name}; use {allowed}")
    present = sorted({e.groups[kind] for e in train})
    unknown = [name for name in shares if name not in present]
    if unknown:
        raise ConfigError(
            f"tasks.{task.name}.train_shares.{kind}: no group {unknown[0]!r} in the training data; "
            f"groups: {', '.join(present)}"
        )
    return with_shares(train, lambda e: e.groups[kind], shares, seed)


def resolve_source(task: Task, spec: TaskSpec) -> TaskSpec:
    """``auto`` means the release files at ``path`` when given, else the offline PyPI archive when the task
    has one, else the release URL."""
    source = spec.source
    if source == "auto":
        source = "pypi" if "pypi" in task.sources and not spec.path else "release"
    if source not in task.sources:
        raise ConfigError(
            f"tasks.{task.name}.source: {source!r} is not available for {task.name}; "
            f"use one of {', '.join(task.sources)}"
        )
    return replace(spec, source=source)


def load_all(specs: dict[str, TaskSpec], seed: int, train_size: int | None = None) -> dict[str, TaskData]:
    """Load every task of a chain. ``train_size`` gives every task exactly that many training examples
    (the paper fixes the training-set size across tasks); a task with fewer is an error."""
    if train_size is None:
        return {name: load(name, spec, seed) for name, spec in specs.items()}
    if train_size < 1:
        raise ConfigError(f"train_size: {train_size} is not allowed; use a positive count or null")
    loaded = {name: load(name, replace(spec, max_train=train_size), seed) for name, spec in specs.items()}
    short = {name: len(d.train) for name, d in loaded.items() if len(d.train) < train_size}
    if short:
        sizes = ", ".join(f"{name} has {n}" for name, n in short.items())
        raise ConfigError(f"train_size: {train_size} training examples per task is more than available ({sizes})")
    return loaded


def _fingerprint(train: list[Example], evaluation: list[Example]) -> str:
    digest = hashlib.sha256()
    for split, examples in (("train", train), ("eval", evaluation)):
        for e in examples:
            digest.update(json.dumps([split, e.id, e.prompt, e.label], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
