"""A catalogue of bad inputs: each ends with exit code 2 and one line naming the file/field/value and what is
allowed, no traceback, and leaves existing run directories and cache entries untouched."""

import gzip
import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

from chainforget.cli import main

SMOKE = str(ROOT / "sweeps" / "configs" / "smoke.yaml")
DATA = [f"--tasks.bbq.path={FIXTURES / 'bbq'}", f"--tasks.csqa.path={FIXTURES / 'csqa'}"]


def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def copy_fixture(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    for path in (FIXTURES / name).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def bbq_without_answer_info(tmp):
    folder = copy_fixture(tmp, "bbq")
    rows = (folder / "Age.jsonl").read_text().splitlines()
    row = json.loads(rows[4])
    del row["answer_info"]
    rows[4] = json.dumps(row)
    (folder / "Age.jsonl").write_text("\n".join(rows) + "\n")
    return [f"--tasks.bbq.path={folder}"]


def bbq_not_utf8(tmp):
    folder = copy_fixture(tmp, "bbq")
    (folder / "Religion.jsonl").write_bytes(b'{"example_id": "\xff\xfe"}\n')
    return [f"--tasks.bbq.path={folder}"]


def bbq_duplicate_ids(tmp):
    folder = copy_fixture(tmp, "bbq")
    rows = (folder / "Age.jsonl").read_text().splitlines()
    (folder / "Age.jsonl").write_text("\n".join(rows + rows[:1]) + "\n")
    return [f"--tasks.bbq.path={folder}"]


def csqa_empty(tmp):
    folder = copy_fixture(tmp, "csqa")
    (folder / "train_rand_split.jsonl").write_text("")
    return [f"--tasks.csqa.path={folder}"]


def csqa_bad_answer_key(tmp):
    folder = copy_fixture(tmp, "csqa")
    row = json.loads((folder / "dev_rand_split.jsonl").read_text().splitlines()[0])
    row["answerKey"] = "Z"
    (folder / "dev_rand_split.jsonl").write_text(json.dumps(row) + "\n")
    return [f"--tasks.csqa.path={folder}"]


def csqa2_truncated_gzip(tmp):
    folder = copy_fixture(tmp, "csqa2")
    (folder / "CSQA2_train.json.gz").write_bytes((folder / "CSQA2_train.json.gz").read_bytes()[:30])
    return ["--order=[csqa2,bbq]", "--tasks.csqa2.source=release", f"--tasks.csqa2.path={folder}"]


def csqa2_bad_json(tmp):
    folder = copy_fixture(tmp, "csqa2")
    with gzip.open(folder / "CSQA2_dev.json.gz", "wt") as fh:
        fh.write('{"id": "x", "question": "q?"\n')
    return ["--order=[csqa2,bbq]", "--tasks.csqa2.source=release", f"--tasks.csqa2.path={folder}"]


def model_dir_without_weights(tmp):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    return [f"--model.name={folder}"]


def model_dir_tokenizer_without_pad(tmp):
    from transformers import PreTrainedTokenizerFast

    from chainforget.models import tiny_tokenizer

    folder = tmp / "model"
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer)  # neither pad nor eos
    bare.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 400}))
    return [f"--model.name={folder}"]


def config_file(content: str):
    def make(tmp):
        path = tmp / "bad.yaml"
        path.write_text(content)
        return ["--config", str(path)]

    return make


def sweep_file(content: str):
    def make(tmp):
        path = tmp / "sweep.yaml"
        path.write_text(content)
        return [str(path)]

    return make


SWEEP_COMMAND = f"command: [chainforget, chain, --config, {SMOKE}, --train.steps=2, '${{args}}']\n"
CHAIN = ["chain", "--config", SMOKE, *DATA]
CASES = [
    # configs and command-line arguments
    ("unknown task", CHAIN + ["--order=[bbq,arc_hard]"], None, "names task 'arc_hard', which is not under tasks"),
    ("misspelt key", CHAIN + ["--trian.lr=0.1"], None, "unrecognized arguments: --trian.lr"),
    ("negative learning rate", CHAIN + ["--train.lr=-0.001"], None, "train.lr: -0.001 is not allowed"),
    ("zero steps", CHAIN + ["--train.steps=0"], None, "train.steps: 0 is not allowed"),
    (
        "negative checkpoint interval",
        CHAIN + ["--trainer.checkpoint_every=-5"],
        None,
        "trainer.checkpoint_every: -5 is not allowed",
    ),
    (
        "unknown attention kernel",
        CHAIN + ["--train.attention=fast"],
        None,
        "train.attention: 'fast' is not allowed; use one of auto, eager, ",
    ),
    ("steps not a number", CHAIN + ["--train.steps=ten"], None, 'Parser key "train.steps"'),
    ("warm-up ratio 1", CHAIN + ["--train.warmup_ratio=1.0"], None, "train.warmup_ratio: 1.0 is not allowed"),
    (
        "replay ratio above 1",
        CHAIN + ["--mitigation.name=replay_stage", "--mitigation.strength=1.5"],
        None,
        "replay ratio 1.5 is not allowed",
    ),
    (
        "negative penalty",
        CHAIN + ["--mitigation.name=ewc", "--mitigation.strength=-2"],
        None,
        "mitigation.strength: penalty weight -2.0 is not allowed for ewc; use 0 <= lambda",
    ),
    (
        "projection threshold above 1",
        CHAIN + ["--mitigation.name=safety_projection", "--mitigation.strength=1.5", "--model.finetune=lora"],
        None,
        "mitigation.strength: similarity threshold 1.5 is not allowed for safety_projection; use -1 <= tau <= 1",
    ),
    (
        "negative DRO step",
        CHAIN + ["--mitigation.name=group_replay", "--mitigation.strength=-1"],
        None,
        "mitigation.strength: DRO step size -1.0 is not allowed for group_replay; use 0 <= eta",
    ),
    (
        "safety anchor without LoRA",
        CHAIN + ["--mitigation.name=safety_anchor", "--mitigation.strength=1", "--model.finetune=full"],
        None,
        "mitigation.name: safety_anchor works on each adapted layer's low-rank update and needs model.finetune: lora",
    ),
    ("unknown mitigation", CHAIN + ["--mitigation.name=dropout"], None, "mitigation.name"),
    (
        "zero LwF temperature",
        CHAIN + ["--mitigation.name=lwf", "--mitigation.temperature=0"],
        None,
        "mitigation.temperature: 0.0",
    ),
    ("eval cap zero", CHAIN + ["--tasks.bbq.max_eval=0"], None, "tasks.*.max_eval: 0 is not allowed"),
    (
        "eval fraction above 1",
        CHAIN + ["--tasks.bbq.eval_fraction=1.5"],
        None,
        "tasks.*.eval_fraction: 1.5 is not allowed",
    ),
    ("probe not configured", CHAIN + ["--eval.probes=[toxigen]"], None, "eval.probes: 'toxigen' is not under tasks"),
    ("malformed mixture", CHAIN + ["--order=[bbq:-1+csqa]"], None, "order: stage 'bbq:-1+csqa' is not allowed"),
    (
        "source without an archive",
        CHAIN + ["--order=[csqa2,bbq]", "--tasks.csqa2.source=pypi"],
        None,
        "tasks.csqa2.source: 'pypi' is not available for csqa2",
    ),
    (
        "train size above the data",
        CHAIN + ["--train_size=500"],
        None,
        "train_size: 500 training examples per task is more than available",
    ),
    ("missing config file", ["chain", "--config", "no/such.yaml"], None, "--config no/such.yaml: no such file"),
    ("config not YAML", ["chain"], config_file("order: [bbq\n"), "chainforget chain: error:"),
    ("no config at all", ["chain", "--order=[bbq]"], None, "--config: missing"),
    ("unknown command", ["train"], None, "unknown command 'train'"),
    ("bootstrap beyond its cap", CHAIN + ["--eval.bootstrap=1000000000000"], None, "eval.bootstrap: 1000000000000 is"),
    (
        "W&B project W&B refuses",
        CHAIN + ["--wandb.project=me/chainforget"],
        None,
        "wandb.project: 'me/chainforget' is not allowed by W&B (Invalid project name",
    ),
    (
        "a penalty on a chain too short for it",
        CHAIN + ["--mitigation.name=l2sp", "--mitigation.strength=1", "--order=[bbq]"],
        None,
        "mitigation.name: l2sp acts from stage 2 on and this chain has 1 stage(s)",
    ),
    (
        "LwF with text answers",
        CHAIN + ["--mitigation.name=lwf", "--mitigation.strength=1", "--train.answer=text"],
        None,
        "mitigation.name: lwf distils the answer letters' distribution, which train.answer: text does not train",
    ),
    (
        "LwF with text answers under fit",
        ["fit", "--config", "sweeps/configs/stage_smoke.yaml", "--data.answer=text", "--model.mitigation.name=lwf"],
        None,
        "model.mitigation.name: lwf distils the answer letters' distribution, which data.answer: text does not",
    ),
    (
        "training shares that do not sum to 1",
        CHAIN + ["--tasks.bbq.train_shares={context: {ambig: 0.5}}"],
        None,
        "tasks.*.train_shares.context: {'ambig': 0.5} is not allowed; use shares in [0, 1] that sum to 1",
    ),
    (
        "training shares by a group kind the task lacks",
        CHAIN + ["--tasks.bbq.train_shares={ctx: {a: 1.0}}"],
        None,
        "tasks.bbq.train_shares: 'ctx' is not a group kind of bbq; use category, target, context",
    ),
    (
        "an answer format that does not exist",
        CHAIN + ["--train.answer=option"],
        None,
        "train.answer",
    ),
    (
        "fit config with a key given twice",
        ["fit", "--config"],
        lambda tmp: [str(written(tmp / "dup.yaml", "seed_everything: 0\nseed_everything: 1\n"))],
        "dup.yaml:2:1: not valid YAML (duplicate key 'seed_everything'",
    ),
    # data files
    ("BBQ row missing answer_info", CHAIN, bbq_without_answer_info, "Age.jsonl:5: BBQ row lacks field 'answer_info'"),
    ("non-UTF-8 data file", CHAIN, bbq_not_utf8, "Religion.jsonl: not UTF-8 text"),
    ("duplicate example ids", CHAIN, bbq_duplicate_ids, "duplicate example id 'Age-0'"),
    ("empty release file", CHAIN, csqa_empty, "train_rand_split.jsonl: no rows (empty file)"),
    (
        "unknown answer key",
        CHAIN,
        csqa_bad_answer_key,
        "dev_rand_split.jsonl:1: answerKey 'Z' is not one of the choice labels",
    ),
    ("truncated gzip", CHAIN, csqa2_truncated_gzip, "CSQA2_train.json.gz: damaged gzip file"),
    ("broken JSON line", CHAIN, csqa2_bad_json, "CSQA2_dev.json.gz:1: not valid JSON"),
    ("data directory missing", CHAIN + ["--tasks.bbq.path=/no/such/dir"], None, "/no/such/dir: no such directory"),
    (
        "empty eval split after filtering",
        CHAIN + ["--tasks.bbq.eval_fraction=0.0001"],
        None,
        "task bbq: 48 train and 0 eval examples after splitting",
    ),
    # model specs
    ("model path missing", CHAIN + ["--model.name=./no-model"], None, "model.name './no-model': no such directory"),
    ("model directory without weights", CHAIN, model_dir_without_weights, "could not load a "),
    (
        "tokenizer without a pad token",
        CHAIN,
        model_dir_tokenizer_without_pad,
        "tokenizer has neither a pad nor an eos token",
    ),
    (
        "LoRA target that does not exist",
        CHAIN + ["--model.finetune=lora", "--model.lora.target_modules=[nope_proj]"],
        None,
        "model.lora.target_modules ['nope_proj']",
    ),
    # sweep files
    (
        "sweep with a schema error",
        ["sweep", "wandb-local"],
        sweep_file("method: grid\nparameters: {x: {valuez: [1]}}\n" + SWEEP_COMMAND),
        "invalid sweep",
    ),
    (
        "sweep without a command",
        ["sweep", "wandb-local"],
        sweep_file("method: grid\nparameters: {x: {values: [1]}}\n"),
        "command: missing",
    ),
    (
        "sweep parameter that is not a config key",
        ["sweep", "wandb-local"],
        sweep_file("method: grid\nparameters: {trian.lr: {values: [0.1]}}\n" + SWEEP_COMMAND),
        "parameters.trian: unknown key; the keys of a chain config are run_name, model, tasks",
    ),
    (
        "study with an unknown field",
        ["sweep", "optuna"],
        sweep_file(
            f"study_name: s\nbase: [{SMOKE}]\nobjectives: [cl/forgetting]\n"
            "params: {x: {type: categorical, choices: [1]}}\ntrials: 3\n"
        ),
        "field 'trials' is unknown",
    ),
    # stage cache contents and analysis sources
    (
        "init from a missing cache entry",
        ["fit", "--config", str(ROOT / "sweeps/configs/stage_smoke.yaml"), "--model.init_from=0123abcd"],
        None,
        "model.init_from 0123abcd: no weights.safetensors",
    ),
    (
        "fit with an unknown attention kernel",
        ["fit", "--config", str(ROOT / "sweeps/configs/stage_smoke.yaml"), "--model.attention=fast"],
        None,
        "model.attention: 'fast' is not allowed",
    ),
    (
        "report of a directory without runs",
        ["report", "--out"],
        lambda tmp: [str(tmp / "report"), "--source", str(tmp / "empty")],
        "no such directory",
    ),
    (
        "report into a file",
        ["report", "--source", str(ROOT / "docs/results/runs"), "--out"],
        lambda tmp: [str(written(tmp / "report.txt", "kept"))],
        "report.txt: a file; use a folder",
    ),
    ("stage cache in a file", CHAIN + [f"--cache_dir={SMOKE}"], None, f"cache_dir: '{SMOKE}' is a file; use a folder"),
    (
        "unreachable W&B project",
        ["report", "--out"],
        lambda tmp: [str(tmp / "report"), "--source", "wandb:nobody/no-such-project"],
        "wandb:nobody/no-such-project: could not read runs from W&B",
    ),
]


def fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def existing_state(tmp_path, monkeypatch, isolated_cache):
    """A finished run directory and a cache entry that no failing command may touch."""
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs" / "earlier"
    runs.mkdir(parents=True)
    (runs / "run.json").write_text('{"kept": true}')
    entry = isolated_cache / "stages" / "somekey"
    entry.mkdir(parents=True)
    (entry / "weights.safetensors").write_bytes(b"weights")
    return [tmp_path / "runs", isolated_cache]


@pytest.mark.parametrize(("name", "args", "setup", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(
    name, args, setup, message, tmp_path, capsys, existing_state, monkeypatch
):
    assert len(CASES) >= 30
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # W&B must fail fast on its own, not after a login attempt
    before = [fingerprint(root) for root in existing_state]
    extra = setup(tmp_path) if setup else []
    argv = [*args, *extra]
    if argv[0] == "chain":
        argv.append(f"--out={tmp_path / 'runs'}")
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):  # Lightning's handlers may hold an earlier test's stderr
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    # one error line; LightningCLI's own start-up log lines (INFO) may come before it for `fit`
    assert [line for line in err if not line.startswith("INFO: ")] == [err[-1]], err
    assert message in err[-1] and err[-1].startswith("chainforget")
    assert [fingerprint(root) for root in existing_state] == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CHAINFORGET_THREADS", "1.5", "CHAINFORGET_THREADS='1.5': not allowed"),
        ("CHAINFORGET_MALLOC", "sytem", "CHAINFORGET_MALLOC='sytem': not allowed; use system"),
        ("WANDB_MODE", "offine", "WANDB_MODE='offine': not allowed; use one of online, offline"),
    ],
)
@pytest.mark.parametrize("command", ["chain", "fit"])
def test_a_malformed_environment_variable_is_one_line_before_anything_runs(
    variable, value, message, command, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    config = {"chain": SMOKE, "fit": str(ROOT / "sweeps/configs/stage_smoke.yaml")}[command]
    assert (
        main([command, "--config", config, "--out=runs"] if command == "chain" else [command, "--config", config]) == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"chainforget {command}: error: {message}")
    assert list(tmp_path.iterdir()) == []
