import json
import multiprocessing
import os
import time

import pytest
from conftest import ROOT

from chainforget.errors import ConfigError, DataError
from chainforget.records import StageCache, atomic_write_text, content_key, load_record, validate_record


def write_entry(root, key, payload):
    StageCache(root).put(key, lambda d: (d / "weights.bin").write_bytes(payload))


def test_content_key_ignores_dict_order_and_sees_values():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_concurrent_writers_of_one_key_leave_one_intact_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_entry, args=(tmp_path, "k", bytes([i]) * 100_000)) for i in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    entry = StageCache(tmp_path).get("k")
    assert entry is not None and len(set((entry / "weights.bin").read_bytes())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temp directories left behind


def test_damaged_entry_is_discarded_with_a_warning(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.put("k", lambda d: (d / "weights.bin").write_bytes(b"good"))
    (entry / "weights.bin").write_bytes(b"evil")
    with pytest.warns(UserWarning, match="damaged"):
        assert cache.get("k") is None
    assert not entry.exists()


def test_a_failed_write_publishes_nothing(tmp_path):
    def broken(directory):
        (directory / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        StageCache(tmp_path).put("k", broken)
    assert list(tmp_path.iterdir()) == []


def test_recompute_replaces_the_old_entry(tmp_path):
    StageCache(tmp_path).put("k", lambda d: (d / "w").write_bytes(b"old"))
    refresh = StageCache(tmp_path, read=False)
    assert refresh.get("k") is None
    refresh.put("k", lambda d: (d / "w").write_bytes(b"new"))
    assert (StageCache(tmp_path).get("k") / "w").read_bytes() == b"new"


def test_schema_errors_name_the_field(tmp_path):
    with pytest.raises(DataError, match=r"run.json: field \(top level\): 'schema_version' is a required property"):
        validate_record({"run_name": "x"})
    atomic_write_text(tmp_path / "a.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temp_entries_a_killed_writer_left_are_removed_once_stale(tmp_path):
    cache = StageCache(tmp_path)
    abandoned, in_progress = tmp_path / ".k1.abandoned", tmp_path / ".k2.writing"
    for folder in (abandoned, in_progress):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    cache.put("k3", lambda entry: (entry / "x").write_text("1"))
    assert not abandoned.exists() and in_progress.exists()  # another worker may still be writing that one
    assert cache.get("k3") is not None


def test_the_stage_cache_owns_its_layout_and_resolves_init_from(tmp_path):
    import pandas as pd

    from chainforget.errors import ConfigError

    cache = StageCache(tmp_path / "stages")
    assert cache.get_stage("k") is None and cache.get_predictions("e") is None
    cache.put_stage("k", lambda path: path.write_bytes(b"weights"), {"train": {"steps": 3}})
    weights, summary = cache.get_stage("k")
    assert weights.read_bytes() == b"weights" and summary == {"train": {"steps": 3}}
    frame = pd.DataFrame({"example_id": ["a", "b"], "pred": [0, 2]})
    assert cache.put_predictions("e", frame).equals(frame) and cache.get_predictions("e").equals(frame)

    assert cache.weights_for("k") == weights  # a cache key
    assert cache.weights_for(str(weights.parent)) == weights  # an entry's directory
    assert cache.weights_for(str(weights)) == weights  # a weights file
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(Exception):  # a run directory: its record must be valid
        cache.weights_for(str(run))
    with pytest.raises(ConfigError, match="model.init_from nokey: no weights.safetensors at"):
        cache.weights_for("nokey")


def test_every_summary_name_of_a_published_run_passes_the_objective_check_and_typos_do_not():
    from chainforget.records import check_summary_name, summary_metrics

    record = load_record(json.loads(next((ROOT / "docs/results/runs").glob("*/run.json")).read_text()))
    names = list(summary_metrics(record))
    tasks = list(record["config"]["tasks"])
    assert len(names) > 20 and any(name.startswith("cl/") for name in names)
    for name in names:
        check_summary_name(name, tasks, "study.yaml: objectives")
    for typo, message in [
        ("forgeting/bbq", "'forgeting/bbq' is not a summary metric"),
        ("forgetting/bqq", "names task 'bqq', which the chain does not have"),
        ("cl/forgeting", "cl/ has average_accuracy, bwt, fwt, forgetting"),
        ("cl", "'cl' is not a summary metric"),
    ]:
        with pytest.raises(ConfigError, match=f"^study.yaml: objectives: .*{message}"):
            check_summary_name(typo, tasks, "study.yaml: objectives")
