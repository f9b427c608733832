"""Secrets never reach outputs, and user files are never unpickled."""

import re
from dataclasses import replace
from pathlib import Path

from conftest import ROOT

from lightning_modules.chain import run_chain

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"


def test_a_wandb_key_and_hub_token_in_the_environment_appear_in_no_output_file(smoke_config, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_KEY[::-1])
    record = run_chain(
        replace(smoke_config, run_name="secret", train=replace(smoke_config.train, steps=2)), progress=False
    )
    run_dir = Path(smoke_config.out) / record["run_name"]
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "run.json" for p in files)
    for path in files:
        content = path.read_bytes()
        assert FAKE_KEY.encode() not in content and FAKE_KEY[::-1].encode() not in content, path


def test_no_pickle_on_any_load_path():
    sources = [p for folder in ("src", "lightning_modules", "analysis") for p in (ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "yaml.load(" not in text, path
        # torch.load only with PyTorch's weights-only unpickler (tensors and plain values, no code): Lightning's
        # metadata of a sharded checkpoint
        loads = re.findall(r"torch\.load\(([^)]*)\)", text)
        assert all("weights_only=True" in arguments for arguments in loads), path
