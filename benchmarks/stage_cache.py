"""Stage cache on the paper's order grid: every safety x capability pair in both orders, on the tiny model
and the test fixtures, run once with the cache and once without, side by side in one process.

    python benchmarks/stage_cache.py [--seeds 1] [--steps 20]

Prints stage trainings and wall time for both, and their ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from table import Row, print_table

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SAFETY = {"bbq": "bbq", "toxigen": "toxigen"}
CAPABILITY = {"csqa": "csqa", "arc": "arc", "csqa2": "csqa2"}


def grid_configs(out: Path, cache_dir: Path, seeds: int, steps: int, use_cache: bool):
    from chainforget.cli import parse_chain
    from chainforget.config import TaskSpec

    base = parse_chain(["--config", str(ROOT / "sweeps/configs/smoke.yaml"), f"--out={out}", f"--cache_dir={cache_dir}"], "bench")
    specs = {name: TaskSpec(source="release", path=str(FIXTURES / folder), eval_fraction=0.5) for name, folder in {**SAFETY, **CAPABILITY}.items()}
    for seed, (safety, capability) in itertools.product(range(seeds), itertools.product(SAFETY, CAPABILITY)):
        for order in ([safety, capability], [capability, safety]):
            yield replace(base, run_name=f"{'-'.join(order)}-s{seed}", seed=seed, order=order, cache=use_cache, train_size=2,
                          tasks={safety: specs[safety], capability: specs[capability]},
                          train=replace(base.train, steps=steps), eval=replace(base.eval, bootstrap=100),
                          wandb=replace(base.wandb, mode="disabled"))  # fmt: skip


def run_grid(seeds: int, steps: int, use_cache: bool) -> tuple[int, int, float]:
    from lightning_modules.chain import run_chain

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        trained = total = 0
        for config in grid_configs(Path(tmp) / "runs", Path(tmp) / "cache", seeds, steps, use_cache):
            record = run_chain(config, progress=False)
            trained += sum(not stage["cache_hit"] for stage in record["stages"])
            total += len(record["stages"])
        return trained, total, time.perf_counter() - started


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    return parser


def measure(args) -> list[Row]:
    torch.set_num_threads(1)
    os.environ.setdefault("CHAINFORGET_CACHE", tempfile.mkdtemp())
    without = run_grid(args.seeds, args.steps, use_cache=False)
    with_cache = run_grid(args.seeds, args.steps, use_cache=True)
    chains = len(SAFETY) * len(CAPABILITY) * 2 * args.seeds
    print(f"stage cache: order grid, {chains} chains, {args.steps} steps per stage, 1 thread")
    print(f"{'':>12} {'stage trainings':>16} {'wall s':>8}")
    print(f"{'no cache':>12} {without[0]:>16} {without[2]:>8.1f}")
    print(f"{'cache':>12} {with_cache[0]:>16} {with_cache[2]:>8.1f}")
    return [
        Row(f"stage trainings on the order grid ({chains} chains), cache vs none", str(with_cache[0]), str(without[0]), with_cache[0] / without[0]),
        Row("wall time on the order grid, cache vs none", f"{with_cache[2]:.1f} s", f"{without[2]:.1f} s", with_cache[2] / without[2]),
    ]  # fmt: skip


def main() -> int:
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
