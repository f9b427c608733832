"""Deterministic splits and group-stratified caps, driven by a seed."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) for ``key`` under ``seed`` (same on every machine and Python version)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(items: Sequence[T], key: Callable[[T], str], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split by hash of ``key(item)``: items sharing a key (e.g. a BBQ template) land on the same side."""
    train, evaluation = [], []
    for item in items:
        (evaluation if unit_hash(key(item), seed) < eval_fraction else train).append(item)
    return train, evaluation


def stratified_cap(items: Sequence[T], stratum: Callable[[T], Hashable], limit: int | None, seed: int) -> list[T]:
    """Keep at most ``limit`` items, taking strata in turn so every stratum is represented.

    Each stratum is shuffled by ``seed``; strata are visited round-robin, so small strata are kept whole
    and large ones are cut evenly. The result keeps the input order.
    """
    if limit is None or limit >= len(items):
        return list(items)
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_stratum[stratum(item)].append(index)
    rng = random.Random(seed)
    queues = []
    for name in sorted(by_stratum, key=repr):
        indices = by_stratum[name]
        rng.shuffle(indices)
        queues.append(indices)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def with_shares(items: Sequence[T], group: Callable[[T], str], shares: dict[str, float], seed: int) -> list[T]:
    """The largest subset of ``items`` whose groups have the given ``shares`` (each group's items shuffled by
    ``seed``, the first ``round(share * size)`` kept; groups without a share are dropped). The input order is kept.
    ``size`` is what the scarcest group allows: ``min(count_g / share_g)`` over the groups with a share."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_group[group(item)].append(index)
    size = min(len(by_group.get(name, [])) / share for name, share in shares.items() if share > 0)
    rng = random.Random(seed)
    chosen: list[int] = []
    for name in sorted(shares):
        indices = list(by_group.get(name, []))
        rng.shuffle(indices)
        chosen += indices[: round(shares[name] * size)]
    return [items[i] for i in sorted(chosen)]
