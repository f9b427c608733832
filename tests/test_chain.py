import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import wandb_summary

from chainforget.config import TaskSpec
from chainforget.metrics import bbq_bias_scores
from chainforget.records import read_record
from lightning_modules.chain import run_chain

ROOT = Path(__file__).resolve().parents[1]


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
    assert {"stage", "task", "example_id", "label", "pred", "option_logprobs", "category", "context", "target"} <= set(
        predictions.columns
    )
    assert (predictions["correct"] == (predictions["pred"] == predictions["label"])).all()

    bias = [r for r in record["metrics"]["task_scores"] if r["task"] == "bbq" and r["group_kind"] == "category"]
    assert sorted((r["stage"], r["group"]) for r in bias) == [(k, c) for k in range(3) for c in ("Age", "Religion")]
    final = predictions[(predictions["stage"] == 2) & (predictions["task"] == "bbq")]
    assert [{k: v for k, v in r.items() if k not in ("task", "stage")} for r in bias if r["stage"] == 2] == (
        bbq_bias_scores(final, "category")
    )

    # Per-example forgetting: the rows of F (probes and the last stage's task have none), each recounted here from
    # the flips between the stage that trained BBQ and the last in predictions.parquet
    examples = record["metrics"]["example_forgetting"]
    keys = ["task", "trained_stage", "later_stage", "group_kind", "group", "n", "small"]
    assert [{k: r[k] for k in keys} for r in examples] == [
        {k: r[k] for k in keys} for r in record["metrics"]["forgetting"]
    ]
    bbq = predictions[predictions["task"] == "bbq"]
    pairs = bbq[bbq["stage"] == 1].merge(bbq[bbq["stage"] == 2], on="example_id", suffixes=("", "_last"))
    chance = pairs["option_logprobs"].map(lambda options: (len(options) - 1) / len(options) ** 2)
    flips = pd.DataFrame(
        {
            "forgotten": (pairs["correct"] == 1) & (pairs["correct_last"] == 0),
            "learned": (pairs["correct"] == 0) & (pairs["correct_last"] == 1),
            "expected_flip": chance,
        }
    )
    for row, f in zip(examples, record["metrics"]["forgetting"]):
        part = flips if row["group_kind"] == "all" else flips[pairs[row["group_kind"]] == row["group"]]
        assert row["n"] == len(part)
        assert [row[k] for k in flips] == pytest.approx(list(100 * part.mean()))
        assert row["forgotten_adj"] == pytest.approx(row["forgotten"] - row["expected_flip"])
        assert row["learned_adj"] == pytest.approx(row["learned"] - row["expected_flip"])
        assert row["forgotten"] - row["learned"] == pytest.approx(f["F"])  # flips either way net out to F
    (whole,) = [r for r in examples if r["group_kind"] == "all"]
    assert whole["expected_flip"] == pytest.approx(100 * 2 / 9)  # BBQ: 3 options, (1/3)(2/3)

    assert (run_dir / "lightning_logs" / "stage1" / "metrics.csv").exists()
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert (wandb_run / "files" / "run.json").exists()
    assert (wandb_run / "files" / "predictions.parquet").exists()
    assert list(wandb_run.glob("run-*.wandb"))
    summary = wandb_summary(wandb_run)["summary"]
    age = next(r for r in examples if r["group"] == "Age")
    assert summary["example_forgetting/bbq/forgotten_adj"] == pytest.approx(whole["forgotten_adj"])
    assert summary["example_forgetting/bbq/category/Age/learned"] == pytest.approx(age["learned"])


def test_rerun_takes_every_stage_from_the_cache_and_reproduces_the_record(smoke_config):
    first = run_chain(smoke_config, progress=False)
    again = run_chain(replace(smoke_config, run_name="smoke-again"), progress=False)
    assert [s["cache_hit"] for s in again["stages"]] == [True, True]
    assert again["eval"] == first["eval"]
    assert again["metrics"] == first["metrics"]
    reordered = run_chain(replace(smoke_config, run_name="reordered", order=["bbq", "bbq"]), progress=False)
    assert [s["cache_hit"] for s in reordered["stages"]] == [True, False]  # shares only the first stage
    forced = run_chain(replace(smoke_config, run_name="forced", cache=False), progress=False)  # --no-cache
    assert [s["cache_hit"] for s in forced["stages"]] == [False, False]
    assert forced["eval"] == first["eval"]  # recomputing on the CPU with the same seed reproduces the run


@pytest.mark.parametrize(("capability", "safety"), [("arc", "toxigen"), ("csqa2", "saferdialogues")])
def test_capability_safety_pairs_run_in_both_orders(smoke_config, capability, safety):
    fixtures = ROOT / "tests" / "fixtures"
    specs = {
        "arc": TaskSpec(source="release", path=str(fixtures / "arc")),
        "csqa2": TaskSpec(source="release", path=str(fixtures / "csqa2")),
        "toxigen": TaskSpec(source="release", path=str(fixtures / "toxigen"), eval_fraction=0.4),
        "saferdialogues": TaskSpec(source="release", path=str(fixtures / "saferdialogues")),
    }
    pair = {capability: specs[capability], safety: specs[safety]}
    for order in ([capability, safety], [safety, capability]):
        config = replace(
            smoke_config,
            tasks=pair,
            order=order,
            run_name="-".join(order),
            train_size=2,
            train=replace(smoke_config.train, steps=3),
        )
        record = run_chain(config, progress=False)
        assert {r["task"] for r in record["eval"]} == {capability, safety}
        assert {r["stage"] for r in record["eval"]} == {0, 1, 2}
        assert all(d["train"] == 2 for d in record["data"].values())
        (forgotten,) = [r for r in record["metrics"]["forgetting"] if r["group_kind"] == "all"]
        assert forgotten["task"] == order[0]
        if safety == "toxigen":
            scores = [r for r in record["metrics"]["task_scores"] if r["task"] == "toxigen"]
            assert {r["stage"] for r in scores} == {0, 1, 2} and all(0 <= r["balanced_acc"] <= 1 for r in scores)


def test_text_mode_evaluation_in_a_chain(smoke_config):
    config = replace(
        smoke_config,
        run_name="text",
        eval=replace(smoke_config.eval, mode="text_norm"),
        train=replace(smoke_config.train, steps=3),
    )
    record = run_chain(config, progress=False)
    predictions = pd.read_parquet(Path(config.out) / "text" / "predictions.parquet")
    assert {len(lp) for lp in predictions[predictions["task"] == "csqa"]["option_logprobs"]} == {5}
    assert all(r["acc"] >= 0 for r in record["eval"])


def test_text_answers_train_a_chain_and_key_its_stages_apart_from_letter_answers(smoke_config):
    settings = {"eval": replace(smoke_config.eval, mode="text_norm"), "order": ["bbq"]}
    letter = run_chain(replace(smoke_config, run_name="letter", **settings), progress=False)
    text_config = replace(smoke_config, run_name="text", train=replace(smoke_config.train, answer="text"), **settings)
    text = run_chain(text_config, progress=False)
    assert text["config"]["train"]["answer"] == "text"
    assert text["stages"][0]["cache_key"] != letter["stages"][0]["cache_key"]
    assert text["stages"][0]["train"]["final_loss"] != letter["stages"][0]["train"]["final_loss"]


def test_tasks_listed_but_not_in_the_chain_are_not_loaded(smoke_config):
    unused = {**smoke_config.tasks, "toxigen": TaskSpec(source="release", path="/nonexistent/toxigen")}
    record = run_chain(
        replace(smoke_config, run_name="unused", tasks=unused, train=replace(smoke_config.train, steps=2)),
        progress=False,
    )
    assert set(record["data"]) == {"bbq", "csqa"}


def test_lora_adapters_depend_on_the_seed_alone_not_on_what_the_process_ran_before(tmp_path):
    from chainforget.config import LoraSpec, ModelSpec
    from chainforget.models import load_model, tiny_tokenizer, trainable_state

    folder = tmp_path / "model"  # a local HF directory: the route every real model takes
    load_model(ModelSpec(name="tiny", finetune="full"), seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    spec = ModelSpec(name=str(folder), finetune="lora", lora=LoraSpec(rank=2, target_modules=["q_proj"]))
    first = trainable_state(load_model(spec, seed=3))
    torch.rand(1000)  # an earlier chain in the same process (an Optuna worker) drew from the generator
    again = trainable_state(load_model(spec, seed=3))
    other = trainable_state(load_model(spec, seed=4))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_each_stage_is_saved_where_hugging_face_loaders_open_it(smoke_config, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chainforget.models import load_model, tiny_tokenizer

    record = run_chain(replace(smoke_config, train=replace(smoke_config.train, steps=3)), progress=False)
    run_dir = Path(smoke_config.out) / "smoke"
    for stage in record["stages"]:  # full fine-tuning: the whole model, as trained, with its tokenizer
        loaded = AutoModelForCausalLM.from_pretrained(run_dir / f"stage{stage['index']}")
        cached = load_file(str(Path(smoke_config.cache_dir) / stage["cache_key"] / "weights.safetensors"))
        assert all(torch.equal(p, cached[name]) for name, p in loaded.state_dict().items() if name in cached)
        assert AutoTokenizer.from_pretrained(run_dir / "stage2").get_vocab() == tiny_tokenizer().get_vocab()

    base = tmp_path / "base"  # LoRA on a local model directory: the adapter alone, on top of its base
    load_model(smoke_config.model, seed=0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    lora = replace(smoke_config.model, name=str(base), finetune="lora")
    run_chain(
        replace(smoke_config, run_name="lora", model=lora, train=replace(smoke_config.train, steps=3)), progress=False
    )
    adapter = Path(smoke_config.out) / "lora" / "stage2"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    assert AutoPeftModelForCausalLM.from_pretrained(adapter).peft_config["default"].r == smoke_config.model.lora.rank


def test_the_trainer_block_takes_every_trainer_argument_the_runner_does_not_set_itself():
    import inspect
    from dataclasses import fields

    import lightning as L

    from chainforget.config import TrainerSpec
    from lightning_modules.chain import RUNNER_OWNED

    configurable = {f.name for f in fields(TrainerSpec)} - {"checkpoint_every"}
    arguments = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    assert configurable | set(RUNNER_OWNED) == arguments and not configurable & set(RUNNER_OWNED)


def test_gradient_accumulation_and_clipping_reach_the_trainer(smoke_config):
    base = replace(smoke_config, train=replace(smoke_config.train, steps=3))
    plain = run_chain(replace(base, run_name="plain", order=["bbq"]), progress=False)
    trainer = replace(base.trainer, accumulate_grad_batches=2, gradient_clip_val=0.5)
    accumulated = run_chain(replace(base, run_name="accumulated", order=["bbq"], trainer=trainer), progress=False)
    (first,), (second,) = plain["stages"], accumulated["stages"]
    assert first["train"]["steps"] == second["train"]["steps"] == 3  # optimizer steps
    assert second["train"]["tokens"] > first["train"]["tokens"]  # each over two batches
    assert second["cache_key"] != first["cache_key"] and not second["cache_hit"]


@pytest.mark.parametrize("mode", ["disabled", "offline"])
def test_a_config_without_a_wandb_mode_follows_wandb_mode(smoke_config, monkeypatch, mode):
    import wandb

    monkeypatch.setenv("WANDB_MODE", mode)
    wandb.teardown()  # W&B reads its environment once per process, as a new command would
    config = replace(smoke_config, run_name=mode, train=replace(smoke_config.train, steps=2))
    assert config.wandb.mode is None  # smoke.yaml says nothing about the mode
    run_chain(config, progress=False)
    runs = list((Path(config.out) / mode / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == (0 if mode == "disabled" else 1)


def test_without_credentials_an_online_run_goes_offline_and_says_so_once(smoke_config, monkeypatch, tmp_path, capsys):
    import wandb

    from lightning_modules import tracking

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: never logged in
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    wandb.teardown()  # W&B resolves its settings once per process: make it resolve them again
    tracking.say_offline_once.cache_clear()
    try:
        assert tracking.wandb_credentials() is False
        assert tracking.wandb_mode(None) == tracking.wandb_mode(None) == "offline"
        assert tracking.wandb_mode("disabled") == "disabled"  # a mode the config names is taken as it is
        monkeypatch.setenv("WANDB_API_KEY", "x" * 86)
        wandb.teardown()
        assert tracking.wandb_credentials() is True and tracking.wandb_mode(None) == "online"
    finally:
        wandb.teardown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no W&B login and no WANDB_MODE" in err[0]


def test_the_record_states_what_each_stage_trained_and_an_old_record_is_upgraded_to_the_same_facts(smoke_config):
    from chainforget.config import MitigationSpec
    from chainforget.records import load_record

    config = replace(
        smoke_config, mitigation=MitigationSpec("replay_stage", 0.25), train=replace(smoke_config.train, steps=2)
    )
    record = run_chain(config, progress=False)
    assert [(s["trains"], s["replays"]) for s in record["stages"]] == [
        (["bbq"], []),
        (["csqa"], []),
        (["csqa"], ["bbq"]),
    ]
    assert record["tasks"] == {
        "bbq": {"role": "safety", "group_kinds": ["category", "target", "context"], "trained_stage": 1},
        "csqa": {"role": "capability", "group_kinds": [], "trained_stage": 3},
    }
    old = {key: value for key, value in record.items() if key not in ("tasks", "mitigation")} | {"schema_version": 1}
    old["stages"] = [{k: v for k, v in stage.items() if k not in ("trains", "replays")} for stage in record["stages"]]
    assert load_record(json.loads(json.dumps(old))) == json.loads(json.dumps(record))


@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute", "a/b", "..", "x" * 129, "spaces are odd"])
def test_a_run_name_is_one_folder_inside_out(smoke_config, name, capsys):
    from chainforget.cli import main

    code = main(["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={smoke_config.out}", f"--run_name={name}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run_name:" in err[0] and "is not allowed" in err[0]
    assert not Path(smoke_config.out).exists() and not (ROOT / "outside").exists()


def test_a_different_config_never_overwrites_a_run_and_the_same_one_resumes_it(smoke_config, capsys):
    from chainforget.cli import main

    args = ["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={smoke_config.out}"]
    args += [f"--cache_dir={smoke_config.cache_dir}", "--train.steps=3", "--wandb.mode=disabled"]
    args += ["--trainer.log_every_n_steps=1"]
    assert main(args) == 0
    run_dir = Path(smoke_config.out) / "smoke"
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert run_dir / "run.json" in before and run_dir / "lightning_logs" / "stage1" / "metrics.csv" in before
    capsys.readouterr()

    assert main([*args, "--train.lr=0.01", "--seed=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run with a different config (train.lr: 0.003 -> 0.01, seed: 0 -> 3)" in err[0]
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before  # nothing touched

    assert main([*args, "--trainer.log_every_n_steps=2", "--wandb.mode=offline"]) == 0  # same run: resumed
    assert json.loads((run_dir / "run.json").read_text())["stages"][0]["cache_hit"] is True

    # a run written before a setting existed is the same run where the setting is at its default, not otherwise
    written = json.loads((run_dir / "config.json").read_text())
    del written["mitigation"]["replay_share"]
    (run_dir / "config.json").write_text(json.dumps(written))
    assert main(args) == 0
    written = json.loads((run_dir / "config.json").read_text())
    del written["mitigation"]["replay_share"]
    (run_dir / "config.json").write_text(json.dumps(written))
    capsys.readouterr()
    assert main([*args, "--mitigation.replay_share=0.1"]) == 2
    assert "(mitigation.replay_share: 0.05 -> 0.1)" in capsys.readouterr().err  # it ran with the default


def test_settings_added_later_leave_cache_keys_alone_at_their_defaults():
    """Stages cached before a setting existed stay valid: the key part of a block drops the later settings at their
    defaults (a mitigation's where it does not read them) and gradient checkpointing, which changes no gradient."""
    from dataclasses import asdict

    from chainforget.config import MitigationSpec, ModelSpec, TrainSpec
    from lightning_modules.chain import keyed

    assert keyed(TrainSpec(gradient_checkpointing=True)) == keyed(TrainSpec())
    assert "gradient_checkpointing" not in keyed(TrainSpec()) and "lr" in keyed(TrainSpec())
    assert keyed(ModelSpec()) == {k: v for k, v in asdict(ModelSpec()).items() if k != "quantization"}
    assert keyed(ModelSpec(quantization="nf4"))["quantization"] == "nf4"
    l2sp = keyed(MitigationSpec("l2sp", 1.0, replay_share=0.05))
    assert "replay_share" not in l2sp and "group_kind" not in l2sp and l2sp["temperature"] == 2.0
    assert keyed(MitigationSpec("group_replay", 0.3))["replay_share"] == 0.05  # read by group_replay
