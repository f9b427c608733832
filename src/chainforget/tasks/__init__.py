"""Tasks: multiple-choice examples with demographic groups, registered by name.

Adding a task is one module that subclasses :class:`Task` and decorates it with :func:`register`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from chainforget.config import TaskSpec
from chainforget.errors import ConfigError, DataError
from chainforget.tasks.splits import hash_split, stratified_cap

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
    lines = [question.strip()] + [f"{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


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

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        """Return examples keyed ``train``/``eval`` when the source has its own split, else under ``all``."""
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
    parts = task.read(spec)
    if "all" in parts:
        train, evaluation = hash_split(parts["all"], task.split_key, spec.eval_fraction, seed)
    else:
        train, evaluation = parts["train"], parts["eval"]
    duplicates = [i for i, n in Counter(e.id for e in train + evaluation).items() if n > 1]
    if duplicates:
        raise DataError(f"task {name}: duplicate example id {duplicates[0]!r} ({len(duplicates)} duplicated ids)")
    train = stratified_cap(train, task.stratum, spec.max_train, seed)
    evaluation = stratified_cap(evaluation, task.stratum, spec.max_eval, seed)
    if not train or not evaluation:
        raise DataError(
            f"task {name}: {len(train)} train and {len(evaluation)} eval examples after splitting; "
            "both must be non-empty (check path, eval_fraction and max_train/max_eval)"
        )
    return TaskData(name, task.role, task.group_kinds, train, evaluation, _fingerprint(train, evaluation))


def _fingerprint(train: list[Example], evaluation: list[Example]) -> str:
    digest = hashlib.sha256()
    for split, examples in (("train", train), ("eval", evaluation)):
        for e in examples:
            digest.update(json.dumps([split, e.id, e.prompt, e.label], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
