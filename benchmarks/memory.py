"""Peak resident memory of a SmolLM2 chain (the demo config, shortened), measured on a child process, and of
the full ``chainforget demo`` (both orders in one process, as ``make demo`` runs it, stage cache off).

    python benchmarks/memory.py [--steps 10] [--eval 100] [--repeats 3] [--demo-repeats 1]

Each chain runs ``repeats`` times, as the chainforget command runs it (on tcmalloc where installed) and on the
system malloc, alternating; the peaks are medians with [min, max]. The demo runs ``demo_repeats`` times (0: not at
all), as the command runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from table import Row, print_table

from chainforget import allocator

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo-repeats", type=int, default=1)
    return parser


# The chain reports its own high-water mark at exit. What the parent can read (wait4's ru_maxrss) is
# wrong here: subprocess starts the child with vfork, and Linux folds the parent's peak into the child's
# maxrss at exec (8.74 GB inside benchmarks/all.py, which holds two models and lm-eval).
CHAIN_REPORTING_PEAK = """
import atexit, sys
from pathlib import Path
def report():
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(f"chain {peak}", file=sys.stderr)
atexit.register(report)
from chainforget.cli import run
sys.exit(run())
"""


def chain_peak_gb(args, env: dict[str, str]) -> float:
    shortened = [
        "chain",
        "--config",
        str(ROOT / "sweeps/configs/demo.yaml"),
        "--run_name=memory",
        f"--train.steps={args.steps}",
        f"--tasks.bbq.max_eval={args.eval}",
        f"--tasks.csqa.max_eval={args.eval}",
    ]
    return peak_gb(shortened, env)


def peak_gb(arguments: list[str], env: dict[str, str]) -> float:
    """The high-water mark of ``chainforget <arguments>`` in a child process, its output in a temporary folder."""
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile("w+") as log:
        command = [sys.executable, "-c", CHAIN_REPORTING_PEAK, *arguments, f"--out={out}", f"--cache_dir={out}/cache"]
        command.append("--wandb.mode=disabled")
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        log.seek(0)
        output = log.read()
    if done.returncode != 0:
        raise RuntimeError(f"the measured chain failed:\n{output[-2000:]}")
    return int(output.rsplit("chain VmHWM:", 1)[1].split()[0]) / 1024**2


def measure(args) -> list[Row]:
    """The chain as the command runs it (on tcmalloc where installed), and on the system's malloc."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    sides = {"default": env}
    if allocator.tcmalloc_library() is not None:
        sides["system"] = env | {allocator.OPT_OUT: "system"}
    peaks = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, side_env in sides.items():
            peaks[side].append(chain_peak_gb(args, side_env))
    rows = []
    if args.demo_repeats > 0:
        demo = [peak_gb(["demo"], env) for _ in range(args.demo_repeats)]
        print(f"memory: the full demo (both orders in one process), {len(demo)} run(s): {spread(demo)} GB")
        value = statistics.median(demo)
        rows.append(
            Row(
                "peak RSS of the full demo, both orders in one process",
                f"{value:.2f} GB",
                "",
                None,
                "<= 3 GB",
                value <= 3,
            )
        )
    default = statistics.median(peaks["default"])
    chain = f"SmolLM2 chain (LoRA, 2 stages x {args.steps} steps, {args.eval} eval questions per task)"
    print(f"memory: {chain}, {args.repeats} runs: peak RSS {default:.2f} GB {spread(peaks['default'])}")
    if "system" not in sides:
        return [*rows, Row("peak RSS of a SmolLM2 chain", f"{default:.2f} GB", "", None, "<= 3 GB", default <= 3)]
    system = statistics.median(peaks["system"])
    print(
        f"memory: the same chain on the system malloc: peak RSS {system:.2f} GB {spread(peaks['system'])} "
        "(the first was on tcmalloc)"
    )
    return [
        *rows,
        Row(
            "peak RSS of a SmolLM2 chain, tcmalloc vs system malloc",
            f"{default:.2f} GB",
            f"{system:.2f} GB",
            None,
            "<= 3 GB",
            default <= 3,
        ),
    ]


def spread(values: list[float]) -> str:
    return f"[{min(values):.2f}, {max(values):.2f}]"


def main() -> int:
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
