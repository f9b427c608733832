"""Data-parallel chains: two CPU processes (Lightning's ``ddp`` over gloo) train the weights one process trains on
the same global batch, only rank 0 writes the run, and a killed ddp chain resumes to the uninterrupted result."""

import json
import signal
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file
from test_optuna import OVERRIDES, study_file
from test_resume import launch

from chainforget.errors import ConfigError
from chainforget.records import read_record
from lightning_modules.search import optuna_study

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def chain_args(out: Path, *extra: str) -> list[str]:
    # text answers: each process's loss is a sum over its share of the answer tokens, the case where a plain mean
    # per process would not add up to the global batch's mean
    return [
        "chain",
        "--config",
        "sweeps/configs/smoke.yaml",
        "--train.steps=6",
        "--train.answer=text",
        "--trainer.checkpoint_every=2",
        "--wandb.mode=offline",
        f"--out={out / 'runs'}",
        f"--cache_dir={out / 'stages'}",
        *extra,
    ]


def stage_weights(run_dir: Path, stage: int) -> dict:
    (weights,) = (run_dir / f"stage{stage}").glob("*.safetensors")
    return load_file(weights)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The smoke chain on one process and on two ddp processes (batch 8 = 4 + 4)."""
    root = tmp_path_factory.mktemp("ddp")
    one = launch("none", 0, chain_args(root / "one"))
    two = launch("none", 0, chain_args(root / "two", *DDP))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    return root, one, two


def test_two_ddp_processes_train_the_weights_of_one_process_with_the_same_global_batch(one_and_two):
    root, _, two = one_and_two
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in two.stderr  # two processes did train
    single, parallel = (read_record(root / name / "runs" / "smoke") for name in ("one", "two"))
    for stage in (1, 2):
        a, b = (stage_weights(root / name / "runs" / "smoke", stage) for name in ("one", "two"))
        assert a.keys() == b.keys()
        # the same steps on the same examples; only the order of float sums differs (measured: 1.7e-5 after stage 2)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    for s1, s2 in zip(single["stages"], parallel["stages"]):
        assert s2["train"]["steps"] == s1["train"]["steps"] == 6
        assert s2["train"]["tokens"] == s1["train"]["tokens"]  # every process's share counted, once
        assert s2["train"]["final_loss"] == pytest.approx(s1["train"]["final_loss"], rel=1e-5)  # the global batch's
    a, b = (pd.read_parquet(root / name / "runs" / "smoke" / "predictions.parquet") for name in ("one", "two"))
    assert (a["pred"] == b["pred"]).mean() > 0.95  # a near tie may fall the other way


def test_only_rank_zero_writes_the_run_the_cache_and_the_wandb_run(one_and_two):
    root, one, two = one_and_two
    assert two.stdout.count("run written to") == 1  # rank 1 ran the chain too, silently
    run_dir = root / "two" / "runs" / "smoke"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (root / "two" / "runs").iterdir()) == ["smoke"]
    # as many cache entries as one process writes, and no temporary entry left by a second writer
    entries = {name: sorted(p.name for p in (root / name / "stages").iterdir()) for name in ("one", "two")}
    assert len(entries["two"]) == len(entries["one"]) and not [e for e in entries["two"] if e.startswith(".")]
    assert not list(run_dir.glob("checkpoints/*/last.ckpt"))  # removed once the stage was cached


def test_a_killed_ddp_chain_resumes_to_the_uninterrupted_result(one_and_two, tmp_path):
    root = one_and_two[0]
    # without Lightning's distributed sampler too: the stage shards its batches itself, so nothing changes
    args = chain_args(tmp_path, *DDP, "--trainer.use_distributed_sampler=false")
    # the relaunched rank runs the same command, so both processes die at their 9th step (stage 2, step 3)
    killed = launch("train_step", 9, args)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "runs" / "smoke" / "checkpoints").exists() and not (tmp_path / "runs/smoke/run.json").exists()
    resumed = launch("none", 0, args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 2 resumes from its checkpoint" in resumed.stderr
    record, expected = read_record(tmp_path / "runs" / "smoke"), read_record(root / "two" / "runs" / "smoke")
    assert [s["cache_hit"] for s in record["stages"]] == [True, False]
    for stage in (1, 2):
        a, b = stage_weights(tmp_path / "runs" / "smoke", stage), stage_weights(root / "two" / "runs" / "smoke", stage)
        assert all(bool((a[k] == b[k]).all()) for k in a)  # bit for bit
    assert record["eval"] == expected["eval"]
    assert json.dumps(record["metrics"], sort_keys=True) == json.dumps(expected["metrics"], sort_keys=True)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_before_anything_runs(tmp_path, capsys):
    from chainforget.cli import main

    assert main(chain_args(tmp_path, *DDP, "--train.batch_size=5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size: 5 is the global batch" in err[0] and "multiple of 2" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ("--trainer.strategy=ddp_spawn", "trainer.strategy: 'ddp_spawn' is not supported for a chain of 2 processes"),
        ("--cache=wandb", "cache: wandb fetches stages on rank 0 alone"),
    ],
)
def test_what_a_data_parallel_chain_cannot_do_is_refused_in_one_line(setting, refusal, tmp_path, capsys):
    from chainforget.cli import main

    args = chain_args(tmp_path, *DDP, setting)
    if setting.startswith("--trainer.strategy"):
        args = [a for a in args if a != "--trainer.strategy=ddp"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refusal in err[0]
    assert not (tmp_path / "runs").exists()


def test_an_optuna_worker_refuses_data_parallel_chains(tmp_path):
    """Lightning's launcher would start the worker command again for rank 1: a second worker taking a trial."""
    grid = {"params": {"seed": {"type": "categorical", "choices": [0]}}, "sampler": {"name": "grid"}}
    path = study_file(tmp_path, overrides=[*OVERRIDES, *DDP], **grid)
    with pytest.raises(ConfigError, match="an Optuna worker runs one process per chain"):
        optuna_study(path, out=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
