import os
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
    from chainforget.cli import parse_chain

    monkeypatch.chdir(ROOT)  # the smoke config names fixture paths relative to the repository root
    return parse_chain(
        ["--config", "sweeps/configs/smoke.yaml", f"--out={tmp_path / 'runs'}", f"--cache_dir={tmp_path / 'stages'}"],
        prog="test",
    )
