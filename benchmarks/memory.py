"""Peak resident memory of a SmolLM2 chain (the demo config, shortened), measured on a child process.

    python benchmarks/memory.py [--steps 10] [--eval 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from table import Row, print_table

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval", type=int, default=100)
    return parser


def measure(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile("w+") as log:
        command = [sys.executable, "-m", "chainforget.cli", "chain", "--config", str(ROOT / "sweeps/configs/demo.yaml"),
                   f"--out={out}", f"--cache_dir={out}/cache", "--run_name=memory", f"--train.steps={args.steps}",
                   f"--tasks.bbq.max_eval={args.eval}", f"--tasks.csqa.max_eval={args.eval}", "--wandb.mode=disabled"]  # fmt: skip
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        # this child's own peak: RUSAGE_CHILDREN would also count every earlier child (benchmarks/all.py's
        # compile workers, forked from a parent holding two models)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"the measured chain failed:\n{log.read()[-2000:]}")
    peak_gb = usage.ru_maxrss / 1024**2  # Linux reports KiB
    print(f"memory: SmolLM2 chain (LoRA, 2 stages x {args.steps} steps, {args.eval} eval questions per task): peak RSS {peak_gb:.2f} GB")
    return [Row("peak RSS of a SmolLM2 chain", f"{peak_gb:.2f} GB", "", None, "<= 3 GB", peak_gb <= 3)]


def main() -> int:
    print_table(measure(parser().parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
