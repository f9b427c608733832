"""``cache: wandb``: the stage cache kept as W&B artifacts named by content key. An offline run's artifacts are read
back with wandb's own reader; fetching needs a W&B server, so the fetch-and-verify path of the stage cache is
exercised with a folder standing in for the server."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import wandb_inspect

from chainforget.cli import main
from chainforget.records import StageCache
from lightning_modules.chain import run_chain


def test_an_offline_chain_logs_every_cache_entry_as_an_artifact_named_by_its_key(smoke_config, capsys):
    config = replace(smoke_config, run_name="remote", cache="wandb", wandb=replace(smoke_config.wandb, mode="offline"))
    config = replace(config, train=replace(config.train, steps=3))
    record = run_chain(config, progress=False)
    (run,) = (Path(config.out) / "remote" / "wandb").glob("offline-run-*")
    logged = [r["artifact"] for r in wandb_inspect(run) if r.get("type") == "artifact"]
    artifacts = {a["name"]: a for a in logged if a["type"] == "chainforget-cache"}  # not the run's tables
    entries = sorted(p.name for p in Path(config.cache_dir).iterdir() if not p.name.startswith("."))
    assert sorted(artifacts) == [f"cf-{key}" for key in entries]  # stages and evaluations, each once
    for stage in record["stages"]:
        stored = artifacts[f"cf-{stage['cache_key']}"]
        assert stored["type"] == "chainforget-cache" and json.loads(stored["metadata"]) == {"key": stage["cache_key"]}
        assert {f["path"] for f in stored["manifest"]["contents"]} == {
            "weights.safetensors",
            "stage.json",
            "manifest.json",
        }
    # a second offline chain on an empty local cache cannot fetch (W&B keeps no artifacts offline): it recomputes
    again = run_chain(
        replace(config, run_name="again", cache_dir=str(Path(config.cache_dir).with_name("empty"))), progress=False
    )
    assert not any(stage["cache_hit"] for stage in again["stages"])
    assert [r["acc"] for r in again["eval"]] == [r["acc"] for r in record["eval"]]
    assert "cache: wandb in an offline run reads the local cache only" in capsys.readouterr().err


class FolderRemote:
    """A stand-in for the W&B server: entries stored in and fetched from a folder."""

    def __init__(self, root: Path):
        self.root = root

    def store(self, key: str, entry: Path) -> None:
        shutil.copytree(entry, self.root / key, dirs_exist_ok=True)

    def fetch(self, key: str, folder: Path) -> bool:
        if not (self.root / key).exists():
            return False
        shutil.copytree(self.root / key, folder, dirs_exist_ok=True)
        return True


def test_an_entry_missing_locally_is_fetched_checked_and_a_damaged_one_recomputed(tmp_path):
    remote = FolderRemote(tmp_path / "server")
    here = StageCache(tmp_path / "here", remote=remote)
    here.put_stage("k1", lambda path: path.write_bytes(b"weights"), {"steps": 3})
    assert (tmp_path / "server" / "k1" / "manifest.json").exists()
    there = StageCache(tmp_path / "there", remote=remote)  # another machine, nothing local
    weights, summary = there.get_stage("k1")
    assert weights.read_bytes() == b"weights" and summary == {"steps": 3}
    assert (tmp_path / "there" / "k1" / "weights.safetensors").exists()  # published locally for the next reader
    assert there.get_stage("absent") is None
    (tmp_path / "server" / "k1" / "weights.safetensors").write_bytes(b"tampered")
    third = StageCache(tmp_path / "third", remote=remote)
    with pytest.warns(UserWarning, match="fails its checksums"):
        assert third.get_stage("k1") is None
    assert not any((tmp_path / "third").iterdir())  # nothing damaged is kept


def test_cache_wandb_with_wandb_disabled_is_one_clear_line(smoke_config, capsys):
    args = ["chain", "--config", "sweeps/configs/smoke.yaml", f"--out={smoke_config.out}", "--cache=wandb"]
    assert main([*args, "--wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache: wandb keeps the stage cache as artifacts" in err[0]
    assert not Path(smoke_config.out).exists()
