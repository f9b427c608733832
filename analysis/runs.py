"""Run sources -> the same tidy frames, whatever the source.

``load_runs(source)`` takes
- a local directory written by ``chainforget chain`` (a run directory or any directory above run directories);
- ``wandb-offline:<dir>``: offline W&B runs (``offline-run-*``) found under ``<dir>``, read from each run's
  files folder;
- ``wandb:<entity>/<project>``: the W&B Public API (``wandb.Api().runs``), with optional filters, reading each
  run's ``run.json`` and (lazily) ``predictions.parquet`` run files into a local cache, so a notebook re-run
  does not refetch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from chainforget.errors import DataError
from chainforget.records import read_record, validate_record


@dataclass
class Runs:
    """``runs``: one row per run (config flattened to dotted columns, environment); ``evals``: one row per
    run x stage x task x group. ``predictions()`` reads the per-example tables only when asked."""

    records: list[dict]
    runs: pd.DataFrame
    evals: pd.DataFrame
    _predictions: dict[str, Callable[[], Path]] = field(default_factory=dict, repr=False)

    def predictions(self, run_names: list[str] | None = None) -> pd.DataFrame:
        """One row per run x stage x example (fetched on first use for W&B sources)."""
        names = run_names or list(self._predictions)
        frames = [pd.read_parquet(self._predictions[name]()).assign(run_name=name) for name in names]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def order_label(record: dict) -> str:
    """``bbq → csqa``, with the mitigation when there is one (``bbq → csqa (replay_stage 0.05)``), so runs of one
    order with and without a mitigation are never pooled."""
    label = " → ".join(record["config"]["order"])
    mitigation = record["config"].get("mitigation") or {}
    if mitigation.get("name", "none") != "none":
        label += f" ({mitigation['name']} {mitigation['strength']:g})"
    return label


def runs_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for record in records:
        row = {"run_name": record["run_name"], "order": order_label(record), "stages": len(record["stages"])}
        row.update(pd.json_normalize(record["config"], sep=".").iloc[0].to_dict())
        row.update({f"env.{k}": v for k, v in record["environment"].items() if not isinstance(v, dict)})
        rows.append(row)
    return pd.DataFrame(rows)


def evals_frame(records: list[dict]) -> pd.DataFrame:
    """Eval-matrix rows of every run, with ``run_name``, ``order`` and ``seed``; ``acc_pp`` in percentage points."""
    frames = [
        pd.DataFrame(r["eval"]).assign(run_name=r["run_name"], order=order_label(r), seed=r["config"]["seed"])
        for r in records
    ]
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(acc_pp=100.0 * frame["acc"])


def forgetting_frame(records: list[dict]) -> pd.DataFrame:
    """Forgetting rows (F, BF in pp, with interval bounds) of every run, with ``run_name``, ``order``, ``seed``."""
    rows = []
    for record in records:
        for row in record["metrics"]["forgetting"]:
            f_ci, bf_ci = row["F_ci"] or (None, None), row["BF_ci"] or (None, None)
            rows.append({**row, "F_lo": f_ci[0], "F_hi": f_ci[1], "BF_lo": bf_ci[0], "BF_hi": bf_ci[1],
                         "run_name": record["run_name"], "order": order_label(record), "seed": record["config"]["seed"]})  # fmt: skip
    columns = ["run_name", "order", "seed", "task", "group_kind", "group", "n", "F", "F_lo", "F_hi", "BF", "BF_lo", "BF_hi", "small"]
    return pd.DataFrame(rows, columns=columns)


def load_records(root: str | Path) -> list[dict]:
    """Every run record under a local directory (a run directory or any directory above run directories)."""
    return sorted(_local_runs(Path(root))[0], key=lambda r: r["run_name"])


def _local_runs(root: Path) -> tuple[list[dict], dict[str, Callable[[], Path]]]:
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if (root / "run.json").exists():
        folders = [root]
    else:  # run.json copies inside W&B run folders belong to the wandb-offline source
        folders = sorted(p.parent for p in root.rglob("run.json") if "wandb" not in p.relative_to(root).parts)
    if not folders:
        raise DataError(f"{root}: no run.json found (expected a run directory or a directory of runs)")
    records, predictions = [], {}
    for folder in folders:
        record = read_record(folder)
        records.append(record)
        predictions[record["run_name"]] = lambda folder=folder: folder / "predictions.parquet"
    return records, predictions


def _offline_runs(root: Path) -> tuple[list[dict], dict[str, Callable[[], Path]]]:
    files = sorted(root.rglob("offline-run-*/files/run.json"))
    if not files:
        raise DataError(f"{root}: no offline W&B run with a run.json (expected wandb/offline-run-*/files/run.json)")
    records, predictions = [], {}
    for path in files:
        record = read_record(path.parent)
        records.append(record)
        predictions[record["run_name"]] = lambda folder=path.parent: folder / "predictions.parquet"
    return records, predictions


def _api_runs(path: str, api, cache_dir: Path, filters: dict | None) -> tuple[list[dict], dict[str, Callable[[], Path]]]:
    """The W&B Public API adapter: ``api.runs(path, filters=...)``; each run's files fetched once into ``cache_dir``."""
    try:
        remote_runs = list(api.runs(path, filters=filters or {}))
    except Exception as exc:  # the API raises its own types for unknown projects and network errors
        raise DataError(f"wandb:{path}: cannot list runs ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    records, predictions = [], {}
    for remote in remote_runs:
        folder = cache_dir / remote.id

        def fetch(name: str, remote=remote, folder=folder) -> Path:
            target = folder / name
            if not target.exists():
                remote.file(name).download(root=str(folder), replace=True)
            return target

        try:
            record = json.loads(fetch("run.json").read_text(encoding="utf-8"))
        except Exception as exc:  # a run without the file (crashed, or not a chainforget run)
            raise DataError(f"wandb:{path}/{remote.id}: no readable run.json run file ({type(exc).__name__}: {exc})") from None
        validate_record(record, f"wandb:{path}/{remote.id}/run.json")
        records.append(record)
        predictions[record["run_name"]] = lambda fetch=fetch: fetch("predictions.parquet")
    if not records:
        raise DataError(f"wandb:{path}: no runs match the filters {filters or {}}")
    return records, predictions


def load_runs(
    source: str | Path, *, filters: dict | None = None, api=None, cache_dir: str | Path | None = None
) -> Runs:
    """Load runs from a local directory, ``wandb-offline:<dir>`` or ``wandb:<entity>/<project>``.

    For W&B, ``filters`` is a W&B API filter (e.g. ``{"sweep": "<id>"}``, ``{"group": "demo"}``,
    ``{"tags": {"$in": ["paper"]}}``, ``{"config.seed": 0}``); ``api`` defaults to ``wandb.Api()``.
    """
    text = str(source)
    if text.startswith("wandb:"):
        import wandb

        from chainforget.tasks.sources import cache_root

        path = text.removeprefix("wandb:")
        cache = Path(cache_dir) if cache_dir else cache_root() / "analysis" / path.replace("/", "_")
        try:
            records, predictions = _api_runs(path, api or wandb.Api(), cache, filters)
        except (wandb.errors.Error, OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{text}: could not read runs from W&B ({reason}); check the entity/project name, the network and `wandb login`") from None
    elif text.startswith("wandb-offline:"):
        records, predictions = _offline_runs(Path(text.removeprefix("wandb-offline:")))
    else:
        records, predictions = _local_runs(Path(text))
    records = sorted(records, key=lambda r: r["run_name"])
    return Runs(records, runs_frame(records), evals_frame(records), predictions)
