"""CommonsenseQA 2.0 (Talmor et al. 2021), a yes/no capability task cast as "A. yes / B. no".

Sources: ``release`` reads ``CSQA2_train.json.gz`` (train) and ``CSQA2_dev.json.gz`` (eval; the test split
has no answers) from a local directory or the release URL; ``hub`` reads a dataset with the same columns.
Rows are gzip'd JSON lines: ``{id, question, answer: "yes" | "no", ...}``.
"""

from __future__ import annotations

from chainforget.config import TaskSpec
from chainforget.errors import DataError
from chainforget.tasks import Example, Task, multiple_choice_prompt, register
from chainforget.tasks.sources import hub_rows, read_jsonl, release_file

RELEASE_URL = "https://github.com/allenai/csqa2/raw/master/dataset"
CHOICES = ("yes", "no")


@register
class CommonsenseQA2(Task):
    name = "csqa2"
    role = "capability"
    sources = ("release", "hub")

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        if spec.source == "hub":
            rows = [(split, f"{spec.path}[{split}]", n, row) for split, n, row in hub_rows(spec.path or "")]
            return {
                "train": [to_example(row, where, n) for split, where, n, row in rows if split == "train"],
                "eval": [to_example(row, where, n) for split, where, n, row in rows if split in ("validation", "dev")],
            }
        parts = {}
        for split, filename in (("train", "CSQA2_train.json.gz"), ("eval", "CSQA2_dev.json.gz")):
            path = release_file(spec.path, RELEASE_URL, filename)
            if path is None:
                raise DataError(f"{spec.path}: CommonsenseQA 2.0 release file {filename} not found")
            parts[split] = [to_example(row, str(path), n) for n, row in read_jsonl(path)]
        return parts


def to_example(row: dict, where: str, line: int) -> Example:
    for key in ("id", "question", "answer"):
        if not row.get(key):
            raise DataError(f"{where}:{line}: CommonsenseQA 2.0 row lacks field {key!r}")
    if row["answer"] not in CHOICES:
        raise DataError(f"{where}:{line}: answer {row['answer']!r} is not allowed; use 'yes' or 'no'")
    return Example(
        id=str(row["id"]), prompt=multiple_choice_prompt(str(row["question"]), CHOICES), choices=CHOICES,
        label=CHOICES.index(row["answer"]),
    )
