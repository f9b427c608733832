"""The real release files on these machines (../shared/data); skipped where they are absent."""

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
        "Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation"
    }  # fmt: skip
    assert all(rows[i].choices[rows[i].meta["unknown_index"]] for i in range(0, len(rows), 997))
    loaded = tasks.load("bbq", spec, seed=0)
    task = tasks.get("bbq")
    assert not {task.split_key(e) for e in loaded.train} & {task.split_key(e) for e in loaded.eval}
    assert len(loaded.train) + len(loaded.eval) == len(rows)


def test_real_csqa_release_files_keep_their_train_and_dev_split():
    loaded = tasks.load("csqa", TaskSpec(source="release", path=str(SHARED_DATA / "csqa")), seed=0)
    assert (len(loaded.train), len(loaded.eval)) == (9741, 1221)
    assert all(len(e.choices) == 5 for e in loaded.eval)
