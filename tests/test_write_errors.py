"""Disk-full and permission errors while writing: one clear line, exit 2, no half-written record or entry."""

import errno
import json
import os

import pandas as pd
import pytest

from chainforget.cli import main
from chainforget.errors import WriteError
from chainforget.records import StageCache, atomic_write, atomic_write_text


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_that_runs_out_of_space_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "run.json"
    target.write_text('{"old": true}')

    def half_then_full(tmp):
        tmp.write_text('{"new": tr')  # part of the new content reached the disk
        disk_full()

    with pytest.raises(WriteError, match=r"run.json: could not write \(No space left on device\)"):
        atomic_write(target, half_then_full)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_permission_denied_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied"))
    )
    with pytest.raises(WriteError, match=r"notes.txt: could not write \(Permission denied\)"):
        atomic_write_text(tmp_path / "notes.txt", "hello")
    assert list(tmp_path.iterdir()) == []


def test_cache_entry_that_runs_out_of_space_is_not_published(tmp_path):
    cache = StageCache(tmp_path)

    def write(entry):
        (entry / "weights.safetensors").write_bytes(b"partial")
        disk_full()

    with pytest.raises(WriteError, match="could not write the stage cache entry"):
        cache.put("k1", write)
    assert cache.get("k1") is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["predictions", "record"])
def test_chain_that_cannot_write_its_record_exits_2_and_leaves_no_record(
    failure, smoke_config, monkeypatch, capsys, tmp_path
):
    run_dir = tmp_path / "runs" / "smoke"
    if failure == "predictions":  # the run's own file (written via a temp name), not the eval cache's
        real_parquet = pd.DataFrame.to_parquet
        monkeypatch.setattr(
            pd.DataFrame,
            "to_parquet",
            lambda self, path, **kw: (
                disk_full() if ".predictions.parquet." in str(path) else real_parquet(self, path, **kw)
            ),
        )
    else:
        real = os.replace

        def refuse_record(src, dst):
            if str(dst).endswith("run.json"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", refuse_record)
    code = main(
        [
            "chain",
            "--config",
            "sweeps/configs/smoke.yaml",
            f"--out={tmp_path / 'runs'}",
            f"--cache_dir={tmp_path / 'stages'}",
            "--train.steps=4",
            "--wandb.mode=disabled",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    reason = "No space left on device" if failure == "predictions" else "Permission denied"
    assert err[-1].startswith("chainforget chain: error: ") and reason in err[-1] and str(run_dir) in err[-1]
    assert not (run_dir / "run.json").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "a temp file was left behind"
