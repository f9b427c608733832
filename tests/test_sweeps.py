"""W&B sweep YAMLs driven without a server by W&B's own engine and agent argument expansion."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from chainforget.cli import main
from chainforget.errors import ConfigError
from lightning_modules.sweeps import agent_command, load_sweep, wandb_local


def sweep_file(tmp_path, method: str, parameters: dict, metric: str) -> Path:
    command = ["chainforget", "chain", "--config", str(ROOT / "sweeps/configs/smoke.yaml"), "--run_name=null",
               f"--out={tmp_path / 'runs'}", f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}",
               f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}", "--train.steps=4", "--eval.bootstrap=50", "${args}"]  # fmt: skip
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"program": "chainforget", "method": method, "metric": {"name": metric, "goal": "minimize"},
                                    "parameters": parameters, "command": command}))  # fmt: skip
    return path


def test_agent_command_expands_args_like_wandb_agent():
    sweep = {"command": ["${env}", "chainforget", "chain", "--config", "c.yaml", "${args}"]}
    command = agent_command(sweep, {"order": {"value": ["csqa", "bbq"]}, "train.lr": {"value": 0.001}})
    assert command == ["/usr/bin/env", "chainforget", "chain", "--config", "c.yaml", "--order=['csqa', 'bbq']", "--train.lr=0.001"]


def test_shipped_sweeps_validate_and_their_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    from chainforget.cli import parse_chain

    for path in sorted((ROOT / "sweeps" / "wandb").glob("*.yaml")):
        sweep = load_sweep(path)
        first = {name: {"value": spec["values"][0] if "values" in spec else spec["min"]} for name, spec in sweep["parameters"].items()}
        command = agent_command(sweep, first)
        config = parse_chain(command[command.index("chain") + 1 :], "test")
        assert config.run_name is None  # each sweep run gets its own directory


def test_grid_sweep_runs_every_point_once_as_offline_runs(tmp_path):
    path = sweep_file(tmp_path, "grid", {"order": {"values": [["bbq", "csqa"], ["csqa", "bbq"]]}}, "cl/forgetting")
    results = wandb_local(path, sweep_id="grid-test")
    assert [r["parameters"]["order"]["value"] for r in results] == [["bbq", "csqa"], ["csqa", "bbq"]]
    assert all(r["returncode"] == 0 and r["objective"] is not None for r in results)
    for result in results:
        run_dir = Path(result["run_dir"])
        assert run_dir.name == result["run_id"] and (run_dir / "run.json").exists()
        (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
        assert offline.name.endswith(result["run_id"])  # the agent's run id is the W&B run id


def test_bayes_sweep_feeds_objectives_back_and_needs_a_count(tmp_path, capsys):
    path = sweep_file(tmp_path, "bayes", {"train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}, "forgetting/bbq")
    with pytest.raises(ConfigError, match="pass --count N"):
        wandb_local(path)
    assert main(["sweep", "wandb-local", str(path), "--count", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("objective" in line for line in lines)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("method: grid\nparameters: {x: {valuez: [1]}}\ncommand: [chainforget]\n", "invalid sweep"),
        ("method: grid\nparameters: {x: {values: [1]}}\n", "command: missing"),
        ("- not a mapping\n", "a sweep file is a mapping"),
        ("method: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["sweep", "wandb-local", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_metric_missing_from_the_summary_is_reported(tmp_path):
    path = sweep_file(tmp_path, "grid", {"order": {"values": [["bbq", "csqa"]]}}, "forgetting/nonexistent")
    with pytest.raises(ConfigError, match="metric.name 'forgetting/nonexistent' is not in the run's summary"):
        wandb_local(path)
