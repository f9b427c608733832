import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from chainforget.cli import parse_chain
from chainforget.metrics import bbq_bias_scores
from chainforget.records import read_record
from lightning_modules.chain import run_chain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def smoke_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config names fixture paths relative to the repository root
    return parse_chain(
        ["--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'stages'}"],
        prog="test",
    )


def accuracy(record, stage, task):
    (row,) = [r for r in record["eval"] if r["stage"] == stage and r["task"] == task and r["group_kind"] == "all"]
    return row["acc"]


def test_two_stage_tiny_chain_end_to_end(smoke_config):
    record = run_chain(smoke_config, progress=False)
    run_dir = Path(smoke_config.out) / "smoke"

    assert read_record(run_dir) == json.loads((run_dir / "run.json").read_text())  # schema-valid on disk
    assert [s["name"] for s in record["stages"]] == ["bbq", "csqa"]
    assert all(s["train"]["steps"] == 30 and s["train"]["tokens"] > 0 and not s["cache_hit"] for s in record["stages"])

    # Learning happened: stage 1 (BBQ) moves BBQ accuracy off the base model, and stage 2 (CSQA) moves it again.
    base, after_a, after_b = (accuracy(record, k, "bbq") for k in (0, 1, 2))
    assert after_a > base
    assert after_b != after_a
    forgetting = [r for r in record["metrics"]["forgetting"] if r["task"] == "bbq" and r["group_kind"] == "all"]
    assert forgetting[0]["F"] == pytest.approx(100 * (after_a - after_b))
    assert forgetting[0]["F_ci"][0] <= forgetting[0]["F"] <= forgetting[0]["F_ci"][1]
    assert {r["group_kind"] for r in record["metrics"]["biased_forgetting"]} == {"category", "context", "target"}

    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    n_eval = sum(d["eval"] for d in record["data"].values())
    assert len(predictions) == 3 * n_eval
    assert {"stage", "task", "example_id", "label", "pred", "option_logprobs", "category", "context", "target"} <= set(predictions.columns)
    assert (predictions["correct"] == (predictions["pred"] == predictions["label"])).all()

    bias = [r for r in record["metrics"]["task_scores"] if r["task"] == "bbq" and r["group_kind"] == "category"]
    assert sorted((r["stage"], r["group"]) for r in bias) == [(k, c) for k in range(3) for c in ("Age", "Religion")]
    final = predictions[(predictions["stage"] == 2) & (predictions["task"] == "bbq")]
    assert [{k: v for k, v in r.items() if k not in ("task", "stage")} for r in bias if r["stage"] == 2] == (
        bbq_bias_scores(final, "category")
    )

    assert (run_dir / "lightning_logs" / "stage1" / "metrics.csv").exists()
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert (wandb_run / "files" / "run.json").exists()
    assert (wandb_run / "files" / "predictions.parquet").exists()
    assert list(wandb_run.glob("run-*.wandb"))


def test_rerun_takes_every_stage_from_the_cache_and_reproduces_the_record(smoke_config):
    first = run_chain(smoke_config, progress=False)
    again = run_chain(replace(smoke_config, run_name="smoke-again"), progress=False)
    assert [s["cache_hit"] for s in again["stages"]] == [True, True]
    assert again["eval"] == first["eval"]
    assert again["metrics"] == first["metrics"]
    reordered = run_chain(replace(smoke_config, run_name="reordered", order=["bbq", "bbq"]), progress=False)
    assert [s["cache_hit"] for s in reordered["stages"]] == [True, False]  # shares only the first stage
