"""Crash and resume: a chain killed with SIGKILL at randomised points, re-run with the same command each time,
ends with the run record an uninterrupted run writes, and nothing half-written is ever read as complete."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from chainforget.records import StageCache, read_record
from lightning_modules.checkpoint import SafetensorsCheckpointIO

from conftest import ROOT

FAULTS = Path(__file__).with_name("faults.py")


def chain_args(tmp_path: Path, run_name: str) -> list[str]:
    return [
        "chain", "--config", "sweeps/configs/smoke.yaml", f"--run_name={run_name}", f"--out={tmp_path / 'runs'}",
        f"--cache_dir={tmp_path / 'stages'}", "--trainer.checkpoint_every=4", "--wandb.mode=offline",
    ]  # fmt: skip


def launch(mode: str, n: int, args: list[str], kill_after: float | None = None) -> subprocess.CompletedProcess:
    # each attempt is a fresh process with its own W&B service, as a re-run command is (an in-process test may
    # have left this process's service address in WANDB_SERVICE)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"CHAINFORGET_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(FAULTS), mode, str(n), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_nothing_partial_is_complete(tmp_path: Path, run_name: str) -> None:
    """Whatever a reader would take as finished must be whole: cache entries verify, run.json validates,
    checkpoints load."""
    cache = StageCache(tmp_path / "stages")
    for entry in (tmp_path / "stages").glob("[!.]*"):
        assert cache.get(entry.name) is not None, f"published cache entry {entry.name} is damaged"
    run_dir = tmp_path / "runs" / run_name
    if (run_dir / "run.json").exists():
        read_record(run_dir)
    for checkpoint in run_dir.glob("checkpoints/*/last.ckpt"):
        assert SafetensorsCheckpointIO().load_checkpoint(checkpoint)["global_step"] > 0


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_record(tmp_path):
    reference = launch("none", 0, chain_args(tmp_path / "reference", "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = read_record(tmp_path / "reference" / "runs" / "ref")

    rng = random.Random(int(os.environ.get("CHAINFORGET_FAULT_SEED", "20261125")))
    # in turn: a training step, a task evaluation, an unpublished rename, a half-written temp file, a timer
    modes = ["train_step", "eval", "rename", "partial", "timer"]
    killed, attempts, logs = [], 0, []
    while len(killed) < 10:
        attempts += 1
        assert attempts <= 20, f"only {len(killed)} of {attempts - 1} attempts were killed"
        mode = modes[(attempts - 1) % len(modes)]
        n = {"train_step": rng.randint(2, 40), "eval": rng.randint(1, 4)}.get(mode, rng.randint(1, 10))
        timer = rng.uniform(6.0, 20.0) if mode == "timer" else None
        attempt = launch("none" if mode == "timer" else mode, n, chain_args(tmp_path, "run"), kill_after=timer)
        logs.append(attempt.stderr)
        if attempt.returncode == -signal.SIGKILL:
            killed.append(mode)
        else:  # the point lay beyond what was left to do: the chain finished; start its work over
            assert attempt.returncode == 0, f"{mode} {n}: {attempt.stderr[-2000:]}"
            shutil.rmtree(tmp_path / "stages")
            (tmp_path / "runs" / "run" / "run.json").unlink()
        assert_nothing_partial_is_complete(tmp_path, "run")

    assert {"train_step", "eval", "rename", "partial"} <= set(killed), killed

    final = launch("none", 0, chain_args(tmp_path, "run"))
    assert final.returncode == 0, final.stderr[-2000:]
    record = read_record(tmp_path / "runs" / "run")
    assert record["eval"] == expected["eval"]
    # bit for bit, not only the same accuracies: every option log-probability and each stage's last loss
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "runs" / "run" / "predictions.parquet"),
        pd.read_parquet(tmp_path / "reference" / "runs" / "ref" / "predictions.parquet"),
    )
    assert [s["train"]["final_loss"] for s in record["stages"]] == [s["train"]["final_loss"] for s in expected["stages"]]
    assert json.dumps(record["metrics"], sort_keys=True) == json.dumps(expected["metrics"], sort_keys=True)
    assert any("Restored all states from the checkpoint" in log for log in logs), "no attempt resumed a stage checkpoint"
    # every attempt continued the one W&B run the first attempt created
    offline_runs = list((tmp_path / "runs" / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) > 1 and len({path.name.rsplit("-", 1)[1] for path in offline_runs}) == 1
