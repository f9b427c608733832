from pathlib import Path

import pandas as pd
import pytest

from chainforget.cli import main, parse_chain
from chainforget.errors import ChainforgetError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "sweeps/configs/smoke.yaml"


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chain", "--config", "missing.yaml"], "--config missing.yaml: no such file"),
        (["chain", "--config", SMOKE, "--train.lr=-1"], "train.lr: -1.0 is not allowed"),
        (["chain", "--config", SMOKE, "--order=[bbq,arc]"], "names task 'arc', which is not under tasks"),
        (["chain", "--config", SMOKE, "--ordr=[bbq]"], "unrecognized arguments: --ordr"),
        (["chain", "--config", SMOKE, "--train.steps=many"], 'Parser key "train.steps"'),
        (["chain", "--config", SMOKE, "--tasks.bbq.max_eval=0"], "tasks.*.max_eval: 0 is not allowed"),
        (["chain", "--config", SMOKE, "--tasks.bbq.path=/nonexistent"], "/nonexistent: no such directory"),
        (["chain", "--config", SMOKE, "--model.name=./no-model-here"], "model.name './no-model-here': no such directory"),
        (["chain", "--config", SMOKE, "--mitigation.name=l2sp", "--mitigation.strength=-1"], "mitigation.strength: -1.0 is not allowed"),
        (["chain", "--config", SMOKE, "--mitigation.name=replay_stage", "--mitigation.strength=1.5"], "replay ratio 1.5 is not allowed"),
        (["chain", "--config", SMOKE, "--mitigation.name=ewc", "--mitigation.strength=nan"], 'Parser key "mitigation.strength"'),
        (["chain", "--config", SMOKE, "--mitigation.name=dropout"], "mitigation.name"),
        (["chain"], "--config: missing"),
        (["train"], "unknown command 'train'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message, capsys, tmp_path):
    code = main([*args, f"--out={tmp_path}"] if args[0] == "chain" and len(args) > 1 else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert message in err[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_chain_command_runs_overrides_and_prints_the_summary(capsys, tmp_path):
    code = main(["chain", "--config", SMOKE, f"--out={tmp_path}", "--order=[csqa,bbq]", "--run_name=swapped",
                 f"--cache_dir={tmp_path / 'cache'}", "--train.steps=5"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "csqa → bbq" in out and "Forgetting F" in out
    record = (tmp_path / "swapped" / "run.json").read_text()
    assert '"order": [\n      "csqa",\n      "bbq"\n    ]' in record
    assert '"steps": 5' in record


def test_mitigation_configs_combine_with_any_chain(tmp_path):
    for path in sorted((ROOT / "sweeps" / "configs" / "mitigations").glob("*.yaml")):
        config = parse_chain(["--config", SMOKE, "--config", str(path)], prog="test")
        assert config.order == ["bbq", "csqa"]
        assert config.mitigation.name == path.stem or (path.stem == "curvature" and config.curvature.enabled)


def test_fit_runs_one_stage_through_lightning_cli(tmp_path):
    code = main(["fit", "--config", "sweeps/configs/stage_smoke.yaml", f"--trainer.default_root_dir={tmp_path}",
                 "--data.steps=6", "--trainer.log_every_n_steps=2"])  # fmt: skip
    assert code == 0
    (metrics_csv,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    logged = pd.read_csv(metrics_csv)
    assert logged["step"].max() == 5  # data.steps is linked to trainer.max_steps
    assert logged["train/loss"].notna().sum() == 3
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").exists()


def test_fit_checkpoints_are_safetensors_and_ckpt_path_resumes_them(tmp_path):
    from lightning_modules.checkpoint import SafetensorsCheckpointIO

    args = ["fit", "--config", "sweeps/configs/stage_smoke.yaml", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_checkpointing=true"]  # fmt: skip
    assert main([*args, "--data.steps=4"]) == 0
    (first,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    header = int.from_bytes(first.read_bytes()[:8], "little")  # safetensors: a little-endian header length, then JSON
    assert first.read_bytes()[8 : 8 + header].startswith(b"{")
    assert SafetensorsCheckpointIO().load_checkpoint(first)["global_step"] == 4
    assert main([*args, "--data.steps=7", f"--ckpt_path={first}"]) == 0
    (resumed,) = tmp_path.glob("lightning_logs/version_1/checkpoints/*.ckpt")
    assert SafetensorsCheckpointIO().load_checkpoint(resumed)["global_step"] == 7  # continued from step 4


def test_fit_with_a_wandb_logger_pushes_the_config_and_runs_do_not_collide(tmp_path):
    args = ["fit", "--config", "sweeps/configs/stage_smoke.yaml", f"--trainer.default_root_dir={tmp_path}", "--data.steps=2",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline=true",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.project=fit-test"]  # fmt: skip
    assert main(args) == 0 and main(args) == 0
    logs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2  # two runs, two W&B runs
    assert b"tests/fixtures/bbq" in logs[0].read_bytes()  # the resolved data config reached the run's config
    assert len(list(tmp_path.glob("wandb/offline-run-*/files/config.yaml"))) == 2  # one per run, none overwritten


def test_fit_starts_from_a_chains_last_stage(tmp_path, smoke_config):
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from lightning_modules.chain import run_chain
    from lightning_modules.stage import StageModule

    record = run_chain(replace(smoke_config, train=replace(smoke_config.train, steps=3)), progress=False)
    run_dir = Path(smoke_config.out) / record["run_name"]
    module = StageModule(model=smoke_config.model, init_from=str(run_dir), cache_dir=smoke_config.cache_dir)
    module.configure_model()
    expected = load_file(str(Path(smoke_config.cache_dir) / record["stages"][-1]["cache_key"] / "weights.safetensors"))
    for name, parameter in module.network.named_parameters():
        assert torch.equal(parameter.detach(), expected[name])
    with pytest.raises(ChainforgetError, match="no weights.safetensors"):
        StageModule(model=smoke_config.model, init_from="no-such-key", cache_dir=smoke_config.cache_dir).configure_model()


def test_fit_print_config_shows_the_linked_stage(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "sweeps/configs/stage_smoke.yaml", "--print_config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    model_section = out.split("\nmodel:")[1].split("\ndata:")[0]
    assert "class_path" not in model_section  # the stage module is fixed, its arguments are top-level keys
    assert "class_path: lightning_modules.checkpoint.SafetensorsCheckpointIO" in out  # checkpoints never pickle
    assert "stage: bbq" in out and "lr: 0.003" in out and "name: tiny" in out


def test_tasks_command_lists_the_registry_and_a_chains_sizes(capsys):
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    for name in ("arc_challenge", "arc_easy", "bbq", "csqa", "csqa2", "saferdialogues", "toxigen"):
        assert name in listing
    assert main(["tasks", "--config", SMOKE]) == 0
    sizes = capsys.readouterr().out.splitlines()
    bbq = next(line for line in sizes if line.split()[0] == "bbq").split()
    assert bbq[1:5] == ["safety", "release", "24", "24"]
    assert "category: 2 (eval n 8-16)" in " ".join(bbq)


def test_no_cache_flag_maps_to_the_cache_field():
    assert parse_chain(["--config", SMOKE, "--no-cache"], prog="test").cache is False
    assert parse_chain(["--config", SMOKE], prog="test").cache is True
