"""CommonsenseQA 2.0 (Talmor et al. 2021), a yes/no capability task cast as "A. yes / B. no".

Sources: ``release`` reads ``CSQA2_train.json.gz`` (train) and ``CSQA2_dev.json.gz`` (eval; the test split
has no answers) from a local directory or the release URL; ``hub`` reads a dataset with the same columns.
Rows are gzip'd JSON lines: ``{id, question, answer: "yes" | "no", ...}``.
"""

from __future__ import annotations

from chainforget.config import TaskSpec
from chainforget.errors import DataError
from chainforget.tasks import Example, Task, multiple_choice_prompt, register
from chainforget.tasks.downloads import hub_splits, release_splits
from chainforget.tasks.rows import KEY, TEXT, field

RELEASE_URL = "https://github.com/allenai/csqa2/raw/master/dataset"
CHOICES = ("yes", "no")


@register
class CommonsenseQA2(Task):
    name = "csqa2"
    role = "capability"
    sources = ("release", "hub")

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        if spec.source == "hub":
            return hub_splits(spec.path or "", to_example, ("validation", "dev"))
        files = {"train": "CSQA2_train.json.gz", "eval": "CSQA2_dev.json.gz"}
        return release_splits(spec.path, RELEASE_URL, files, to_example, "CommonsenseQA 2.0")


def to_example(row: dict, where: str, line: int) -> Example:
    field(row, "id", KEY, where, line)
    field(row, "question", TEXT, where, line)
    if field(row, "answer", TEXT, where, line) not in CHOICES:
        raise DataError(f"{where}:{line}: answer {row['answer']!r} is not allowed; use 'yes' or 'no'")
    return Example(
        id=str(row["id"]),
        prompt=multiple_choice_prompt(str(row["question"]), CHOICES),
        choices=CHOICES,
        label=CHOICES.index(row["answer"]),
    )
