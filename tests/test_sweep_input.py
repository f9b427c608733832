"""Bad Optuna study files, W&B sweep files and sweep flags: each is one line naming the file or flag, the key, the
value and what is allowed, exit code 2, before a study, storage, state file or run directory exists."""

import hashlib
import random
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_config_mutations import mutate

from chainforget.cli import main
from chainforget.errors import ConfigError

SMOKE = str(ROOT / "sweeps" / "configs" / "smoke.yaml")
DATA = [f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}", f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}"]
LR = {"type": "float", "low": 1e-3, "high": 2e-3}


def study(**fields) -> dict:
    spec = {
        "study_name": "s",
        "base": [SMOKE],
        "overrides": ["--run_name=null", "--train.steps=2", *DATA],
        "objectives": ["forgetting/bbq"],
        "params": {"train.lr": LR},
        "n_trials": 1,
    }
    return {**spec, **fields}


def sweep(**fields) -> dict:
    command = ["chainforget", "chain", "--config", SMOKE, "--run_name=null", "--out=runs", *DATA, "${args}"]
    spec = {"method": "grid", "parameters": {"train.lr": {"values": [1e-3]}}, "command": command}
    return {**spec, **fields}


STUDIES = [
    (
        "unknown param type",
        study(params={"train.lr": {**LR, "type": "uniform"}}),
        "params.train.lr: {'type': 'uniform'",
    ),
    ("low above high", study(params={"train.lr": {**LR, "low": 3e-3}}), "params.train.lr: low 0.003 > high 0.002"),
    (
        "log scale from zero",
        study(params={"train.lr": {**LR, "low": 0.0, "log": True}}),
        "params.train.lr.low: 0.0 is not allowed with log: true; use low > 0",
    ),
    (
        "zero step",
        study(params={"train.steps": {"type": "int", "low": 1, "high": 4, "step": 0}}),
        "params.train.steps.step: 0 is not allowed; use a step > 0",
    ),
    (
        "float bounds for an int",
        study(params={"train.steps": {"type": "int", "low": 1.5, "high": 4}}),
        "params.train.steps.low: 1.5 is not allowed; use an integer",
    ),
    ("NaN bound", study(params={"train.lr": {**LR, "high": float("nan")}}), "params.train.lr.high: nan is not allowed"),
    ("unknown param key", study(params={"train.lr": {**LR, "lo": 1}}), "params.train.lr.lo: unknown key"),
    (
        "empty choices",
        study(params={"seed": {"type": "categorical", "choices": []}}),
        "params.seed.choices: [] is not allowed; use a non-empty list",
    ),
    (
        "choices not a list",
        study(params={"seed": {"type": "categorical", "choices": 3}}),
        "params.seed.choices: 3 is not allowed",
    ),
    (
        "a list among the choices",
        study(params={"seed": {"type": "categorical", "choices": [1, [2], {"a": 1}]}}),
        "params.seed.choices[1]: [2] is not allowed; use null, true, false, a finite number or a string",
    ),
    (
        "a choice given twice",
        study(params={"seed": {"type": "categorical", "choices": [1, 2, 1]}}),
        "params.seed.choices[2]: 1 is given twice",
    ),
    (
        "a choice of the wrong type for its key",
        study(params={"train.lr": {"type": "categorical", "choices": [1e-3, "fast"]}}),
        "params.train.lr.choices[1]: with train.lr = 'fast' the chain config is refused: Parser key \"train.lr\"",
    ),
    (
        "a choice outside its key's range",
        study(params={"train.steps": {"type": "categorical", "choices": [2, 0]}}),
        "params.train.steps.choices[1]: 0 is not allowed; use an integer >= 1",
    ),
    (
        "a bound outside its key's range",
        study(params={"train.lr": {**LR, "low": -1}}),
        "params.train.lr.low: -1.0 is not allowed; use a finite number > 0.0",
    ),
    (
        "a misspelt key",
        study(params={"train.lrr": LR}),
        "params.train.lrr: unknown key; the keys of train are steps, batch_size, lr,",
    ),
    ("a block for a key", study(params={"train": LR}), "params.train: a block of settings; name one of train.steps"),
    (
        "unknown sampler option",
        study(sampler={"name": "tpe", "n_startup": 3}),
        "sampler.n_startup: unknown option of TPESampler; use consider_prior",
    ),
    (
        "sampler option of the wrong type",
        study(sampler={"name": "tpe", "n_startup_trials": "ten"}),
        "sampler.n_startup_trials: 'ten' is not allowed; use an integer >= 0",
    ),
    (
        "sampler option taking a Python object",
        study(sampler={"name": "tpe", "gamma": 0.1}),
        "sampler.gamma: unknown option of TPESampler",
    ),
    (
        "sampler option Optuna refuses",
        study(sampler={"name": "nsga2", "population_size": 1}),
        "sampler: `population_size` must be greater than or equal to 2",
    ),
    ("sampler not a mapping", study(sampler="tpe"), "sampler: 'tpe' is not allowed; use a mapping"),
    ("grid over a float range", study(sampler={"name": "grid"}), "sampler grid needs every param to be categorical"),
    (
        "unknown pruner option",
        study(pruner={"name": "median", "warmup": 3}),
        "pruner.warmup: unknown option of MedianPruner; use n_startup_trials, n_warmup_steps",
    ),
    ("negative pruner count", study(pruner={"name": "median", "n_startup_trials": -1}), "pruner.n_startup_trials: -1"),
    ("threshold pruner without a threshold", study(pruner={"name": "threshold"}), "pruner: Either lower or upper"),
    (
        "pruner on two objectives",
        study(pruner={"name": "median"}, objectives=["a", "b"], directions=["minimize", "maximize"]),
        "pruner 'median': Optuna prunes single-objective studies only",
    ),
    ("zero trials", study(n_trials=0), "n_trials: 0 is not allowed; use a positive integer"),
    ("fractional trials", study(n_trials=2.5), "n_trials: 2.5 is not allowed"),
    ("directions not one per objective", study(directions=["minimize", "maximize"]), "one per objective"),
    ("unknown top-level key", study(trials=3), "field 'trials' is unknown"),
    ("base file missing", study(base=["/no/such.yaml"]), "base: /no/such.yaml: no such chain config file"),
    ("study name with a slash", study(study_name="a/b"), "study_name: 'a/b' is not allowed"),
    ("zero heartbeat", study(heartbeat={"interval": 0}), "heartbeat.interval: 0 is not allowed; use an integer >= 1"),
]

SWEEPS = [
    (
        "misspelt parameter",
        sweep(parameters={"train.lrr": {"values": [1e-3]}}),
        "parameters.train.lrr: unknown key; the keys of train are",
    ),
    (
        "a value outside its key's range",
        sweep(parameters={"train.lr": {"values": [1e-3, -1]}}),
        "parameters.train.lr.values[1]: -1.0 is not allowed; use a finite number > 0.0",
    ),
    (
        "a value of the wrong type",
        sweep(parameters={"train.steps": {"values": [2, "x"]}}),
        "parameters.train.steps.values[1]: with train.steps = 'x' the chain config is refused",
    ),
    (
        "a distribution reaching outside its key's range",
        sweep(method="random", parameters={"train.warmup_ratio": {"min": 0.5, "max": 1.0}}),
        "parameters.train.warmup_ratio.max: 1.0 is not allowed; use a finite number >= 0.0 and < 1.0",
    ),
    (
        "min above max",
        sweep(method="random", parameters={"train.lr": {"min": 0.5, "max": 0.1}}),
        "invalid sweep: parameters.train.lr: {'min': 0.5, 'max': 0.1} is not allowed (train.lr: min 0.5 is not less",
    ),
    (
        "a log scale from zero",
        sweep(method="random", parameters={"train.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}}),
        "invalid sweep: parameters.train.lr:",
    ),
    ("empty values", sweep(parameters={"train.lr": {"values": []}}), "invalid sweep: parameters.train.lr: {'values'"),
    ("unknown top-level key", sweep(bogus=1), "invalid sweep: Additional properties are not allowed ('bogus'"),
    ("a command without ${args}", sweep(command=["chainforget", "chain"]), "command: ['chainforget', 'chain'] is not"),
    (
        "a config file that is missing",
        sweep(command=["chainforget", "chain", "--config", "/no/such.yaml", "${args}"]),
        "command: --config /no/such.yaml: no such file",
    ),
    (
        "one run directory for every run",
        sweep(command=["chainforget", "chain", "--config", SMOKE, "--out=runs", "${args}"]),
        "its chain config sets run_name 'smoke', so every run would write to runs/smoke",
    ),
    ("bayes without a metric", sweep(method="bayes"), "metric: missing; method bayes needs"),
    (
        "nested parameters",
        sweep(parameters={"train.lr": {"parameters": {"x": {"values": [1]}}}}),
        "parameters.train.lr: nested parameters are not allowed",
    ),
]

FLAGS = [
    ("zero trials", ["optuna", "{study}", "--n-trials", "0"], "argument --n-trials: 0 is not allowed"),
    ("storage scheme", ["optuna", "{study}", "--storage", "redis://host"], "--storage redis://host: not allowed"),
    ("storage path", ["optuna", "{study}", "--storage", "runs/s.db"], "--storage runs/s.db: not allowed"),
    ("in-memory storage", ["optuna", "{study}", "--storage", "sqlite://"], "an in-memory database ends"),
    ("missing extra config", ["optuna", "{study}", "--config", "no.yaml"], "--config: no.yaml: no such chain config"),
    ("unknown flag", ["optuna", "{study}", "--trials", "3"], "unrecognized arguments: --trials 3"),
    ("zero runs", ["wandb-local", "{sweep}", "--count", "0"], "argument --count: 0 is not allowed"),
    ("sweep id with a slash", ["wandb-local", "{sweep}", "--sweep-id", "../x"], "--sweep-id ../x: '../x' is not"),
]


def fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(argv: list[str], root: Path, capsys) -> str:
    """The one line ``chainforget sweep ARGV`` prints, having exited 2 and left ``root`` as it was."""
    before = fingerprint(root)
    code = main(["sweep", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert fingerprint(root) == before and sorted(p.name for p in root.iterdir()) == ["spec.yaml"]
    return err[0]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default storage and run directories are relative: they would land here
    return tmp_path


@pytest.mark.parametrize(("name", "spec", "message"), STUDIES, ids=[case[0] for case in STUDIES])
def test_a_bad_study_file_is_one_line_before_anything_exists(name, spec, message, workdir, capsys):
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    line = refused(["optuna", "spec.yaml"], workdir, capsys)
    assert line.startswith("chainforget sweep: error: spec.yaml: ") and message in line, line


@pytest.mark.parametrize(("name", "spec", "message"), SWEEPS, ids=[case[0] for case in SWEEPS])
def test_a_bad_sweep_file_is_one_line_before_anything_exists(name, spec, message, workdir, capsys):
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    line = refused(["wandb-local", "spec.yaml", "--count", "1"], workdir, capsys)
    assert line.startswith("chainforget sweep: error: spec.yaml: ") and message in line, line


@pytest.mark.parametrize(("name", "argv", "message"), FLAGS, ids=[case[0] for case in FLAGS])
def test_a_bad_sweep_flag_is_one_line_before_anything_exists(name, argv, message, workdir, capsys):
    spec = study() if argv[0] == "optuna" else sweep()
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    line = refused([arg.format(study="spec.yaml", sweep="spec.yaml") for arg in argv], workdir, capsys)
    assert message in line, line


def test_the_shipped_studies_and_sweeps_pass_every_check(monkeypatch):
    from lightning_modules.search import load_study_spec, load_sweep

    monkeypatch.chdir(ROOT)
    studies, sweeps = sorted(ROOT.glob("sweeps/optuna/*.yaml")), sorted(ROOT.glob("sweeps/wandb/*.yaml"))
    assert len(studies) >= 8 and len(sweeps) >= 4  # the shipped files, found (an empty loop checks nothing)
    for path in studies:
        load_study_spec(path.relative_to(ROOT))
    for path in sweeps:
        load_sweep(path.relative_to(ROOT))


def test_mutated_study_and_sweep_files_pass_or_are_refused_in_one_line(workdir):
    """The chain config mutations (tests/test_config_mutations.py) applied to a study and a sweep using every kind
    of entry: each file loads or is one ConfigError line; any other exception fails the test with its traceback."""
    from lightning_modules.search import load_study_spec, load_sweep

    valid = {
        load_study_spec: study(
            params={
                "train.lr": {**LR, "log": True},
                "train.steps": {"type": "int", "low": 1, "high": 4, "step": 1},
                "seed": {"type": "categorical", "choices": [0, 1]},
            },
            sampler={"name": "tpe", "seed": 0, "n_startup_trials": 3},
            pruner={"name": "median", "n_warmup_steps": 1},
            heartbeat={"interval": 5},
        ),
        load_sweep: sweep(
            method="random",
            metric={"name": "forgetting/bbq", "goal": "minimize"},
            parameters={
                "train.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                "train.steps": {"min": 1, "max": 4},
                "seed": {"values": [0, 1]},
            },
        ),
    }
    rng, refused = random.Random(18), 0
    for _ in range(200):
        load = rng.choice(list(valid))
        tree, what = mutate(valid[load], rng)
        (workdir / "spec.yaml").write_text(yaml.safe_dump(tree))
        try:
            load(Path("spec.yaml"))
        except ConfigError as exc:
            refused += 1
            assert "\n" not in str(exc), what
    assert 100 < refused < 200
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


def test_a_sqlite_storage_in_a_missing_folder_is_refused_and_makes_no_folder(tmp_path, capsys):
    from chainforget.cli import main

    missing = tmp_path / "typo" / "sub"
    code = main(["sweep", "optuna", "sweeps/optuna/order_lr.yaml", "--storage", f"sqlite:///{missing / 'x.db'}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"no folder {missing}; create it or correct the path" in line
    assert not (tmp_path / "typo").exists()
