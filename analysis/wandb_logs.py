"""What an offline W&B run's transaction log (``offline-run-*/run-<id>.wandb``) says about the run, read by the
installed wandb's own reader: ``wandb leet inspect --json`` (wandb 0.31 reads these logs in its Go core; the
Python ``DataStore`` of earlier releases is gone, and its private modules keep moving)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chainforget.errors import DataError


def log_records(run_dir: Path) -> list[dict]:
    """The records of an offline run's transaction log, in order, as wandb prints them. A log cut short (a
    process killed mid-write) yields what came before the cut."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"{run_dir}: wandb could not read the run's log ({exc})") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"{run_dir}: `wandb leet inspect` could not read the run's log ({reason}); it needs wandb >= 0.31"
        )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def run_metadata(run_dir: Path) -> dict:
    """``id``, ``name``, ``project``, ``group``, ``job_type``, ``tags``, ``summary`` (top-level keys) and ``state`` of
    an offline run: ``finished`` or ``failed`` by its exit code, ``unfinished`` without an exit record (still
    running, or killed)."""
    meta = {"id": run_dir.name.rsplit("-", 1)[-1], "tags": [], "summary": {}, "state": "unfinished"}
    meta |= dict.fromkeys(("name", "project", "group", "job_type"))
    for record in log_records(run_dir):
        kind = record.get("type")
        if kind == "run":  # the first run record opens the run, later ones update it (e.g. new tags)
            run = record["run"]
            fields = {"id": "run_id", "name": "display_name", "project": "project", "group": "run_group"}
            meta |= {key: run[field] for key, field in {**fields, "job_type": "job_type"}.items() if run.get(field)}
            meta["tags"] = list(run.get("tags") or meta["tags"])
        elif kind == "summary":
            update = record["summary"].get("update", {})
            meta["summary"] |= {key: value for key, value in update.items() if not key.startswith("_wandb.")}
        elif kind == "exit":
            meta["state"] = "finished" if record["exit"].get("exit_code", 0) == 0 else "failed"
    return meta
