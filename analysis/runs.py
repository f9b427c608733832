"""Read run records written by ``chainforget chain`` into tidy frames (one row per run x stage x task x group)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from chainforget.errors import DataError
from chainforget.records import read_record


def load_records(root: str | Path) -> list[dict]:
    """Every run record under ``root`` (a run directory or a directory of them), sorted by run name."""
    root = Path(root)
    paths = [root] if (root / "run.json").exists() else sorted(p.parent for p in root.glob("*/run.json"))
    if not paths:
        raise DataError(f"{root}: no run.json found (expected a run directory or a directory of runs)")
    return sorted((read_record(p) for p in paths), key=lambda r: r["run_name"])


def order_label(record: dict) -> str:
    return " → ".join(record["config"]["order"])


def evals_frame(records: list[dict]) -> pd.DataFrame:
    """Eval-matrix rows of every run, with ``run_name`` and ``order``; ``acc_pp`` in percentage points."""
    frames = [pd.DataFrame(r["eval"]).assign(run_name=r["run_name"], order=order_label(r)) for r in records]
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(acc_pp=100.0 * frame["acc"])


def forgetting_frame(records: list[dict]) -> pd.DataFrame:
    """Forgetting rows (F, BF in pp, with interval bounds) of every run, with ``run_name`` and ``order``."""
    rows = []
    for record in records:
        for row in record["metrics"]["forgetting"]:
            f_ci, bf_ci = row["F_ci"] or (None, None), row["BF_ci"] or (None, None)
            rows.append({**row, "F_lo": f_ci[0], "F_hi": f_ci[1], "BF_lo": bf_ci[0], "BF_hi": bf_ci[1],
                         "run_name": record["run_name"], "order": order_label(record)})  # fmt: skip
    columns = ["run_name", "order", "task", "group_kind", "group", "n", "F", "F_lo", "F_hi", "BF", "BF_lo", "BF_hi", "small"]
    return pd.DataFrame(rows, columns=columns)
