"""The one table every benchmark ends with: anchor, chainforget's figure, the anchor's figure, ratio, target, met."""

from __future__ import annotations

import os
import platform
from typing import NamedTuple


class Row(NamedTuple):
    anchor: str
    ours: str
    theirs: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


def machine() -> str:
    """The CPU the figures come from: a matmul peak and every MFU depend on it (AMX or not, above all)."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        pairs = (line.split(":", 1) for line in open("/proc/cpuinfo").read().splitlines() if ":" in line)
        info = {key.strip(): value for key, value in pairs}
        family, number = info.get("cpu family", "?").strip(), info.get("model", "?").strip()
        model = f"{info.get('model name', model).strip()} (family {family}, model {number})"
        flags = set(info.get("flags", "").split())
    units = ", AMX" if "amx_bf16" in flags else (", AVX-512 BF16" if "avx512_bf16" in flags else "")
    return (
        f"{model}, {os.cpu_count()} cores{units} (torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})"
    )


def print_table(rows: list[Row]) -> None:
    print(f"\nmachine: {machine()}")
    width = max(len(row.anchor) for row in rows)
    print(f"\n{'anchor':<{width}}  {'chainforget':>16}  {'anchor':>10}  {'ratio':>6}  {'target':>9}  met")
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        met = "" if row.met is None else ("yes" if row.met else "no")
        print(f"{row.anchor:<{width}}  {row.ours:>16}  {row.theirs:>10}  {ratio:>6}  {row.target:>9}  {met}")
