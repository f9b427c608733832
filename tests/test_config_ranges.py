"""Every number a chain config holds is checked where it enters, from the range its field declares: each bound
is tried just outside (and NaN, inf) through the `chain` command, and must end in one line, exit 2, nothing
written. A new ranged field is covered without a new test."""

import math
from dataclasses import fields

import pytest
from conftest import ROOT

from chainforget.cli import main
from chainforget.config import (
    ChainConfig,
    CurvatureSpec,
    EvalSpec,
    LoraSpec,
    MitigationSpec,
    TaskSpec,
    TrainerSpec,
    TrainSpec,
)

BLOCKS = {
    "": ChainConfig,
    "train": TrainSpec,
    "eval": EvalSpec,
    "curvature": CurvatureSpec,
    "trainer": TrainerSpec,
    "mitigation": MitigationSpec,
    "tasks.bbq": TaskSpec,
    "model.lora": LoraSpec,
}


def bad_values():
    cases = []
    for block, spec in BLOCKS.items():
        for spec_field in fields(spec):
            rule = spec_field.metadata
            if not rule:
                continue
            key = f"{block}.{spec_field.name}" if block else spec_field.name
            integer = isinstance(spec_field.default, int) or "int" in str(spec_field.type)
            step = 1 if integer else 1e-3
            values = []
            if rule["low"] is not None:
                values.append(rule["low"] - step)
            if rule["above"] is not None:
                values.append(rule["above"])
            if rule["high"] is not None:
                values.append(rule["high"] + step)
            if rule["below"] is not None:
                values.append(rule["below"])
            if not integer:
                values += [math.nan, math.inf]
            cases += [(key, value) for value in values]
    return cases


CASES = bad_values()


def test_the_catalogue_covers_every_ranged_field():
    assert len({key for key, _ in CASES}) >= 25


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_outside_its_range_is_one_line_exit_2_and_nothing_written(key, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}", f"--{key}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert key.split(".")[-1] in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("block", ["mitigation", "curvature"])
def test_stages_beyond_the_chain_are_refused(block, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    extra = ["--mitigation.name=l2sp"] if block == "mitigation" else ["--curvature.enabled=true"]
    code = main(
        ["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path}", *extra, f"--{block}.stages=[3]"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"chainforget chain: error: {block}.stages: [3] is not allowed; this chain has stages 1 to 2"
    ]


@pytest.mark.parametrize("threads", ["two", "0", "-1", "1.5"])
def test_a_malformed_thread_count_is_one_line(threads, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CHAINFORGET_THREADS", threads)
    assert main(["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = f"CHAINFORGET_THREADS={threads!r}: not allowed; use a positive number of torch threads"
    assert err == [f"chainforget chain: error: {message}"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("--trainer.precision=bf17", "Precision 'bf17' is invalid"),
        ("--trainer.accelerator=gpux", "invalid accelerator name"),
        ("--trainer.strategy=dpp", "invalid strategy name"),
        ("--trainer.profiler=simplex", "`profiler`"),
    ],
)
def test_lightning_refuses_its_own_options_in_one_line_before_anything_loads(
    option, words, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)
    assert main(["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}", option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chainforget chain: error: trainer: ") and words in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("order: [bbq, csqa\nseed: 1\n", ":2:5: not valid YAML (expected ',' or ']', but got ':')"),
        (
            "train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n",
            ":4:3: not valid YAML (duplicate key 'steps' (first given on line 2))",
        ),
        ("seed: 1\nseed: 2\n", ":2:1: not valid YAML (duplicate key 'seed' (first given on line 1))"),
        ("", ": a chain config file is a mapping with keys such as model, tasks, order, train; it is empty"),
        (
            "- bbq\n- csqa\n",
            ": a chain config file is a mapping with keys such as model, tasks, order, train; it holds a list",
        ),
    ],
)
def test_a_config_file_yaml_cannot_read_is_one_line_with_its_place(content, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code = main(["chain", "--config", "sweeps/configs/smoke.yaml", "--config", str(path), f"--out={tmp_path / 'runs'}"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"chainforget chain: error: {path}{message}"]
    assert not (tmp_path / "runs").exists()
