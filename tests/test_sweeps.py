"""W&B sweep YAMLs: run by W&B's own agent code, and without a server by W&B's own engine."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, wandb_run_record, wandb_summary

from chainforget.cli import main
from chainforget.errors import ConfigError
from lightning_modules.search import agent_command, load_sweep, wandb_local


def sweep_file(tmp_path, method: str, parameters: dict, metric: str) -> Path:
    command = [
        "chainforget",
        "chain",
        "--config",
        str(ROOT / "sweeps/configs/smoke.yaml"),
        "--run_name=null",
        f"--out={tmp_path / 'runs'}",
        f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}",
        f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}",
        "--train.steps=4",
        "--eval.bootstrap=50",
        "${args}",
    ]
    path = tmp_path / f"{method}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "program": "chainforget",
                "method": method,
                "metric": {"name": metric, "goal": "minimize"},
                "parameters": parameters,
                "command": command,
            }
        )
    )
    return path


def test_agent_command_expands_args_like_wandb_agent():
    sweep = {"command": ["${env}", "chainforget", "chain", "--config", "c.yaml", "${args}"]}
    command = agent_command(sweep, {"order": {"value": ["csqa", "bbq"]}, "train.lr": {"value": 0.001}})
    assert command == [
        "/usr/bin/env",
        "chainforget",
        "chain",
        "--config",
        "c.yaml",
        "--order=['csqa', 'bbq']",
        "--train.lr=0.001",
    ]


def test_shipped_sweeps_validate_and_every_point_parses(monkeypatch):
    monkeypatch.chdir(ROOT)
    from chainforget.config import parse_chain

    paths = sorted((ROOT / "sweeps" / "wandb").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"order", "lr", "replay", "mitigation_bayes"}
    for path in paths:
        sweep = load_sweep(path)
        choices = {name: spec.get("values") or [spec["min"], spec["max"]] for name, spec in sweep["parameters"].items()}
        for name, values in choices.items():
            for value in values:
                command = agent_command(sweep, {name: {"value": value}})
                config = parse_chain(command[command.index("chain") + 1 :], "test")
                assert config.run_name is None  # each sweep run gets its own directory
                assert config.wandb.mode is None  # W&B's own mode: a run under `wandb agent` reports to its sweep
                field, _, key = name.partition(".")
                assert (getattr(getattr(config, field), key) if key else getattr(config, field)) == value


def test_a_run_started_by_wandb_agent_reports_to_its_sweep(tmp_path, monkeypatch):
    """W&B's own agent code builds the command and environment (as for a sweep fetched from a server); the
    offline run it leaves, read back by wandb's own reader, belongs to the sweep's project, entity and id."""
    from wandb import env as wandb_env
    from wandb.wandb_agent import Agent

    monkeypatch.chdir(tmp_path)
    for name in (
        "WANDB_DIR",
        "WANDB_RUN_ID",
        "WANDB_SWEEP_ID",
        "WANDB_SWEEP_PARAM_PATH",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
    ):
        monkeypatch.setenv(name, "")  # recorded, so that what the agent sets in this process is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no server here: the run stays on disk
    sweep = yaml.safe_load(
        sweep_file(tmp_path, "grid", {"train.lr": {"values": [0.002]}}, "forgetting/bbq").read_text()
    )
    wandb_env.set_project("sweep-project")  # what `wandb agent entity/project/id` does before it starts runs
    wandb_env.set_entity("someone")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abcd1234")
    agent = Agent(api=None, queue=None, sweep_id="abcd1234")
    agent._sweep_command = sweep["command"]
    agent._command_run({"run_id": "agentrun1", "program": sweep["program"], "args": {"train.lr": {"value": 0.002}}})
    assert agent._run_processes["agentrun1"].wait() == 0

    run_dir = tmp_path / "runs" / "agentrun1"  # the run directory is named by the agent's run id
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    record = wandb_run_record(offline)
    assert (record["project"], record["entity"], record["sweep_id"], record["run_id"]) == (
        "sweep-project",
        "someone",
        "abcd1234",
        "agentrun1",
    )
    assert record["config"]["update"]["train"]["lr"] == 0.002
    logged = wandb_summary(offline)
    assert logged["state"] == "finished"
    summary = json.loads((run_dir / "run.json").read_text())
    bbq_last = next(
        r["acc"] for r in summary["eval"] if r["task"] == "bbq" and r["stage"] == 2 and r["group_kind"] == "all"
    )
    assert logged["summary"]["final/bbq/acc"] == pytest.approx(100 * bbq_last)  # percentage points, like forgetting/*
    assert logged["summary"]["forgetting/bbq"] == pytest.approx(summary["metrics"]["forgetting"][0]["F"])


def test_grid_sweep_runs_every_point_once_as_offline_runs(tmp_path):
    path = sweep_file(tmp_path, "grid", {"order": {"values": [["bbq", "csqa"], ["csqa", "bbq"]]}}, "forgetting/bbq")
    results = wandb_local(path, sweep_id="grid-test")
    assert [r["parameters"]["order"]["value"] for r in results] == [["bbq", "csqa"], ["csqa", "bbq"]]
    assert all(r["returncode"] == 0 for r in results)
    # csqa -> bbq never trains bbq before another stage: like W&B's controller, the sweep records it and goes on
    assert results[0]["objective"] is not None and results[1]["objective"] is None
    for result in results:
        run_dir = Path(result["run_dir"])
        assert run_dir.name == result["run_id"] and (run_dir / "run.json").exists()
        (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
        record = wandb_run_record(offline)
        assert record["run_id"] == result["run_id"]  # the agent's run id is the W&B run id
        # no server knows a local sweep: no sweep id (`wandb sync` would look for it), the sweep's name as group
        assert "sweep_id" not in record and record["run_group"] == "grid-test"
        assert record["project"] == "chainforget-smoke"  # the chain config's project, not the folder's name
    assert wandb_local(path, sweep_id="grid-test") == []  # the same sweep again: every grid point is done


def test_a_killed_local_sweep_continues_where_it_stopped(tmp_path):
    path = sweep_file(tmp_path, "grid", {"train.lr": {"values": [0.001, 0.002]}}, "forgetting/bbq")
    (first,) = wandb_local(path, count=1)
    state_file = tmp_path / "runs" / "sweeps" / "grid.json"
    state = json.loads(state_file.read_text())
    state["runs"][0]["state"] = "running"  # as left by a sweep process killed during its run
    state_file.write_text(json.dumps(state))
    again, last = wandb_local(path)
    assert again["run_id"] == first["run_id"] and again["objective"] == first["objective"]  # rerun under its id
    assert last["parameters"]["train.lr"]["value"] == 0.002
    path.write_text(path.read_text().replace("0.002", "0.003"))
    with pytest.raises(ConfigError, match="ran with a different sweep file; pass --sweep-id NEW"):
        wandb_local(path)


def test_bayes_sweep_feeds_objectives_back_and_needs_a_count(tmp_path, capsys):
    path = sweep_file(
        tmp_path,
        "bayes",
        {"train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
        "forgetting/bbq",
    )
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


def test_a_metric_missing_from_every_summary_is_said_and_the_sweep_goes_on(tmp_path, capsys):
    path = sweep_file(tmp_path, "grid", {"order": {"values": [["bbq", "csqa"]]}}, "forgetting/nonexistent")
    (result,) = wandb_local(path)
    assert result["returncode"] == 0 and result["objective"] is None
    assert "its summary has no 'forgetting/nonexistent'" in capsys.readouterr().err


def test_a_sweep_whose_program_is_not_on_path_stops_before_any_run(tmp_path, monkeypatch):
    path = sweep_file(tmp_path, "grid", {"train.lr": {"values": [0.001]}}, "forgetting/bbq")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # e.g. the environment was not activated
    with pytest.raises(ConfigError, match="command 'chainforget' is not on PATH; activate the environment"):
        wandb_local(path)
    assert not (tmp_path / "runs").exists()
