import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Sweep tests run `chainforget` as a subprocess, as `wandb agent` would: it lives beside this interpreter.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory, so nothing leaks between tests or into the user's cache."""
    monkeypatch.setenv("CHAINFORGET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def smoke_config(tmp_path, monkeypatch):
    """sweeps/configs/smoke.yaml (tiny model, fixtures) writing into this test's temporary directory."""
    from chainforget.config import parse_chain

    monkeypatch.chdir(ROOT)  # the smoke config names fixture paths relative to the repository root
    return parse_chain(
        ["--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'stages'}"],
        prog="test",
    )


def wandb_inspect(run_dir: Path, summary: bool = False):
    """An offline W&B run read back by the installed wandb's own reader of its transaction log
    (``wandb leet inspect --json``): the summary object, or the list of records."""
    wandb = Path(sys.executable).with_name("wandb")
    done = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", *(["--summary"] if summary else []), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout) if summary else [json.loads(line) for line in done.stdout.splitlines() if line]


def wandb_summary(run_dir: Path) -> dict:
    """State, exit code, project, tags, config and summary of an offline W&B run (wandb's own reader)."""
    return wandb_inspect(run_dir, summary=True)


def wandb_run_record(run_dir: Path) -> dict:
    """The run record of an offline W&B run (project, group, sweep id, ...), read by wandb's own reader."""
    return next(record["run"] for record in wandb_inspect(run_dir) if record.get("type") == "run")
