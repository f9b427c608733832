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
import pytest
from conftest import ROOT

from chainforget.records import StageCache, read_record
from lightning_modules.checkpoint import SafetensorsCheckpointIO

FAULTS = Path(__file__).with_name("faults.py")


def chain_args(tmp_path: Path, run_name: str) -> list[str]:
    return [
        "chain",
        "--config",
        "sweeps/configs/smoke.yaml",
        f"--run_name={run_name}",
        f"--out={tmp_path / 'runs'}",
        f"--cache_dir={tmp_path / 'stages'}",
        "--trainer.checkpoint_every=4",
        "--wandb.mode=offline",
    ]


def launch(mode: str, n: int, args: list[str], kill_after: float | None = None) -> subprocess.CompletedProcess:
    # each attempt is a fresh process with its own W&B service, as a re-run command is (an in-process test may
    # have left this process's service address in WANDB_SERVICE)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {
        "CHAINFORGET_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, str(FAULTS), mode, str(n), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert [s["train"]["final_loss"] for s in record["stages"]] == [
        s["train"]["final_loss"] for s in expected["stages"]
    ]
    assert json.dumps(record["metrics"], sort_keys=True) == json.dumps(expected["metrics"], sort_keys=True)
    assert any("resumes from its checkpoint" in log for log in logs), "no attempt resumed a stage checkpoint"
    # every attempt continued the one W&B run the first attempt created
    offline_runs = list((tmp_path / "runs" / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) > 1 and len({path.name.rsplit("-", 1)[1] for path in offline_runs}) == 1


class Interrupted(Exception):
    pass


@pytest.mark.parametrize(
    ("mitigation", "strength", "finetune", "stage"),
    [
        ("sam", 0.05, "full", 2),
        ("lwf", 1.0, "full", 2),
        ("ewc", 1.0, "full", 2),
        ("safety_anchor", 1.0, "lora", 2),  # the safety direction is rebuilt from the cached stage 1
        ("safety_projection", 0.9, "lora", 2),
        ("group_replay", 1.0, "full", 3),  # the DRO weights carried over in the checkpoint
    ],
)
def test_a_stage_with_a_mitigation_resumes_with_its_anchor_teacher_and_optimizer_state(
    mitigation, strength, finetune, stage, smoke_config, monkeypatch, tmp_path
):
    from dataclasses import replace

    from chainforget.config import MitigationSpec
    from lightning_modules.chain import run_chain
    from lightning_modules.stage import StageModule

    config = replace(
        smoke_config,
        model=replace(smoke_config.model, finetune=finetune),
        mitigation=MitigationSpec(name=mitigation, strength=strength),
        trainer=replace(smoke_config.trainer, checkpoint_every=4),
        wandb=replace(smoke_config.wandb, mode="disabled"),
    )
    expected = run_chain(
        replace(config, out=str(tmp_path / "ref"), cache_dir=str(tmp_path / "ref-cache")), progress=False
    )

    original, steps = StageModule.training_step, []

    def interrupt(self, batch, batch_idx):
        steps.append(batch_idx)
        if len(steps) == 30 * (stage - 1) + 11:  # every stage has 30 steps; stop after its checkpoint at step 8
            raise Interrupted
        return original(self, batch, batch_idx)

    monkeypatch.setattr(StageModule, "training_step", interrupt)
    with pytest.raises(Interrupted):
        run_chain(config, progress=False)
    assert list((tmp_path / "runs").glob("*/checkpoints/*/last.ckpt"))
    resumed_steps = []

    def count(self, batch, batch_idx):
        resumed_steps.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(StageModule, "training_step", count)
    record = run_chain(config, progress=False)
    assert len(resumed_steps) == 30 - 8  # the stages before from the cache, this one from its step-8 checkpoint
    run_dir = tmp_path / "runs" / record["run_name"]
    assert [s["cache_hit"] for s in record["stages"]] == [True] * (stage - 1) + [False]

    def carried(summary):  # what the stage carries over a resume; a projection's wall time is the clock's
        return {key: value for key, value in summary.items() if key != "wall_s"}

    assert carried(record["stages"][stage - 1]["mitigation"]) == carried(expected["stages"][stage - 1]["mitigation"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_dir / "predictions.parquet"),
        pd.read_parquet(tmp_path / "ref" / record["run_name"] / "predictions.parquet"),
    )


def test_a_resumed_stage_keeps_the_metrics_logged_before_its_checkpoint(tmp_path):
    def args(where: Path) -> list[str]:
        return [*chain_args(where, "run"), "--trainer.log_every_n_steps=1", "--wandb.mode=disabled"]

    reference = launch("none", 0, args(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = launch("train_step", 10, args(tmp_path))  # in stage 1, after its checkpoint at step 8
    assert killed.returncode == -signal.SIGKILL
    logs = tmp_path / "runs" / "run" / "lightning_logs" / "stage1" / "metrics.csv"
    assert pd.read_csv(logs)["step"].max() >= 8  # the killed attempt had logged past the checkpoint
    resumed = launch("none", 0, args(tmp_path))
    assert resumed.returncode == 0 and "stage 1 resumes from its checkpoint" in resumed.stderr

    def losses(root: Path) -> pd.DataFrame:
        frame = pd.read_csv(root / "runs" / "run" / "lightning_logs" / "stage1" / "metrics.csv")
        return frame[["step", "train/loss", "train/lr"]].dropna().reset_index(drop=True)

    expected = losses(tmp_path / "reference")
    assert len(expected) == 30  # one row per step of the 30-step stage
    pd.testing.assert_frame_equal(losses(tmp_path), expected)


def test_a_second_process_on_a_running_chain_is_refused_and_changes_nothing(tmp_path, capsys):
    import fcntl

    from chainforget.cli import main

    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "lightning_logs").mkdir()
    (run_dir / "lightning_logs" / "metrics.csv").write_text("step,train/loss\n0,1.5\n")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    holder = os.open(run_dir, os.O_RDONLY)  # what the running chain holds
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(chain_args(tmp_path, "run")) == 2
    finally:
        os.close(holder)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is in use by another running chain" in line and str(run_dir) in line
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
