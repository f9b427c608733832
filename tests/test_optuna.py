"""Optuna studies over chains: SQLite by default, PostgreSQL for many workers, pruning from per-stage values."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, wandb_summary

from chainforget.cli import main
from chainforget.errors import ConfigError
from lightning_modules.search import load_study_spec, optuna_study

BASE = [str(ROOT / "sweeps/configs/smoke.yaml")]
OVERRIDES = [
    "--run_name=null",
    "--train.steps=3",
    "--eval.bootstrap=50",
    f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}",
    f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}",
]


def study_file(tmp_path, **fields) -> Path:
    spec = {"study_name": "s", "base": BASE, "overrides": OVERRIDES, "objectives": ["forgetting/bbq"], **fields}
    path = tmp_path / f"{spec['study_name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_study_on_sqlite_runs_each_point_and_logs_trial_params(tmp_path, capsys):
    path = study_file(
        tmp_path,
        study_name="grid",
        params={"train.lr": {"type": "categorical", "choices": [1e-3, 3e-3]}},
        sampler={"name": "grid"},
    )
    study = optuna_study(path, out=str(tmp_path / "runs"))
    assert sorted(t.params["train.lr"] for t in study.trials if t.state.name == "COMPLETE") == [1e-3, 3e-3]
    assert (tmp_path / "runs" / "optuna" / "grid.db").exists()
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[grid] ")]
    assert [line.split(",")[0] for line in progress] == ["[grid] 1/2 trials done", "[grid] 2/2 trials done"]
    assert "min left with 1 worker(s)" in progress[0]
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.name == f"grid-trial{trial.number}" and (run_dir / "run.json").exists()
        # offline runs keep their config in the run's transaction log until `wandb sync`
        (log,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        expected = {"study": "grid", "trial": trial.number, "params": trial.params}
        assert json.dumps(expected, separators=(",", ":")).encode() in log.read_bytes()
        assert trial.intermediate_values == {}  # forgetting first exists at the last stage: nothing to prune on


def test_a_config_param_gives_each_trial_its_preset_of_settings_that_belong_together(tmp_path):
    presets = []
    for name, text in (
        ("letter", "train: {answer: letter}\neval: {mode: letter}\n"),
        ("text", "train: {answer: text}\neval: {mode: text_norm}\n"),
    ):
        presets.append(str(tmp_path / f"{name}.yaml"))
        Path(presets[-1]).write_text(text)
    path = study_file(
        tmp_path,
        study_name="presets",
        objectives=["cl/learning"],
        directions=["maximize"],
        params={
            "config": {"type": "categorical", "choices": presets},
            "order": {"type": "categorical", "choices": ["bbq"]},
        },
        sampler={"name": "grid"},
    )
    study = optuna_study(path, out=str(tmp_path / "runs"))
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["config"] for t in trials) == sorted(presets)
    for trial in trials:
        record = json.loads((Path(trial.user_attrs["run_dir"]) / "run.json").read_text())
        preset = Path(trial.params["config"]).stem
        assert (record["config"]["train"]["answer"], record["config"]["eval"]["mode"]) == (
            preset,
            "letter" if preset == "letter" else "text_norm",
        )
        (learning,) = record["metrics"]["learning"]
        assert trial.values == [pytest.approx(learning["learned"])]


def test_threshold_pruning_stops_a_chain_between_stages_and_never_after_the_last(tmp_path):
    three = study_file(
        tmp_path,
        study_name="pruned",
        overrides=[*OVERRIDES, "--order=[bbq,csqa,csqa]"],
        params={"train.lr": {"type": "float", "low": 1e-3, "high": 2e-3}},
        pruner={"name": "threshold", "upper": -1000.0},
        n_trials=1,
    )
    study = optuna_study(three, out=str(tmp_path / "runs"))
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [2]  # forgetting/bbq first exists after stage 2 of 3
    run_dir = tmp_path / "runs" / "pruned-trial0"
    assert not (run_dir / "run.json").exists()
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    logged = wandb_summary(offline)
    assert (logged["state"], logged["exit_code"]) == ("finished", 0)  # pruned on purpose: not a failed W&B run
    assert logged["summary"]["stopped"] == "pruned after stage 2" and "stopped" in logged["tags"]

    two = study_file(
        tmp_path,
        study_name="finished",
        params={"train.lr": {"type": "float", "low": 1e-3, "high": 2e-3}},
        pruner={"name": "threshold", "upper": -1000.0},
        n_trials=1,
    )
    (trial,) = optuna_study(two, out=str(tmp_path / "runs")).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.intermediate_values == {}


def test_objectives_are_named_in_the_study(tmp_path):
    path = study_file(
        tmp_path,
        study_name="named",
        params={"train.lr": {"type": "categorical", "choices": [1e-3]}},
        sampler={"name": "grid"},
    )
    study = optuna_study(path, out=str(tmp_path / "runs"))
    assert study.metric_names == ["forgetting/bbq"]
    assert "value_forgetting/bbq" in study.trials_dataframe().columns


def test_multi_objective_study_prints_its_pareto_front(tmp_path, capsys):
    path = study_file(
        tmp_path,
        study_name="pareto",
        objectives=["forgetting/bbq", "final/csqa/acc"],
        directions=["minimize", "maximize"],
        sampler={"name": "random", "seed": 1},
        params={"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    )
    assert main(["sweep", "optuna", str(path), "--n-trials", "2", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "study pareto: 2 complete of 2 trials" in out and "values [" in out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"params": {"train.lr": {"type": "float", "low": 1.0}}}, "params.train.lr"),
        (
            {"params": {"x": {"type": "categorical", "choices": [1]}}, "sampler": {"name": "cmaes"}},
            "sampler.name 'cmaes'",
        ),
        ({"params": {"x": {"type": "categorical", "choices": [1]}}, "directions": ["down"]}, "directions ['down']"),
        ({"params": {"x": {"type": "categorical", "choices": [1]}}, "trials": 3}, "field 'trials' is unknown"),
    ],
)
def test_bad_study_files(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study_spec(study_file(tmp_path, **fields))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a local port (Debian's postgresql package; .ci/run installs it)."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb) not found; install Debian's postgresql package")
    bin_dir = Path(initdb).resolve().parent
    data = Path(tempfile.mkdtemp(prefix="chainforget-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        data.chmod(0o755)
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(
            [*as_postgres, str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *as_postgres,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data / "db"),
                "-l",
                str(data / "log"),
                "-w",
                "start",
                "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start a local PostgreSQL server: {exc}")
    subprocess.run(
        [
            *as_postgres,
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-c",
            "CREATE DATABASE studies",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql://postgres@127.0.0.1:{port}/studies"
    subprocess.run(
        [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"], capture_output=True
    )
    shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_postgresql_grid_and_run_every_point_once(tmp_path, postgres_url):
    choices = [1e-3, 2e-3, 3e-3, 4e-3]
    path = study_file(
        tmp_path,
        study_name="shared-grid",
        params={"train.lr": {"type": "categorical", "choices": choices}},
        sampler={"name": "grid"},
    )
    command = [
        sys.executable,
        "-m",
        "chainforget.cli",
        "sweep",
        "optuna",
        str(path),
        "--storage",
        postgres_url,
        "--out",
        str(tmp_path / "runs"),
    ]
    env = dict(os.environ, CHAINFORGET_THREADS="1")
    workers = [subprocess.Popen(command, env=env, cwd=ROOT) for _ in range(2)]
    assert [worker.wait(timeout=600) for worker in workers] == [0, 0]
    study = optuna.load_study(study_name="shared-grid", storage=postgres_url)
    complete = [t.params["train.lr"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == choices  # every grid point exactly once
    skipped = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all("duplicate_of" in t.user_attrs for t in skipped)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])  # an RDB's heartbeats are Optuna's, a journal's our own
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried_until_the_study_completes(tmp_path, kind):
    choices = [1e-3, 2e-3]
    path = study_file(
        tmp_path,
        study_name="killed",
        params={"train.lr": {"type": "categorical", "choices": choices}},
        sampler={"name": "grid"},
        heartbeat={"interval": 1, "grace_period": 3, "max_retry": 2},
    )
    storage = f"sqlite:///{tmp_path / 'killed.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 'killed.log'}"
    worker = ["sweep", "optuna", str(path), "--storage", storage, "--out", str(tmp_path / "runs")]
    every_step = tmp_path / "checkpoint_every_step.yaml"  # a checkpoint before the kill at step 2
    every_step.write_text("trainer: {checkpoint_every: 1}\n")
    env = dict(os.environ, CHAINFORGET_THREADS="1", PYTHONPATH=str(ROOT))
    # the first worker dies with SIGKILL in its first trial's second training step
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "faults.py"), "train_step", "2", *worker, "--config", str(every_step)],
        env=env,
        cwd=ROOT,
    )
    assert killed.returncode == -9
    (stuck,) = stored_study(storage, "killed").trials
    assert stuck.state == optuna.trial.TrialState.RUNNING  # nobody told the storage
    time.sleep(4)  # past the grace period: its heartbeat is stale
    survivor = subprocess.run(
        [sys.executable, "-m", "chainforget.cli", *worker, "--config", str(every_step)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert survivor.returncode == 0, survivor.stderr[-2000:]
    # the retry ran in the first attempt's run directory and resumed its stage from the checkpoint left there
    assert "stage 1 resumes from its checkpoint" in survivor.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["killed-trial0", "killed-trial2"]
    trials = stored_study(storage, "killed").trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == trials[0].params
    complete = sorted(t.params["train.lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert complete == choices  # the study completed: every grid point ran, the killed one again


def stored_study(url: str, name: str):
    """A study read back through the storage the workers used (an RDB URL or a journal file)."""
    from lightning_modules.search import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(url))


def test_two_workers_share_one_journal_file_and_run_every_grid_point_once(tmp_path):
    """A study across machines with no database server: Optuna's journal file on a shared filesystem."""
    choices = [1e-3, 2e-3, 3e-3, 4e-3]
    path = study_file(
        tmp_path,
        study_name="journal-grid",
        params={"train.lr": {"type": "categorical", "choices": choices}},
        sampler={"name": "grid"},
    )
    url = f"journal:///{tmp_path / 'journal-grid.log'}"
    command = [sys.executable, "-m", "chainforget.cli", "sweep", "optuna", str(path), "--storage", url]
    env = dict(os.environ, CHAINFORGET_THREADS="1")
    workers = [subprocess.Popen([*command, "--out", str(tmp_path / "runs")], env=env, cwd=ROOT) for _ in range(2)]
    assert [worker.wait(timeout=600) for worker in workers] == [0, 0]
    study = stored_study(url, "journal-grid")
    complete = [t.params["train.lr"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == choices  # every grid point exactly once
    assert all("duplicate_of" in t.user_attrs for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert all("heartbeat_at" in t.user_attrs for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def test_a_journal_file_in_a_folder_that_does_not_exist_is_refused(tmp_path, capsys):
    path = study_file(tmp_path, params={"seed": {"type": "categorical", "choices": [0]}}, sampler={"name": "grid"})
    code = main(["sweep", "optuna", str(path), "--storage", f"journal:///{tmp_path / 'no' / 's.log'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "for the journal file; create it or correct the path" in err[0]
    assert not (tmp_path / "no").exists()


def test_a_worker_that_loses_the_race_to_create_a_sqlite_study_retries(tmp_path, monkeypatch):
    from optuna import storages
    from sqlalchemy.exc import OperationalError

    from lightning_modules import search

    real, calls = storages.RDBStorage, []

    def racing(url, **kwargs):  # the first attempt meets the schema another worker is creating
        calls.append(url)
        if len(calls) == 1:
            raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(storages, "RDBStorage", racing)
    monkeypatch.setattr(search.time, "sleep", lambda seconds: None)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    assert isinstance(search.make_storage(url), real) and len(calls) == 2

    def unreadable(url, **kwargs):
        raise OperationalError("connect", {}, Exception("unable to open database file"))

    monkeypatch.setattr(storages, "RDBStorage", unreadable)
    with pytest.raises(ConfigError, match="cannot open the study storage .*unable to open database file"):
        search.make_storage(url)


def test_the_slurm_array_payload_runs_one_trial_per_task_of_a_study_on_a_journal_file(tmp_path):
    """sweeps/slurm/optuna_worker.sbatch run as SLURM runs it (no scheduler here): bash with the array's
    environment, each task one worker with one trial; the tasks together complete the grid, each point once."""
    choices = [1e-3, 2e-3]
    path = study_file(
        tmp_path,
        study_name="array",
        params={"train.lr": {"type": "categorical", "choices": choices}},
        sampler={"name": "grid"},
    )
    url = f"journal:///{tmp_path / 'array.log'}"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "STUDY": str(path), "STORAGE": url}
    env |= {"OUT": str(tmp_path / "runs"), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "1"}
    env |= {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}
    script = ROOT / "sweeps" / "slurm" / "optuna_worker.sbatch"
    tasks = [
        subprocess.run(
            ["bash", str(script)], env=env | {"SLURM_ARRAY_TASK_ID": str(task)}, cwd=tmp_path, capture_output=True
        )
        for task in range(3)  # one task more than the grid: it finds the grid done and exits cleanly
    ]
    assert [t.returncode for t in tasks] == [0, 0, 0], tasks[0].stderr[-2000:]
    assert b"array task 0 of job 4242 (restart 0) joins" in tasks[0].stderr
    study = stored_study(url, "array")
    complete = [t.params["train.lr"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == choices
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["array-trial0", "array-trial1"]
