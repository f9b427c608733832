"""Stage cache on the paper's order grid: every safety x capability pair in both orders, on the tiny model
and the test fixtures, run once with the cache and once without, side by side in one process.

    python benchmarks/stage_cache.py [--seeds 1] [--steps 20] [--repeats 3]

Prints stage trainings and wall time for both (the grids alternate, ``repeats`` times each; wall time is the
median with [min, max]), and their ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
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
    from chainforget.config import TaskSpec, parse_chain

    base = parse_chain(
        ["--config", str(ROOT / "sweeps/configs/smoke.yaml"), f"--out={out}", f"--cache_dir={cache_dir}"], "bench"
    )
    specs = {
        name: TaskSpec(source="release", path=str(FIXTURES / folder), eval_fraction=0.5)
        for name, folder in {**SAFETY, **CAPABILITY}.items()
    }
    for seed, (safety, capability) in itertools.product(range(seeds), itertools.product(SAFETY, CAPABILITY)):
        for order in ([safety, capability], [capability, safety]):
            yield replace(
                base,
                run_name=f"{'-'.join(order)}-s{seed}",
                seed=seed,
                order=order,
                cache=use_cache,
                train_size=2,
                tasks={safety: specs[safety], capability: specs[capability]},
                train=replace(base.train, steps=steps),
                eval=replace(base.eval, bootstrap=100),
                wandb=replace(base.wandb, mode="disabled"),
            )


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
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def measure(args) -> list[Row]:
    torch.set_num_threads(1)
    os.environ.setdefault("CHAINFORGET_CACHE", tempfile.mkdtemp())
    runs = {"no cache": [], "cache": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(run_grid(args.seeds, args.steps, use_cache=side == "cache"))
    trainings = {side: runs[side][0][0] for side in runs}  # the same every repeat
    walls = {side: [wall for _, _, wall in runs[side]] for side in runs}
    wall = {side: statistics.median(walls[side]) for side in runs}
    chains = len(SAFETY) * len(CAPABILITY) * 2 * args.seeds
    print(f"stage cache: order grid, {chains} chains, {args.steps} steps per stage, 1 thread, {args.repeats} repeats")
    print(f"{'':>12} {'stage trainings':>16} {'wall s':>8} {'spread':>14}")
    for side in runs:
        print(
            f"{side:>12} {trainings[side]:>16} {wall[side]:>8.1f} [{min(walls[side]):>5.1f}, {max(walls[side]):>5.1f}]"
        )
    return [
        Row(
            f"stage trainings on the order grid ({chains} chains), cache vs none",
            str(trainings["cache"]),
            str(trainings["no cache"]),
            trainings["cache"] / trainings["no cache"],
        ),
        Row(
            "wall time on the order grid, cache vs none",
            f"{wall['cache']:.1f} s",
            f"{wall['no cache']:.1f} s",
            wall["cache"] / wall["no cache"],
        ),
    ]


def main() -> int:
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
