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
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    one = launch("none", 0, chain_args(root))
    assert one.returncode == 0, one.stderr[-2000:]
    return root


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(request, tmp_path_factory):
    """The smoke chain on two processes (batch 8 = 4 + 4): replicated (ddp) or sharded (FSDP2)."""
    root = tmp_path_factory.mktemp(request.param)
    args = [f"--trainer.strategy={request.param}", "--trainer.devices=2"]
    two = launch("none", 0, chain_args(root, *args))
    assert two.returncode == 0, two.stderr[-2000:]
    return root, two, args


def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(one_process, two_processes):
    root, two, _ = two_processes
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in two.stderr  # two processes did train
    single, parallel = read_record(one_process / "runs" / "smoke"), read_record(root / "runs" / "smoke")
    for stage in (1, 2):
        a, b = (stage_weights(folder / "runs" / "smoke", stage) for folder in (one_process, root))
        assert a.keys() == b.keys()
        # the same steps on the same examples; only the order of float sums differs (measured after stage 2:
        # 1.7e-5 under ddp and under fsdp alike)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    for s1, s2 in zip(single["stages"], parallel["stages"]):
        assert s2["train"]["steps"] == s1["train"]["steps"] == 6
        assert s2["train"]["tokens"] == s1["train"]["tokens"]  # every process's share counted, once
        assert s2["train"]["final_loss"] == pytest.approx(s1["train"]["final_loss"], rel=1e-5)  # the global batch's
    a, b = (pd.read_parquet(folder / "runs" / "smoke" / "predictions.parquet") for folder in (one_process, root))
    assert (a["pred"] == b["pred"]).mean() > 0.95  # a near tie may fall the other way


def test_only_rank_zero_writes_the_run_the_cache_and_the_wandb_run(one_process, two_processes):
    root, two, _ = two_processes
    assert two.stdout.count("run written to") == 1  # rank 1 ran the chain too, silently
    run_dir = root / "runs" / "smoke"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["smoke"]
    # as many cache entries as one process writes, and no temporary entry left by a second writer
    entries = {folder: sorted(p.name for p in (folder / "stages").iterdir()) for folder in (one_process, root)}
    assert len(entries[root]) == len(entries[one_process]) and not [e for e in entries[root] if e.startswith(".")]
    assert not list(run_dir.glob("checkpoints/*/last.ckpt"))  # removed once the stage was cached


def test_a_killed_data_parallel_chain_resumes_to_the_uninterrupted_result(two_processes, tmp_path):
    root, _, parallel = two_processes
    # without Lightning's distributed sampler too: the stage shards its batches itself, so nothing changes
    args = chain_args(tmp_path, *parallel, "--trainer.use_distributed_sampler=false")
    # the relaunched rank runs the same command, so both processes die at their 9th step (stage 2, step 3)
    assert_killed_and_resumed(("train_step", 9), args, tmp_path, root, leaves={"last.ckpt"})


@pytest.mark.parametrize("two_processes", ["fsdp"], indirect=True)
# each stage saves at steps 2 and 4, so the chain's 2nd move of a previous checkpoint aside and its 4th publishing
# of a new one are both stage 2's at step 4
@pytest.mark.parametrize(
    ("fault", "leaves"),
    [(("shards", 2), {"last.ckpt", "last.ckpt.new"}), (("shards_between", 4), {"last.ckpt.old", "last.ckpt.new"})],
    ids=["before", "between"],
)
def test_a_sharded_chain_killed_before_its_new_checkpoint_is_published_resumes_from_the_previous(
    two_processes, fault, leaves, tmp_path
):
    root, _, parallel = two_processes
    # rank 0 dies with stage 2's step-4 shards all written beside last.ckpt, before they replace its step-2 ones (rank
    # 1 then fails at its next collective): before the step-2 folder is moved aside, or after; either way step 2's
    # are resumed from
    assert_killed_and_resumed(fault, chain_args(tmp_path, *parallel), tmp_path, root, leaves)
    assert not (tmp_path / "runs/smoke/checkpoints").exists() or not any(
        (tmp_path / "runs/smoke/checkpoints").iterdir()
    )


class OneProcessSaving:
    """What ``StageCheckpoint.save_shards`` asks of a trainer, for one process: each save a folder holding its step."""

    is_global_zero = True
    strategy = type("Strategy", (), {"barrier": staticmethod(lambda: None)})

    def __init__(self, step: int):
        self.step = step

    def save_checkpoint(self, path: Path, weights_only: bool) -> None:
        path.mkdir()
        (path / "step").write_text(str(self.step))


@pytest.mark.parametrize(
    ("left", "resumed_from"),
    [
        ({"last.ckpt": 4, "last.ckpt.old": 2}, "last.ckpt"),  # killed before removing the folder it had moved aside
        ({"last.ckpt.old": 2, "last.ckpt.new": 4}, "last.ckpt.old"),  # killed between moving aside and publishing
    ],
)
def test_what_a_killed_sharded_save_left_is_resumed_from_and_then_replaced_whole(tmp_path, left, resumed_from):
    from lightning_modules.checkpoint import StageCheckpoint

    for name, step in left.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "step").write_text(str(step))
    assert StageCheckpoint.resumable(tmp_path) == tmp_path / resumed_from
    StageCheckpoint(tmp_path, every_n_steps=2).save_shards(OneProcessSaving(6))
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / "step").read_text() == "6"
    assert StageCheckpoint.resumable(tmp_path.parent / "nothing") is None


def assert_killed_and_resumed(
    fault: tuple[str, int], args: list[str], tmp_path: Path, uninterrupted: Path, leaves: set[str]
) -> None:
    """The chain killed at ``fault`` (faults.py), in its second stage, leaves the checkpoints named ``leaves`` and no
    run record; the same command resumes stage 2 and ends with the uninterrupted run's weights, evaluations and
    metrics."""
    killed = launch(*fault, args)
    assert killed.returncode == -signal.SIGKILL
    # a file, or FSDP's folders of shards: where the kill came shows in which of them are left
    assert {path.name for path in (tmp_path / "runs/smoke/checkpoints").glob("*/last.ckpt*")} == leaves
    assert not (tmp_path / "runs/smoke/run.json").exists()
    resumed = launch("none", 0, args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 2 resumes from its checkpoint" in resumed.stderr
    record, expected = read_record(tmp_path / "runs" / "smoke"), read_record(uninterrupted / "runs" / "smoke")
    assert [s["cache_hit"] for s in record["stages"]] == [True, False]
    for stage in (1, 2):
        a, b = stage_weights(tmp_path / "runs" / "smoke", stage), stage_weights(uninterrupted / "runs" / "smoke", stage)
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
    ("strategy", "setting", "refusal"),
    [
        ("ddp_spawn", "", "trainer.strategy: 'ddp_spawn' is not supported for a chain of 2 processes"),
        ("ddp", "--cache=wandb", "cache: wandb fetches stages on rank 0 alone"),
        ("fsdp", "--cache=wandb", "cache: wandb fetches stages on rank 0 alone"),
        ("fsdp", "--mitigation.name=l2sp", "mitigation.name: 'l2sp' reads the weights in every training step"),
        ("fsdp", "--mitigation.name=sam", "with fsdp use none, replay_stage, replay_mix, group_replay"),
    ],
)
def test_what_a_data_parallel_chain_cannot_do_is_refused_in_one_line(strategy, setting, refusal, tmp_path, capsys):
    from chainforget.cli import main

    args = chain_args(tmp_path, f"--trainer.strategy={strategy}", "--trainer.devices=2", *filter(None, [setting]))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refusal in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_4bit_base_is_not_sharded():
    """Checked ahead of the GPU it needs (which would refuse it first on this machine)."""
    from chainforget.config import parse_chain
    from lightning_modules.chain import check_sharding

    config = parse_chain(
        [
            "--config",
            "sweeps/configs/smoke.yaml",
            "--model.finetune=lora",
            "--model.quantization=nf4",
            "--trainer.strategy=fsdp",
        ],
        "test",
    )
    with pytest.raises(ConfigError, match="model.quantization: 'nf4' cannot be sharded by trainer.strategy fsdp"):
        check_sharding(config)


def test_a_sharded_lora_chain_in_bf16_with_checkpointed_blocks_and_lwf_trains_what_ddp_trains(tmp_path):
    """FSDP2 with frozen weights in its units, bf16 autocast, checkpointed blocks and LwF's teacher (the network run
    outside a fit): the same weights as ddp, bit for bit (each process computes the same share of every batch)."""
    lora = ["--model.finetune=lora", "--trainer.precision=bf16-mixed", "--train.gradient_checkpointing=true"]
    lora += ["--mitigation.name=lwf", "--mitigation.strength=1.0", "--train.answer=letter"]  # LwF distils letters
    runs = {}
    for strategy in ("ddp", "fsdp"):
        args = chain_args(tmp_path / strategy, f"--trainer.strategy={strategy}", "--trainer.devices=2", *lora)
        done = launch("none", 0, args)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[strategy] = tmp_path / strategy / "runs" / "smoke"
    for stage in (1, 2):
        a, b = stage_weights(runs["ddp"], stage), stage_weights(runs["fsdp"], stage)
        assert a.keys() == b.keys() and len(a) == 16  # LoRA A and B of q and v in the tiny model's 4 blocks
        assert all(bool((a[k] == b[k]).all()) for k in a)


def test_an_optuna_worker_refuses_data_parallel_chains(tmp_path):
    """Lightning's launcher would start the worker command again for rank 1: a second worker taking a trial."""
    grid = {"params": {"seed": {"type": "categorical", "choices": [0]}}, "sampler": {"name": "grid"}}
    path = study_file(tmp_path, overrides=[*OVERRIDES, *DDP], **grid)
    with pytest.raises(ConfigError, match="an Optuna worker runs one process per chain"):
        optuna_study(path, out=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
