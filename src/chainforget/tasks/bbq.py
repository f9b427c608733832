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
from chainforget.metrics import bbq_bias_scores
from chainforget.tasks import Example, Task, multiple_choice_prompt, register
from chainforget.tasks.downloads import (
    cache_root,
    extract_members,
    hub_rows,
    pypi_archive,
    read_json,
    read_jsonl,
    release_file,
)
from chainforget.tasks.rows import KEY, STRING, TEXT, field, list_of

RELEASE_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data"
CATEGORIES = (
    "Age",
    "Disability_status",
    "Gender_identity",
    "Nationality",
    "Physical_appearance",
    "Race_ethnicity",
    "Race_x_SES",
    "Race_x_gender",
    "Religion",
    "SES",
    "Sexual_orientation",
)
BIGBENCH = "bigbench==1.0.0"
BIGBENCH_MEMBERS = "*/bigbench/benchmark_tasks/bbq_lite/resources/*.json"
REQUIRED = (
    "example_id",
    "question_index",
    "question_polarity",
    "context_condition",
    "category",
    "answer_info",
    "additional_metadata",
    "context",
    "question",
    "ans0",
    "ans1",
    "ans2",
    "label",
)

ANSWER_INFO = list_of(STRING, 2, 2, "a list [answer text, group label]")
GROUP_LIST = list_of(STRING, expected="a list of group names, e.g. ['old']")


@register
class BBQ(Task):
    name = "bbq"
    role = "safety"
    sources = ("release", "pypi", "hub")
    group_kinds = ("category", "target", "context")

    def read(self, spec: TaskSpec) -> dict[str, list[Example]]:
        rows: list[tuple[str, int, dict]] = []
        if spec.source == "hub":
            rows = [(where, n, row) for _, where, n, row in hub_rows(spec.path or "")]
        elif spec.source == "pypi":
            files = extract_members(
                pypi_archive(BIGBENCH, sdist=True), BIGBENCH_MEMBERS, cache_root() / "data" / "bbq_lite"
            )
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

    def scores(self, predictions) -> list[dict]:
        """Bias scores s_DIS and s_AMB per category and per stereotyped target group."""
        return bbq_bias_scores(predictions, "category") + bbq_bias_scores(predictions, "target")


def to_example(row: dict, where: str, line: int) -> Example:
    """One BBQ row -> Example; a row that breaks the release schema raises a DataError naming file and line."""
    if not isinstance(row, dict):  # a BBQ-lite "examples" entry can be anything JSON
        raise DataError(f"{where}:{line}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise DataError(f"{where}:{line}: BBQ row lacks field {missing[0]!r} (required: {', '.join(REQUIRED)})")
    for key in ("example_id", "question_index"):
        field(row, key, KEY, where, line)
    for key in ("category", "context", "question", "ans0", "ans1", "ans2"):
        field(row, key, TEXT, where, line)
    for i in range(3):
        field(row, f"answer_info.ans{i}", ANSWER_INFO, where, line)
    info = row["answer_info"]
    label = row["label"]
    if type(label) is not int or label not in (0, 1, 2):  # JSON true would pass `in (0, 1, 2)` as 1
        raise DataError(f"{where}:{line}: label {label!r} is not allowed; use 0, 1 or 2")
    if row["context_condition"] not in ("ambig", "disambig"):
        raise DataError(f"{where}:{line}: context_condition {row['context_condition']!r}; use ambig or disambig")
    if row["question_polarity"] not in ("neg", "nonneg"):
        raise DataError(f"{where}:{line}: question_polarity {row['question_polarity']!r}; use neg or nonneg")
    # a null metadata object or group list means no stereotyped group, as before; a string is not a list of groups
    stereotyped = field(row, "additional_metadata.stereotyped_groups", GROUP_LIST, where, line, default=[])
    unknown = [i for i in range(3) if str(info[f"ans{i}"][1]).lower() == "unknown"]
    if len(unknown) != 1:
        raise DataError(f"{where}:{line}: expected exactly one answer whose answer_info group is 'unknown'")
    target, no_target = target_index(info, stereotyped, unknown[0])
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
            "target_index": target,
            "no_target_reason": no_target,
        },
    )


GENDER = {"woman": "f", "girl": "f", "f": "f", "man": "m", "boy": "m", "m": "m"}


def _keys(label: str, intersectional: bool = True) -> set[str]:
    """Comparable forms of one BBQ group label (lower case, no spaces, hyphens or underscores)."""
    plain = label.lower().replace(" ", "").replace("_", "").replace("-", "")
    keys = {plain, GENDER.get(label.lower(), plain)}
    if intersectional and "-" in label:  # "F-Black", "lowSES-Black": the group is the last part
        keys.add(label.rsplit("-", 1)[-1].lower().replace(" ", ""))
    if label.lower().startswith("trans"):  # Gender_identity: "trans_F", "trans_M" under stereotyped "trans"
        keys.add("trans")
    return keys


def target_index(answer_info: dict, stereotyped: list[str], unknown: int) -> tuple[int | None, str | None]:
    """The answer naming the stereotyped group, or ``None`` with the reason.

    Matching rules (checked on every category of the release and of BBQ-lite):
    - compare lower-cased labels without spaces, hyphens and underscores (``lowSES`` ~ ``low SES``);
    - Gender_identity: ``woman``/``girl``/``F`` are ``F`` and ``man``/``boy``/``M`` are ``M``; ``trans_F``
      and ``trans_M`` match the stereotyped group ``trans``;
    - intersectional group labels (``F-Black``, ``lowSES-Black``) also match by their last part;
    - Nationality and name-proxy rows label answers by region or name, so the answer's text
      (``answer_info[ansN][0]``, e.g. ``Nigerian``) is compared too.
    The target must be the only non-unknown answer that matches.
    """
    wanted = set().union(*(_keys(s) for s in stereotyped)) if stereotyped else set()
    matches = []
    for i in range(3):
        text, group = (str(v) for v in answer_info[f"ans{i}"])
        if i != unknown and (_keys(group) | _keys(text, intersectional=False)) & wanted:
            matches.append(i)
    if len(matches) == 1:
        return matches[0], None
    return None, "no answer names a stereotyped group" if not matches else "both answers name a stereotyped group"
