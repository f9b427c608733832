import os
from pathlib import Path

import pytest

from chainforget.cli import main
from chainforget.config import parse_chain

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
        (
            ["chain", "--config", SMOKE, "--model.name=./no-model-here"],
            "model.name './no-model-here': no such directory",
        ),
        (
            ["chain", "--config", SMOKE, "--mitigation.name=l2sp", "--mitigation.strength=-1"],
            "mitigation.strength: penalty weight -1.0 is not allowed for l2sp; use 0 <= lambda",
        ),
        (
            ["chain", "--config", SMOKE, "--mitigation.name=replay_stage", "--mitigation.strength=1.5"],
            "replay ratio 1.5 is not allowed",
        ),
        (
            ["chain", "--config", SMOKE, "--mitigation.name=ewc", "--mitigation.strength=nan"],
            'Parser key "mitigation.strength"',
        ),
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
    code = main(
        [
            "chain",
            "--config",
            SMOKE,
            f"--out={tmp_path}",
            "--order=[csqa,bbq]",
            "--run_name=swapped",
            f"--cache_dir={tmp_path / 'cache'}",
            "--train.steps=5",
        ]
    )
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


@pytest.mark.parametrize(("given", "expected"), [(None, "256"), ("32", "32")])
def test_the_command_caps_onednns_kernel_cache_unless_the_user_set_it(given, expected, monkeypatch, capsys):
    if given is None:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", given)
    assert main(["tasks"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == expected
