"""Run sources -> the same tidy frames, whatever the source.

``load_runs(source)`` takes
- a local directory written by ``chainforget chain`` (a run directory or any directory above run directories);
- ``wandb-offline:<dir>``: offline W&B runs (``offline-run-*``) found under ``<dir>``, read from each run's
  files folder;
- ``wandb:<entity>/<project>``: the W&B Public API (``wandb.Api().runs``), with optional filters, reading each
  run's ``run.json`` and (lazily) ``predictions.parquet`` run files into a local cache, so a notebook re-run
  does not refetch.

W&B runs without a ``run.json`` run file (a crashed chain, a pruned Optuna trial, a ``chainforget fit`` run, any
other run of the project) are skipped and listed in ``Runs.skipped``, with one warning.

Runs are pooled across seeds only within a **condition**: runs whose resolved configs are identical apart from
``seed`` and the keys in ``NON_RESULT_KEYS``. A condition's label is its order plus the config keys that vary
across the loaded runs, e.g. ``bbq → csqa (train.lr=0.001)``; every frame, table and figure is keyed by it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from chainforget.config import complete_config
from chainforget.errors import DataError
from chainforget.records import EXAMPLE_FORGETTING, NON_RESULT_KEYS, flat_config, load_record, read_record

# Config keys (and key prefixes) that never change a run's numbers: its name, where its files go, the stage cache
# (content-addressed: a hit restores the weights the same stage would train), W&B bookkeeping, and how often it logs
# or checkpoints. Every other key, data paths and eval batch size included, is part of the run's condition, except
# where ``inactive_keys`` finds it cannot act (a knob of a mitigation the run does not use, say).
SKIPPED_COLUMNS = ["id", "name", "state", "reason", "where"]


@dataclass
class Runs:
    """``runs``: one row per run (``condition``, ``seed``, the config keys that vary across the runs, then the whole
    config flattened to dotted columns and the environment); ``evals``: one row per run x stage x task x group;
    ``skipped``: the W&B runs that have no run record (id, name, W&B state, reason, where). ``predictions()``
    reads the per-example tables only when asked."""

    records: list[dict]
    runs: pd.DataFrame
    evals: pd.DataFrame
    _predictions: dict[str, Callable[[], Path | None]] = field(default_factory=dict, repr=False)
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))

    def predictions(self, run_names: list[str] | None = None) -> pd.DataFrame:
        """One row per run x stage x example (fetched on first use for W&B sources); a DataError names the runs
        whose source has no ``predictions.parquet`` (e.g. the committed findings keep only run records)."""
        names = run_names or list(self._predictions)
        paths = {name: self._predictions[name]() for name in names}
        missing = [name for name, path in paths.items() if path is None or not path.exists()]
        if missing:
            raise DataError(f"no predictions.parquet for run(s) {', '.join(missing)}")
        frames = [pd.read_parquet(path).assign(run_name=name) for name, path in paths.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def select(self, keep: Callable[[dict], bool]) -> Runs:
        """The runs whose record ``keep`` accepts; conditions are labelled afresh over them."""
        records = [record for record in self.records if keep(record)]
        return Runs(records, runs_frame(records), evals_frame(records), self._predictions, self.skipped)


def inactive_keys(record: dict) -> tuple[str, ...]:
    """Key prefixes of the settings that cannot act in this run: the tasks the chain neither trains nor probes
    (the record's ``tasks`` are the ones it evaluated), the mitigation knobs its mitigation does not read, LoRA's
    with full fine-tuning, and curvature's when it is off."""
    config = record["config"]
    prefixes = [f"tasks.{name}" for name in config.get("tasks", {}) if name not in record["tasks"]]
    mitigation, curvature = config.get("mitigation", {}), config.get("curvature", {})
    knobs = record["mitigation"]["knobs"]
    prefixes += [f"mitigation.{key}" for key in mitigation if key != "name" and key not in knobs]
    if not curvature.get("enabled", False):
        prefixes += [f"curvature.{key}" for key in curvature if key != "enabled"]
    if config.get("model", {}).get("finetune") == "full":
        prefixes.append("model.lora")
    return tuple(prefixes)


def result_config(record: dict, leave_out: tuple[str, ...] = ()) -> dict:
    """The settings that determine the run's results: its config flattened to dotted keys (lists as tuples)
    without ``seed``, ``NON_RESULT_KEYS``, the ``inactive_keys`` and the keys (or prefixes) in ``leave_out``."""
    config = complete_config(record["config"])  # a run written before a setting existed ran with its default
    return flat_config(config, ("seed", *NON_RESULT_KEYS, *inactive_keys(record), *leave_out))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def _acts(key: str, record: dict, inactive: tuple[str, ...]) -> bool:
    """Whether ``key`` can act in this run: not an ``inactive_keys`` prefix, nor a setting of a task the chain never
    loaded (one its config does not even name, e.g. another pair's task in a study of several pairs)."""
    parts = key.split(".")
    if parts[0] == "tasks" and len(parts) > 1 and parts[1] not in record["tasks"]:
        return False
    return not _under(key, inactive)


UNSET = "unset"  # how a key that one run's config lacks (e.g. written by an older version) shows in labels


def varying_keys(records: list[dict], leave_out: tuple[str, ...] = ()) -> list[str]:
    """The result-relevant config keys, other than ``order``, whose value differs between the runs where the key
    can act, in config order."""
    configs = [result_config(record, leave_out) for record in records]
    inactive = [inactive_keys(record) for record in records]

    def values(key: str) -> set[str]:
        return {repr(c.get(key, UNSET)) for c, r, off in zip(configs, records, inactive) if _acts(key, r, off)}

    return [key for key in dict.fromkeys(k for c in configs for k in c) if key != "order" and len(values(key)) > 1]


def condition_labels(records: list[dict], leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """Run name -> condition label: the order, then the varying keys that act in this run with its values
    (``bbq → csqa (train.lr=0.001, mitigation.name=l2sp, mitigation.strength=0.1)``). Two runs share a label exactly
    when their result configs are identical: a key only shows where it acts, and whether it acts depends on keys
    that show. With ``"order"`` in ``leave_out`` the label is the settings alone ("" when nothing else varies), e.g.
    to pair the two orders of one setting."""
    keys = varying_keys(records, leave_out)
    labels = {}
    for record in records:
        config, inactive = result_config(record, leave_out), inactive_keys(record)
        shown = [key for key in keys if _acts(key, record, inactive)]
        settings = ", ".join(f"{key}={_show(config.get(key, UNSET))}" for key in shown)
        order = "" if "order" in leave_out else " → ".join(record["config"]["order"])
        labels[record["run_name"]] = f"{order} ({settings})" if order and settings else order or settings
    return labels


def _show(value) -> str:
    """A config value as YAML writes it: ``null``, ``true``, ``[q_proj, v_proj]``, ``0.001``."""
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_show, value)) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def runs_frame(records: list[dict]) -> pd.DataFrame:
    labels, keys = condition_labels(records), varying_keys(records)
    rows = []
    for record in records:
        name, config = record["run_name"], result_config(record)
        row = {"run_name": name, "condition": labels[name], "seed": record["config"]["seed"]}
        row |= {key: config.get(key) for key in keys} | {"stages": len(record["stages"])}  # the full config follows
        row.update(pd.json_normalize(record["config"], sep=".").iloc[0].to_dict())
        row.update({f"env.{k}": v for k, v in record["environment"].items() if not isinstance(v, dict)})
        rows.append(row)
    return pd.DataFrame(rows)


def evals_frame(records: list[dict]) -> pd.DataFrame:
    """Eval-matrix rows of every run, with ``run_name``, ``condition``, ``order`` and ``seed``; ``acc_pp`` in
    percentage points."""
    labels = condition_labels(records)
    frames = [
        pd.DataFrame(r["eval"]).assign(
            run_name=r["run_name"],
            condition=labels[r["run_name"]],
            order=" → ".join(r["config"]["order"]),
            seed=r["config"]["seed"],
        )
        for r in records
    ]
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(acc_pp=100.0 * frame["acc"])


FORGETTING_COLUMNS = [
    *("run_name", "condition", "order", "seed", "task", "group_kind", "group", "n"),
    *("F", "F_lo", "F_hi", "BF", "BF_lo", "BF_hi", "small"),
]


def _metric_rows(records: list[dict], metric: str) -> list[dict]:
    """The rows of ``record["metrics"][metric]`` of every run (none where a run's record lacks them), each with the
    run's ``run_name``, ``condition``, ``order`` and ``seed``."""
    labels = condition_labels(records)
    rows = []
    for record in records:
        name, config = record["run_name"], record["config"]
        run = {"run_name": name, "condition": labels[name], "order": " → ".join(config["order"])}
        rows += [{**row, **run, "seed": config["seed"]} for row in record["metrics"].get(metric, [])]
    return rows


def forgetting_frame(records: list[dict]) -> pd.DataFrame:
    """Forgetting rows (F, BF in pp, with interval bounds) of every run, with ``run_name``, ``condition``,
    ``order`` and ``seed``."""
    rows = []
    for row in _metric_rows(records, "forgetting"):
        f_ci, bf_ci = row["F_ci"] or (None, None), row["BF_ci"] or (None, None)
        rows.append({**row, "F_lo": f_ci[0], "F_hi": f_ci[1], "BF_lo": bf_ci[0], "BF_hi": bf_ci[1]})
    return pd.DataFrame(rows, columns=FORGETTING_COLUMNS)


EXAMPLE_FORGETTING_COLUMNS = [
    *("run_name", "condition", "order", "seed", "task", "trained_stage", "later_stage", "group_kind", "group", "n"),
    *EXAMPLE_FORGETTING,
    "small",
]


def example_forgetting_frame(records: list[dict]) -> pd.DataFrame:
    """Per-example forgetting rows (``forgotten``, ``learned``, ``expected_flip`` and the chance-adjusted
    ``forgotten_adj``, ``learned_adj``, in pp) of every run whose record has them, with ``run_name``, ``condition``,
    ``order`` and ``seed``; empty for records written before they were measured."""
    return pd.DataFrame(_metric_rows(records, "example_forgetting"), columns=EXAMPLE_FORGETTING_COLUMNS)


def load_records(root: str | Path) -> list[dict]:
    """Every run record under a local directory (a run directory or any directory above run directories)."""
    return sorted(_local_runs(Path(root))[0], key=lambda r: r["run_name"])


# what a source adapter returns: records, run name -> where its predictions are (None: nowhere), skipped runs
Loaded = tuple[list[dict], dict[str, Callable[[], Path | None]], list[dict]]


def _local_runs(root: Path) -> Loaded:
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
    return records, predictions, []


def _offline_runs(root: Path) -> Loaded:
    """Every ``offline-run-*`` folder under ``root``: its ``files/run.json``, or, without one, a skipped row made
    from its transaction log."""
    from analysis.wandb_logs import run_metadata

    if not root.exists():
        raise DataError(f"{root}: no such directory")
    folders = sorted(p for p in root.rglob("offline-run-*") if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no offline W&B run found (expected wandb/offline-run-*/ folders)")
    records, predictions, skipped = [], {}, []
    for folder in folders:
        files = folder / "files"
        if (files / "run.json").exists():
            record = read_record(files)
            records.append(record)
            predictions[record["run_name"]] = lambda files=files: files / "predictions.parquet"
            continue
        meta = run_metadata(folder)
        reason = skip_reason(meta["job_type"], meta["summary"].get("stopped"))
        skipped.append(dict(zip(SKIPPED_COLUMNS, (meta["id"], meta["name"], meta["state"], reason, str(folder)))))
    return records, predictions, skipped


def skip_reason(job_type: str | None, stopped: str | None) -> str:
    """Why a W&B run has no run record, from its job type and the ``stopped`` summary key of a chain ended on
    purpose (``lightning_modules.chain.ChainStopped``, e.g. a pruned Optuna trial)."""
    if job_type != "chain":
        return f"not a chainforget chain (job type {job_type or 'unset'})"
    if stopped:
        return f"chain stopped early ({stopped})"
    return "chain ended without a run record (see state)"


def _api_runs(path: str, api, cache_dir: Path, filters: dict | None) -> Loaded:
    """The W&B Public API adapter: ``api.runs(path, filters=...)``; each run's files fetched once into ``cache_dir``."""
    try:
        remote_runs = list(api.runs(path, filters=filters or {}))
    except Exception as exc:  # the API raises its own types for unknown projects and network errors
        raise DataError(f"wandb:{path}: cannot list runs ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    if not remote_runs:
        raise DataError(f"wandb:{path}: no runs match the filters {filters or {}}")
    records, predictions, skipped = [], {}, []
    for remote in remote_runs:

        def fetch(name: str, remote=remote, folder=cache_dir / remote.id) -> Path | None:
            """The run file, downloaded on first use; None when the run has no file by that name."""
            target = folder / name
            if not target.exists():
                try:
                    file = remote.file(name)
                except Exception as exc:
                    if _missing_file(exc):
                        return None
                    raise
                file.download(root=str(folder), replace=True).close()  # it returns the file, opened
            return target

        local = fetch("run.json")
        if local is None:
            stopped = remote.summary.get("stopped") if "stopped" in (remote.tags or []) else None
            reason = skip_reason(getattr(remote, "job_type", None), stopped)
            where = f"{path}/{remote.id}"
            skipped.append(dict(zip(SKIPPED_COLUMNS, (remote.id, remote.name, remote.state, reason, where))))
            continue
        try:
            record = json.loads(local.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"wandb:{path}/{remote.id}/run.json: not a valid run record ({exc})") from None
        record = load_record(record, f"wandb:{path}/{remote.id}/run.json")
        records.append(record)
        predictions[record["run_name"]] = lambda fetch=fetch: fetch("predictions.parquet")
    return records, predictions, skipped


def _missing_file(exc: Exception) -> bool:
    """``wandb.apis.public.Run.file(name)`` takes the first of the run's files by that name: without one it raises
    IndexError, which wandb's ``normalize_exceptions`` wraps in a CommError (unless ``WANDB_DEBUG`` is set)."""
    return isinstance(exc, IndexError) or isinstance(getattr(exc, "exc", None), IndexError)


def load_runs(
    source: str | Path, *, filters: dict | None = None, api=None, cache_dir: str | Path | None = None
) -> Runs:
    """Load runs from a local directory, ``wandb-offline:<dir>`` or ``wandb:<entity>/<project>``.

    For W&B, ``filters`` is a W&B API filter (e.g. ``{"sweep": "<id>"}``, ``{"group": "demo"}``,
    ``{"tags": {"$in": ["paper"]}}``, ``{"config.seed": 0}``); ``api`` defaults to ``wandb.Api()``. W&B runs without
    a run record are skipped with one warning and listed in ``Runs.skipped``; a DataError if no run has one.
    """
    text = str(source)
    if text.startswith("wandb:"):
        import wandb

        from chainforget.tasks.downloads import cache_root

        path = text.removeprefix("wandb:")
        cache = Path(cache_dir) if cache_dir else cache_root() / "analysis" / path.replace("/", "_")
        try:
            records, predictions, skipped = _api_runs(path, api or wandb.Api(), cache, filters)
        except (wandb.errors.Error, OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            advice = "check the entity/project name, the network and `wandb login`"
            raise DataError(f"{text}: could not read runs from W&B ({reason}); {advice}") from None
    elif text.startswith("wandb-offline:"):
        records, predictions, skipped = _offline_runs(Path(text.removeprefix("wandb-offline:")))
    else:
        records, predictions, skipped = _local_runs(Path(text))
    skipped = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    if not records:
        reasons = "; ".join(f"{count} × {reason}" for reason, count in skipped["reason"].value_counts().items())
        raise DataError(f"{text}: none of the {len(skipped)} runs has a run.json run file ({reasons})")
    if len(skipped):
        warnings.warn(
            f"{text}: skipped {len(skipped)} of {len(records) + len(skipped)} runs that have no run.json run file "
            "(crashed or stopped chains, runs that are not chains); Runs.skipped lists them with the reason",
            stacklevel=2,
        )
    records, repeats = drop_repeats(sorted(records, key=lambda r: r["run_name"]))
    if repeats:
        warnings.warn(
            f"{text}: {len(repeats)} runs repeat another run's settings and seed (e.g. two sweeps into one folder) and "
            "were left out, so that a seed counts once; Runs.skipped lists them",
            stacklevel=2,
        )
        skipped = pd.concat([skipped, pd.DataFrame(repeats, columns=SKIPPED_COLUMNS)], ignore_index=True)
    return Runs(records, runs_frame(records), evals_frame(records), predictions, skipped)


def drop_repeats(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """The records without those that repeat an earlier one's settings (``result_config``) and seed, and a
    skipped row for each repeat: intervals over seeds would otherwise count one seed twice (zero-width bands)."""
    kept, first, repeats = [], {}, []
    for record in records:
        key = (json.dumps(result_config(record), sort_keys=True, default=str), record["config"]["seed"])
        if key in first:
            reason = f"repeats {first[key]} (same settings and seed)"
            repeats.append(
                {
                    "id": record["run_name"],
                    "name": record["run_name"],
                    "state": "finished",
                    "reason": reason,
                    "where": "",
                }
            )
        else:
            first[key] = record["run_name"]
            kept.append(record)
    return kept, repeats
