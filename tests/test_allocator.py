"""The command re-executes itself on tcmalloc (chainforget.allocator); its run records say which allocator ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chainforget import allocator

ROOT = Path(__file__).resolve().parents[1]
needs_tcmalloc = pytest.mark.skipif(
    allocator.tcmalloc_library() is None, reason="tcmalloc is not installed (Debian: libtcmalloc-minimal4)"
)
REPORT = (
    "from chainforget.allocator import reexec_on_tcmalloc, in_use; import os; reexec_on_tcmalloc(); "
    "print(in_use(), os.environ.get('LD_PRELOAD'))"
)


def report(**env) -> str:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.OPT_OUT, allocator.CALLER_PRELOAD)
    }
    done = subprocess.run(
        [sys.executable, "-c", REPORT], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@needs_tcmalloc
def test_the_process_continues_on_tcmalloc_and_its_children_get_the_callers_preload_back():
    assert report() == "tcmalloc None"
    assert report(LD_PRELOAD="libm.so.6") == "tcmalloc libm.so.6"


def test_opting_out_keeps_the_system_allocator():
    assert report(**{allocator.OPT_OUT: "system"}) == "system None"


def test_without_tcmalloc_the_process_goes_on_unchanged(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail("re-executed without a library"))
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    monkeypatch.delenv(allocator.CALLER_PRELOAD, raising=False)
    allocator.reexec_on_tcmalloc()


def test_a_failed_preload_does_not_re_execute_again(tmp_path):
    # the marker of the re-executed process is set, the library did not load: it must go on, not loop
    missing = str(tmp_path / "libtcmalloc_missing.so")
    assert report(LD_PRELOAD=missing, **{allocator.CALLER_PRELOAD: ""}) == "system None"


def chain_record(tmp_path: Path, name: str, **env) -> dict:
    command = [
        sys.executable,
        "-m",
        "chainforget.cli",
        "chain",
        "--config",
        "sweeps/configs/smoke.yaml",
        f"--run_name={name}",
        f"--out={tmp_path / 'runs'}",
        f"--cache_dir={tmp_path / name}",
        "--wandb.mode=disabled",
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.OPT_OUT)}
    subprocess.run(
        command, env={**environment, "CHAINFORGET_THREADS": "1", **env}, cwd=ROOT, check=True, capture_output=True
    )
    return json.loads((tmp_path / "runs" / name / "run.json").read_text())


@needs_tcmalloc
def test_a_chain_run_from_the_command_records_tcmalloc_and_trains_exactly_as_on_the_system_malloc(tmp_path):
    fast = chain_record(tmp_path, "tcmalloc")
    system = chain_record(tmp_path, "system", **{allocator.OPT_OUT: "system"})
    assert (fast["environment"]["allocator"], system["environment"]["allocator"]) == ("tcmalloc", "system")
    assert [s["train"]["final_loss"] for s in fast["stages"][1:]] == [
        s["train"]["final_loss"] for s in system["stages"][1:]
    ]
    assert fast["eval"] == system["eval"]


RELEASE = """
import gc, sys
import torch
from chainforget import allocator

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

blocks = [torch.ones(64, 1024, 1024) for _ in range(4)]  # 1 GB, touched
del blocks
gc.collect()
held = rss_mb()
allocator.release_free_memory()
print(allocator.in_use(), held, rss_mb())
"""


@needs_tcmalloc
@pytest.mark.parametrize("side", ["tcmalloc", "system"])
def test_released_memory_leaves_the_process_on_either_allocator(side):
    env = dict(os.environ)
    if side == "tcmalloc":
        env["LD_PRELOAD"] = allocator.tcmalloc_library()
    done = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, check=True)
    used, held, after = done.stdout.split()
    assert used == side and int(after) <= int(held)
    if side == "tcmalloc":  # tcmalloc keeps the freed gigabyte for reuse until asked to give it back
        assert int(held) - int(after) > 700
