"""``chainforget fit|validate|test|predict``: one stage through LightningCLI, driven as a user drives it, and
checked with Lightning's own readers (``load_hparams_from_yaml``, ``load_from_checkpoint``)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, wandb_summary
from lightning.pytorch.core.saving import load_hparams_from_yaml

from chainforget.cli import main
from chainforget.config import ModelSpec, TaskSpec
from chainforget.errors import ChainforgetError
from chainforget.models import load_tokenizer
from chainforget.scoring import encode_option, encode_prompt, left_pad, letter_token_ids, score_letters, score_text
from chainforget.tasks import load as load_task
from lightning_modules.checkpoint import SafetensorsCheckpointIO
from lightning_modules.stage import StageDataModule, StageModule, answer_logits, answer_loss

STAGE = ["--config", "sweeps/configs/stage_smoke.yaml", "--trainer.enable_progress_bar=false"]
TINY = ModelSpec(name="tiny", finetune="full")
BBQ = TaskSpec(source="release", path="tests/fixtures/bbq", eval_fraction=0.5)  # as in stage_smoke.yaml
CSQA = TaskSpec(source="release", path="tests/fixtures/csqa")
MIXED = ["--data.mixture=bbq+csqa", "--data.tasks.csqa.source=release", "--data.tasks.csqa.path=tests/fixtures/csqa"]
CHECKPOINT = ["--trainer.enable_checkpointing=true"]
EVERY_2_STEPS = [
    *CHECKPOINT,
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=2",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
]


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage_smoke.yaml names the fixtures relative to the repository root


def read_checkpoint(path: Path) -> dict:
    return SafetensorsCheckpointIO().load_checkpoint(path)


def logged(root: Path, version: int = 0) -> pd.DataFrame:
    return pd.read_csv(root / "lightning_logs" / f"version_{version}" / "metrics.csv")


def test_fit_trainer_max_steps_sets_the_stage_length_and_validation_follows_lightnings_flags(tmp_path):
    args = ["fit", *STAGE, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=6"]
    assert main([*args, "--trainer.log_every_n_steps=2", "--trainer.val_check_interval=3"]) == 0
    metrics = logged(tmp_path)
    assert metrics.loc[metrics["train/loss"].notna(), "step"].tolist() == [1, 3, 5]  # 6 steps, logged every 2nd
    validations = metrics[metrics["val/acc"].notna()]
    assert len(validations) == 2  # after batch 3 and batch 6 of the one-epoch stage
    assert "val/bbq/acc" not in metrics.columns  # one task: no per-task keys
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").exists()


def test_fit_with_gradient_accumulation_draws_and_resumes_at_the_right_batch(tmp_path):
    args = ["fit", *STAGE, "--trainer.max_steps=6", "--trainer.accumulate_grad_batches=2", *EVERY_2_STEPS]
    assert main([*args, f"--trainer.default_root_dir={tmp_path / 'whole'}"]) == 0
    saved = {p.stem: p for p in (tmp_path / "whole").glob("lightning_logs/version_0/checkpoints/*.ckpt")}
    assert sorted(saved) == ["step=2", "step=4", "step=6"]  # optimizer steps, not batches
    whole = read_checkpoint(saved["step=6"])
    assert whole["global_step"] == 6
    assert whole["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 12
    assert whole["StageDataModule"]["position"] == 12
    assert read_checkpoint(saved["step=4"])["StageDataModule"]["position"] == 8
    # the data module drew 6 steps x 2 batches of 8, and the fit trained on every one of them
    data = StageDataModule(tasks={"bbq": BBQ}, model=TINY, steps=6, max_seq_len=256, accumulate_grad_batches=2)
    data.setup("fit")
    assert len(data.samples) == 96
    assert whole["stage"]["tokens_seen"] == sum(int(batch["attention_mask"].sum()) for batch in data.loader())

    # resumed from step 4 it goes on at batch 8 and ends where the uninterrupted fit ended, bit for bit
    resumed_args = [*args, f"--trainer.default_root_dir={tmp_path / 'resumed'}", f"--ckpt_path={saved['step=4']}"]
    assert main(resumed_args) == 0
    resumed = read_checkpoint(tmp_path / "resumed" / "lightning_logs" / "version_0" / "checkpoints" / "step=6.ckpt")
    assert resumed["global_step"] == 6 and resumed["StageDataModule"]["position"] == 12
    assert resumed["stage"]["tokens_seen"] == whole["stage"]["tokens_seen"]
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name


def test_hparams_yaml_and_load_from_checkpoint_work_with_lightnings_own_readers(tmp_path, monkeypatch):
    args = ["fit", *STAGE, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--model.lr=0.002"]
    assert main([*args, *CHECKPOINT]) == 0
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    hparams_file = tmp_path / "lightning_logs" / "version_0" / "hparams.yaml"
    hparams = load_hparams_from_yaml(hparams_file)  # yaml.full_load: no Python object tags allowed
    assert hparams["lr"] == 0.002 and hparams["optimizer"] is None
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    model = {"name": "tiny", "finetune": "full", "lora": lora, "revision": None, "trust_remote_code": False}
    model["quantization"] = "none"
    assert hparams["model"] == model
    stored = read_checkpoint(checkpoint)
    assert stored["hyper_parameters"] == hparams

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a stage checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    module = StageModule.load_from_checkpoint(checkpoint)
    assert module.hparams.lr == 0.002 and module.spec == TINY
    loaded = {f"network.{name}": parameter for name, parameter in module.trainable().items()}
    assert loaded.keys() == stored["state_dict"].keys()
    for name, tensor in stored["state_dict"].items():
        assert torch.equal(loaded[name].detach(), tensor), name
    fresh = StageModule(model=TINY)
    fresh.configure_model()
    assert not all(torch.equal(p, loaded[f"network.{n}"]) for n, p in fresh.trainable().items())  # it was trained

    # Lightning's other arguments: a hyper-parameter file, keyword overrides
    assert StageModule.load_from_checkpoint(checkpoint, hparams_file=hparams_file, lr=0.1).hparams.lr == 0.1
    with pytest.raises(ChainforgetError, match=r"do not fit model 'tiny' \(lora\)"):
        StageModule.load_from_checkpoint(checkpoint, model={"name": "tiny", "finetune": "lora"})


def test_optimizer_flags_replace_adamw_and_the_schedule_over_the_trainable_parameters(tmp_path):
    args = ["fit", *STAGE, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", *CHECKPOINT]
    sgd = ["--optimizer=SGD", "--optimizer.lr=0.5", "--optimizer.momentum=0.9", "--model.model.finetune=lora"]
    assert main([*args, *sgd, f"--trainer.default_root_dir={tmp_path / 'sgd'}"]) == 0
    # the default linear schedule over SGD's lr: no warm-up step (int(0.1 * 4) = 0), then down to 0 after step 4
    assert logged(tmp_path / "sgd")["train/lr"].dropna().tolist() == [0.5, 0.375, 0.25, 0.125]
    (checkpoint,) = (tmp_path / "sgd").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    stored = read_checkpoint(checkpoint)
    group = stored["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD, not AdamW
    assert all("lora_" in name for name in stored["state_dict"])
    assert len(group["params"]) == len(stored["state_dict"]) == 16  # the LoRA A/B of 4 projections x 2 layers

    step_lr = ["--lr_scheduler=StepLR", "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5"]
    assert main([*args, *step_lr, f"--trainer.default_root_dir={tmp_path / 'step_lr'}"]) == 0
    # AdamW at model.lr, and the scheduler steps once per epoch as Lightning steps --lr_scheduler: not within it
    assert logged(tmp_path / "step_lr")["train/lr"].dropna().tolist() == pytest.approx([0.003] * 4)
    (checkpoint,) = (tmp_path / "step_lr").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    stored = read_checkpoint(checkpoint)
    adamw = stored["optimizer_states"][0]["param_groups"][0]
    assert "betas" in adamw and adamw["fused"] is True  # torch's fused CPU kernel, not the for-each loop
    assert stored["lr_schedulers"][0]["step_size"] == 1 and stored["lr_schedulers"][0]["gamma"] == 0.5


def test_validate_test_and_predict_score_the_eval_split_like_chainforget_scoring(tmp_path):
    fit_args = ["fit", *STAGE, *MIXED, f"--trainer.default_root_dir={tmp_path / 'fit'}", "--trainer.max_steps=2"]
    assert main([*fit_args, *CHECKPOINT]) == 0
    (checkpoint,) = (tmp_path / "fit").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    for command in ("validate", "test", "predict"):
        args = [command, *STAGE, *MIXED, f"--trainer.default_root_dir={tmp_path / command}"]
        assert main([*args, f"--ckpt_path={checkpoint}"]) == 0
    # the full fine-tune's checkpoint is refused for a LoRA module (Lightning would restore it non-strictly)
    other = [
        "validate",
        *STAGE,
        *MIXED,
        f"--trainer.default_root_dir={tmp_path / 'other'}",
        "--model.model.finetune=lora",
    ]
    assert main([*other, f"--ckpt_path={checkpoint}"]) == 2 and not (tmp_path / "other").exists()
    predictions = pd.read_parquet(tmp_path / "predict" / "lightning_logs" / "version_0" / "predictions.parquet")

    network = StageModule.load_from_checkpoint(checkpoint).network.eval()
    tokenizer = load_tokenizer(TINY)
    correct, losses, counts = {}, {}, {}
    for name, spec in (("bbq", BBQ), ("csqa", CSQA)):
        examples = load_task(name, spec, 0).eval
        scores = score_letters(network, tokenizer, examples, max_seq_len=256, progress=False)
        labels = np.array([e.label for e in examples])
        mine = predictions[predictions["task"] == name].set_index("example_id").loc[[e.id for e in examples]]
        assert mine["pred"].tolist() == scores.pred.tolist() and mine["label"].tolist() == labels.tolist()
        for ours, theirs in zip(mine["option_logprobs"], scores.option_logprobs):
            assert len(ours) == len(theirs) and np.allclose(ours, theirs, atol=1e-4)
        letters = letter_token_ids(tokenizer, max(len(e.choices) for e in examples))
        with torch.no_grad():  # the answer letter's cross-entropy, one question at a time
            per_example = [
                F.cross_entropy(
                    answer_logits(network, left_pad([encode_prompt(tokenizer, e.prompt, 256)], tokenizer.pad_token_id)),
                    torch.tensor([letters[e.label]]),
                ).item()
                for e in examples
            ]
        correct[name], losses[name], counts[name] = (scores.pred == labels).sum(), sum(per_example), len(examples)
    assert counts == {"bbq": 24, "csqa": 15} and len(predictions) == 39
    assert set(predictions.loc[predictions["task"] == "bbq", "pred"]) <= {0, 1, 2}  # 3 options, never D or E

    validation, test = logged(tmp_path / "validate").iloc[-1], logged(tmp_path / "test").iloc[-1]
    for name in ("bbq", "csqa"):
        assert validation[f"val/{name}/acc"] == pytest.approx(correct[name] / counts[name])
        assert validation[f"val/{name}/loss"] == pytest.approx(losses[name] / counts[name], rel=1e-4)
    assert validation["val/acc"] == pytest.approx(sum(correct.values()) / 39)
    assert validation["val/loss"] == pytest.approx(sum(losses.values()) / 39, rel=1e-4)
    assert test["test/acc"] == validation["val/acc"] and test["test/csqa/acc"] == validation["val/csqa/acc"]


def test_text_answers_train_the_correct_options_tokens_and_score_like_text_norm(tmp_path):
    fit_args = ["fit", *STAGE, "--data.answer=text", f"--trainer.default_root_dir={tmp_path / 'fit'}"]
    assert main([*fit_args, "--trainer.max_steps=2", *CHECKPOINT]) == 0
    (checkpoint,) = (tmp_path / "fit").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    for command in ("validate", "predict"):
        args = [command, *STAGE, "--data.answer=text", f"--trainer.default_root_dir={tmp_path / command}"]
        assert main([*args, f"--ckpt_path={checkpoint}"]) == 0
    network = StageModule.load_from_checkpoint(checkpoint).network.eval()
    tokenizer = load_tokenizer(TINY)
    examples = load_task("bbq", BBQ, 0).eval

    def token_logprobs(example, option: int) -> torch.Tensor:
        """Log-probabilities of an option's tokens, the sequence run alone with every position's logits."""
        ids, length = encode_option(tokenizer, example, option, 256)
        with torch.no_grad():
            logprobs = network(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return logprobs[torch.arange(len(ids) - length - 1, len(ids) - 1), torch.tensor(ids[-length:])]

    # the training loss: the mean over the batch's answer tokens, wherever each row's answer starts
    datamodule = StageDataModule(tasks={"bbq": BBQ}, mixture="bbq", model=TINY, steps=1, batch_size=4, answer="text")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert len(set((batch["targets"] >= 0).sum(1).tolist())) > 1  # answers of different lengths
    train = load_task("bbq", BBQ, 0).train
    drawn = [next(e for e in train if e.id == i) for i in datamodule.drawn_ids["bbq"]]
    by_ids = {tuple(encode_option(tokenizer, e, e.label, 256)[0]): e for e in drawn}
    pad = tokenizer.pad_token_id
    rows = [by_ids[tuple(t for t in row.tolist() if t != pad)] for row in batch["input_ids"]]
    expected = -torch.cat([token_logprobs(e, e.label) for e in rows]).mean()
    with torch.no_grad():
        assert answer_loss(network, batch).item() == pytest.approx(expected.item(), rel=1e-4)

    # validation and prediction: each option's log-probability per byte, as score_text(normalize="length")
    scores = score_text(network, tokenizer, examples, normalize="length", max_seq_len=256)
    predictions = pd.read_parquet(tmp_path / "predict" / "lightning_logs" / "version_0" / "predictions.parquet")
    mine = predictions.set_index("example_id").loc[[e.id for e in examples]]
    assert mine["pred"].tolist() == scores.pred.tolist()
    for ours, theirs in zip(mine["option_logprobs"], scores.option_logprobs):
        assert np.allclose(ours, theirs, atol=1e-4)
    labels = np.array([e.label for e in examples])
    validation = logged(tmp_path / "validate").iloc[-1]
    assert validation["val/acc"] == pytest.approx((scores.pred == labels).mean())
    losses = [-token_logprobs(e, e.label).mean().item() for e in examples]
    assert validation["val/loss"] == pytest.approx(np.mean(losses), rel=1e-4)


def test_fit_with_a_wandb_logger_saves_lightning_config_yaml_beside_wandbs_files(tmp_path):
    wandb = [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline=true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.project=fit-test",
    ]
    args = ["fit", *STAGE, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", *wandb]
    assert main(args) == 0 and main(args) == 0
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2  # two fits, two W&B runs
    for run in runs:
        saved = load_hparams_from_yaml(run / "files" / "lightning_config.yaml")
        assert saved["trainer"]["max_steps"] == 2 and saved["data"]["tasks"]["bbq"]["path"] == "tests/fixtures/bbq"
        assert not (run / "files" / "config.yaml").exists()  # W&B's own name, left to W&B
        config = wandb_summary(run)["config"]  # the W&B run's config: the full resolved one
        assert config["trainer"]["max_steps"] == 2 and config["data"]["tasks"]["bbq"]["path"] == "tests/fixtures/bbq"


def test_fit_starts_from_a_chains_last_stage(tmp_path, smoke_config):
    from dataclasses import replace

    from safetensors.torch import load_file

    from lightning_modules.chain import run_chain

    record = run_chain(replace(smoke_config, train=replace(smoke_config.train, steps=3)), progress=False)
    run_dir = Path(smoke_config.out) / record["run_name"]
    module = StageModule(model=smoke_config.model, init_from=str(run_dir), cache_dir=smoke_config.cache_dir)
    module.configure_model()
    expected = load_file(str(Path(smoke_config.cache_dir) / record["stages"][-1]["cache_key"] / "weights.safetensors"))
    for name, parameter in module.network.named_parameters():
        assert torch.equal(parameter.detach(), expected[name])
    with pytest.raises(ChainforgetError, match="no weights.safetensors"):
        StageModule(smoke_config.model, init_from="no-such-key", cache_dir=smoke_config.cache_dir).configure_model()


def test_fit_print_config_shows_the_stage_length_on_the_trainer(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", *STAGE, "--trainer.max_steps=7", "--print_config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    trainer_section = out.split("\ntrainer:")[1].split("\nmodel:")[0]
    model_section = out.split("\nmodel:")[1].split("\ndata:")[0]
    data_section = out.split("\ndata:")[1].split("\noptimizer:")[0]
    assert "\n  max_steps: 7\n" in trainer_section
    assert "steps:" not in data_section  # it follows trainer.max_steps
    assert "class_path" not in model_section  # the stage module is fixed, its arguments are top-level keys
    assert "class_path: lightning_modules.checkpoint.SafetensorsCheckpointIO" in out  # checkpoints never pickle
    assert "mixture: bbq" in out and "lr: 0.003" in out and "name: tiny" in out


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_eval_commands_offer_lightnings_flags(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chainforget [options] {command}")
    assert "--ckpt_path" in out and "--trainer.limit_val_batches" in out and "--data.mixture" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.max_steps=0"], "trainer.max_steps: 0 is not allowed; use a positive integer"),
        (["--trainer.max_steps=-1"], "trainer.max_steps: -1 is not allowed; use a positive integer"),
        (["--trainer.max_steps=null"], 'Parser key "trainer.max_steps"'),
        (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches: 0 is not allowed"),
        (["--data.steps=5"], 'Linked "data.steps" must be given via "trainer.max_steps"'),
        (["--optimizer=NoSuchOptimizer"], "NoSuchOptimizer"),
        (["--data.batch_size=0"], "data.batch_size: 0 is not allowed; use an integer >= 1"),
        (["--data.max_seq_len=2"], "data.max_seq_len: 2 is not allowed; use an integer >= 8"),
        (
            ["--data.mixture=csqa"],
            "data.mixture: 'csqa' names task 'csqa', which is not under data.tasks (configured: bbq)",
        ),
    ],
)
def test_bad_stage_input_prints_one_line_and_exits_2(args, message, capsys, tmp_path):
    assert main(["fit", *STAGE, f"--trainer.default_root_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_fit_and_chain_share_one_set_of_stage_defaults():
    import inspect
    from dataclasses import fields

    from chainforget.config import TrainSpec

    defaults = {f.name: f.default for f in fields(TrainSpec)}
    shared = 0
    for cls in (StageModule, StageDataModule):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name in defaults:
                assert parameter.default == defaults[name], f"{cls.__name__}.{name}"
                shared += 1
    assert (
        shared == 11
    )  # lr, warmup_ratio, weight_decay, attention, compile, gradient_checkpointing; batch_size, steps,
    # max_seq_len, bucket, answer
