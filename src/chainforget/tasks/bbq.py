"""BBQ, the Bias Benchmark for QA (Parrish et al. 2022), as a safety task.

Sources, all in BBQ's own row schema:
- ``release``: ``<Category>.jsonl`` files from github.com/nyu-mll/BBQ ``data/`` (a local copy with a subset of
  the 11 categories is fine: the categories present are used);
- ``pypi``: BBQ-lite from the ``bigbench==1.0.0`` sdist (``bbq_lite/resources/<Category>.json``, key
  ``examples``; 9 categories, 16,076 items), stream-extracted once;
- ``hub``: a hub dataset with the same columns.

The split is by template (category + ``question_index``), so train and eval never share a template.
Groups: ``category``, ``target`` (the stereotyped group(s) of the template) and ``context``
(``ambig``/``disambig``). ``meta`` keeps what the bias scores need.
"""

from __future__ import annotations

from pathlib import Path

from chainforget.config import TaskSpec
from chainforget.errors import DataError
from chainforget.tasks import Example, Task, multiple_choice_prompt, register
from chainforget.tasks.sources import cache_root, extract_members, hub_rows, pypi_archive, read_json, read_jsonl, release_file

RELEASE_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data"
CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
    "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)  # fmt: skip
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_MEMBERS = "*/bigbench/benchmark_tasks/bbq_lite/resources/*.json"
REQUIRED = ("example_id", "question_index", "question_polarity", "context_condition", "category",
            "answer_info", "additional_metadata", "context", "question", "ans0", "ans1", "ans2", "label")  # fmt: skip


@register
class BBQ(Task):
    name = "bbq"
    role = "safety"
    group_kinds = ("category", "target", "context")

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        rows: list[tuple[str, int, dict]] = []
        if spec.source == "hub":
            rows = [(f"{spec.path}[{split}]", n, dict(row)) for split, n, row in hub_rows(spec.path or "")]
        elif spec.source == "pypi" or (spec.source == "auto" and not spec.path):
            files = extract_members(pypi_archive(BIGBENCH, sdist=True), BIGBENCH_MEMBERS, cache_root() / "data" / "bbq_lite")
            for path in files:
                data = read_json(path)
                if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
                    raise DataError(f"{path}: expected a JSON object with an 'examples' list")
                rows += [(str(path), n, row) for n, row in enumerate(data["examples"], 1)]
        else:
            paths = [p for c in CATEGORIES if (p := release_file(spec.path, RELEASE_URL, f"{c}.jsonl"))]
            if not paths:
                raise DataError(f"{spec.path}: no BBQ category file (<Category>.jsonl, e.g. Age.jsonl) found")
            for path in paths:
                rows += [(str(path), n, row) for n, row in read_jsonl(Path(path))]
        return {"all": [to_example(row, where, n) for where, n, row in rows]}

    def split_key(self, example: Example) -> str:
        return f"{example.groups['category']}:{example.meta['question_index']}"

    def stratum(self, example: Example) -> tuple:
        return example.groups["category"], example.groups["context"]


def to_example(row: dict, where: str, line: int) -> Example:
    """One BBQ row -> Example; a row that breaks the release schema raises a DataError naming file and line."""
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise DataError(f"{where}:{line}: BBQ row lacks field {missing[0]!r} (required: {', '.join(REQUIRED)})")
    info = row["answer_info"]
    if not isinstance(info, dict) or any(
        not isinstance(info.get(f"ans{i}"), list) or len(info[f"ans{i}"]) != 2 for i in range(3)
    ):
        raise DataError(f"{where}:{line}: answer_info must map ans0..ans2 to [text, group], got {info!r}")
    label = row["label"]
    if label not in (0, 1, 2):
        raise DataError(f"{where}:{line}: label {label!r} is not allowed; use 0, 1 or 2")
    if row["context_condition"] not in ("ambig", "disambig"):
        raise DataError(f"{where}:{line}: context_condition {row['context_condition']!r}; use ambig or disambig")
    if row["question_polarity"] not in ("neg", "nonneg"):
        raise DataError(f"{where}:{line}: question_polarity {row['question_polarity']!r}; use neg or nonneg")
    answer_groups = [str(info[f"ans{i}"][1]) for i in range(3)]
    stereotyped = [str(g) for g in (row["additional_metadata"] or {}).get("stereotyped_groups") or []]
    unknown = [i for i, g in enumerate(answer_groups) if g.lower() == "unknown"]
    if len(unknown) != 1:
        raise DataError(f"{where}:{line}: expected exactly one answer whose answer_info group is 'unknown'")
    choices = tuple(str(row[f"ans{i}"]) for i in range(3))
    category = str(row["category"])
    return Example(
        id=f"{category}-{row['example_id']}",
        prompt=multiple_choice_prompt(f"{row['context']}\nQuestion: {row['question']}", choices),
        choices=choices,
        label=int(label),
        groups={"category": category, "target": "/".join(stereotyped) or "none", "context": row["context_condition"]},
        meta={
            "question_index": str(row["question_index"]),
            "polarity": row["question_polarity"],
            "unknown_index": unknown[0],
            "target_index": target_index(answer_groups, stereotyped, unknown[0]),
        },
    )


def target_index(answer_groups: list[str], stereotyped: list[str], unknown: int) -> int | None:
    """The answer naming the stereotyped group (BBQ marks e.g. ``F-Black``; compare the last part)."""
    wanted = {s.lower() for s in stereotyped}
    for i, group in enumerate(answer_groups):
        if i != unknown and (group.lower() in wanted or group.split("-")[-1].lower() in wanted):
            return i
    return None
