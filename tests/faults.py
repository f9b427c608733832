"""Run ``chainforget`` with a SIGKILL planted at one point (used by test_resume.py as a subprocess).

    python tests/faults.py MODE N chainforget-args...

MODE: ``train_step`` (kill at the N-th training step), ``eval`` (at the start of the N-th task evaluation),
``rename`` (at the N-th ``os.replace``: the temp file is complete but not yet published), ``partial`` (the same,
after cutting the temp file to half its size: a write that died midway), ``shards`` (when a sharded checkpoint's
folder, its shards all written, is about to replace the previous one for the N-th time), ``shards_between`` (at
the N-th publishing of a new folder, after the previous one, if any, was moved aside), ``none``.
"""

import os
import signal
import sys
from pathlib import Path


def kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth_call(function, n: int, before=None, only=lambda *_: True):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += only(*args)
        if calls == n:
            if before is not None:
                before(*args)
            kill_self()
        return function(*args, **kwargs)

    return wrapper


def cut_in_half(source, *_):
    source = Path(source)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    if files:
        largest = max(files, key=lambda p: p.stat().st_size)
        os.truncate(largest, largest.stat().st_size // 2)


def main() -> int:
    mode, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from chainforget import evaluation
    from lightning_modules.stage import StageModule

    if mode == "train_step":
        StageModule.training_step = on_nth_call(StageModule.training_step, n)
    elif mode == "eval":
        evaluation.predictions_frame = on_nth_call(evaluation.predictions_frame, n)
    elif mode == "shards":
        os.replace = on_nth_call(os.replace, n, only=lambda _, target: str(target).endswith("last.ckpt.old"))
    elif mode == "shards_between":
        os.replace = on_nth_call(os.replace, n, only=lambda source, _: str(source).endswith("last.ckpt.new"))
    elif mode in ("rename", "partial"):
        os.replace = on_nth_call(os.replace, n, before=cut_in_half if mode == "partial" else None)
    from chainforget.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
