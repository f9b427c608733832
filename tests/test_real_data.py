"""The real release files on these machines (../shared/data); skipped where they are absent."""

from collections import Counter

import pytest
from conftest import SHARED_DATA

from chainforget import tasks
from chainforget.config import TaskSpec

pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not on this machine")


def test_real_bbq_release_files_load_every_row_with_a_template_split():
    spec = TaskSpec(source="release", path=str(SHARED_DATA / "bbq"))
    rows = tasks.get("bbq").read(spec)["all"]
    # Age, Disability_status, Nationality, Physical_appearance, Religion, Sexual_orientation
    assert len(rows) == 3680 + 1556 + 3080 + 1576 + 1200 + 864
    assert {e.groups["category"] for e in rows} == {
        "Age",
        "Disability_status",
        "Nationality",
        "Physical_appearance",
        "Religion",
        "Sexual_orientation",
    }
    assert all(rows[i].choices[rows[i].meta["unknown_index"]] for i in range(0, len(rows), 997))
    loaded = tasks.load("bbq", spec, seed=0)
    task = tasks.get("bbq")
    assert not {task.split_key(e) for e in loaded.train} & {task.split_key(e) for e in loaded.eval}
    assert len(loaded.train) + len(loaded.eval) == len(rows)


def test_real_csqa_release_files_keep_their_train_and_dev_split():
    loaded = tasks.load("csqa", TaskSpec(source="release", path=str(SHARED_DATA / "csqa")), seed=0)
    assert (len(loaded.train), len(loaded.eval)) == (9741, 1221)
    assert all(len(e.choices) == 5 for e in loaded.eval)


def test_every_real_bbq_row_gets_a_target_option_or_a_counted_reason():
    rows = tasks.get("bbq").read(TaskSpec(source="release", path=str(SHARED_DATA / "bbq")))["all"]
    missing = Counter(
        (e.groups["category"], e.meta["no_target_reason"]) for e in rows if e.meta["target_index"] is None
    )
    assert all(e.meta["target_index"] != e.meta["unknown_index"] for e in rows)
    # The six release categories here all resolve (BBQ-lite's Gender_identity, Physical_appearance and
    # Race_ethnicity have rows that do not: both answers share a group, or both groups are stereotyped).
    assert missing == {}


def test_real_arc_csqa2_and_toxigen_files():
    arc = tasks.load("arc_challenge", TaskSpec(source="release", path=str(SHARED_DATA / "arc")), seed=0)
    assert (len(arc.train), len(arc.eval)) == (1119, 1172)
    assert all(0 <= e.label < len(e.choices) and 3 <= len(e.choices) <= 5 for e in arc.train + arc.eval)
    easy = tasks.load("arc_easy", TaskSpec(source="release", path=str(SHARED_DATA / "arc")), seed=0)
    assert (len(easy.train), len(easy.eval)) == (2251, 2376)
    csqa2 = tasks.load("csqa2", TaskSpec(source="release", path=str(SHARED_DATA / "csqa2")), seed=0)
    assert (len(csqa2.train), len(csqa2.eval)) == (9264, 2541)
    assert Counter(e.label for e in csqa2.train) == {0: 4632, 1: 4632}
    toxigen = tasks.load("toxigen", TaskSpec(source="release", path=str(SHARED_DATA / "toxigen")), seed=0)
    statements = [e.meta["statement"] for e in toxigen.train + toxigen.eval]
    assert len(statements) == 722  # unique (group, statement) pairs in the 31 prompt files
    assert not {e.meta["statement"] for e in toxigen.train} & {e.meta["statement"] for e in toxigen.eval}
    assert len({e.groups["target"] for e in toxigen.train + toxigen.eval}) == 16
