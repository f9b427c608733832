"""The run record (``run.json`` + ``predictions.parquet``), atomic writes, and the stage cache."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jsonschema
import pandas as pd

from chainforget import allocator
from chainforget.errors import ConfigError, DataError, WriteError
from chainforget.metrics import PP
from chainforget.tasks.downloads import file_sha256

SCHEMA_VERSION = 3  # 2: what each stage trains and replays, each task's role and training stage; 3: mitigation
CACHE_VERSION = 2  # 2: LoRA adapters initialised from the chain's seed
SCHEMA_PATH = Path(__file__).with_name("run_schema.json")
PACKAGES = ("chainforget", "torch", "lightning", "transformers", "peft", "wandb", "pandas", "numpy")


# Keys that say where a run is written or how it is logged, not what it computes: two configs that differ only in
# these (and, for analysis, in the seed) describe the same experiment.
NON_RESULT_KEYS = (
    "run_name",
    "out",
    "cache_dir",
    "cache",
    "wandb",
    "trainer.log_every_n_steps",
    "trainer.checkpoint_every",
    "train.gradient_checkpointing",  # recomputes activations instead of keeping them: the same gradients
)


def flat_config(config: dict, leave_out: tuple[str, ...] = NON_RESULT_KEYS) -> dict:
    """A config as dotted keys (lists as tuples), without the keys (or key prefixes) in ``leave_out``."""

    def flatten(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {
                key: leaf for name, item in value.items() for key, leaf in flatten(item, f"{prefix}{name}.").items()
            }
        return {prefix[:-1]: tuple(value) if isinstance(value, list) else value}

    return {
        key: value
        for key, value in flatten(config, "").items()
        if not any(key == cut or key.startswith(cut + ".") for cut in leave_out)
    }


def new_record(
    config: dict,
    environment: dict,
    stages: list,
    eval_rows: list,
    metrics: dict,
    tasks: dict,
    mitigation: dict,
    data: dict,
) -> dict:
    """A run record of this schema version (``run_schema.json``): the resolved config, the environment, what each
    stage trained and how (``stages``), the eval matrix rows, the derived metrics, the facts about each task
    (role, groups, training stage) and about the mitigation (kind, the knobs it reads), and each task's data
    (fingerprint, split sizes)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_name": config["run_name"],
        "config": config,
        "environment": environment,
        "stages": stages,
        "eval": eval_rows,
        "metrics": metrics,
        "tasks": tasks,
        "mitigation": mitigation,
        "data": data,
    }


def load_record(record: dict, where: str = "run.json") -> dict:
    """A run record as this version writes it: older records are upgraded (their facts derived from their
    config, as the runner of their time decided them), then validated."""
    if record.get("schema_version") == 1:
        record = upgrade_v1(record)
    if record.get("schema_version") == 2:
        record = upgrade_v2(record)
    validate_record(record, where)
    return record


def upgrade_v1(record: dict) -> dict:
    """Schema 1 -> 2: add each stage's ``trains``/``replays`` and the ``tasks`` facts, from the stage plan."""
    from chainforget import tasks
    from chainforget.config import CurvatureSpec, MitigationSpec
    from chainforget.plan import plan_stages, trained_at

    config = record["config"]

    def spec(kind, values: dict | None):  # the fields this version knows, from an older config block
        return kind(**{k: v for k, v in (values or {}).items() if k in kind.__dataclass_fields__})

    plans = plan_stages(
        config["order"],
        spec(MitigationSpec, config.get("mitigation")),
        spec(CurvatureSpec, config.get("curvature")),
        config["seed"],
    )
    stages = [
        {**stage, "trains": list(plan.trains), "replays": list(plan.replays)}
        for stage, plan in zip(record["stages"], plans)
    ]
    trained = trained_at(plans)
    names = dict.fromkeys(row["task"] for row in record["eval"])
    facts = {}
    for name in names:
        task = tasks.get(name)
        facts[name] = {"role": task.role, "group_kinds": list(task.group_kinds), "trained_stage": trained.get(name)}
    return {**record, "schema_version": 2, "stages": stages, "tasks": facts}


def upgrade_v2(record: dict) -> dict:
    """Schema 2 -> 3: add the ``mitigation`` facts."""
    from chainforget import mitigations

    name = record["config"].get("mitigation", {}).get("name", "none")
    return {**record, "schema_version": 3, "mitigation": mitigations.facts(name)}


def validate_record(record: dict, where: str = "run.json") -> None:
    """Raise a DataError naming the first field that breaks the run-record schema."""
    schema = json.loads(SCHEMA_PATH.read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(record))
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise DataError(f"{where}: field {field}: {error.message}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temp file in the same directory, fsync it, rename it over ``path``: readers see the old
    file or the new one, never part of one. A failed write (disk full, no permission) removes the temp file
    and raises a WriteError naming ``path``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteError(
            f"{path}: could not write ({exc.strerror or exc}); the previous file, if any, is unchanged"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_record(run_dir: Path, record: dict, predictions: pd.DataFrame) -> None:
    """Validate, then write predictions first and ``run.json`` last (its presence marks a complete run)."""
    validate_record(record, str(run_dir / "run.json"))
    atomic_write_parquet(predictions, run_dir / "predictions.parquet")
    atomic_write_text(run_dir / "run.json", json.dumps(record, indent=2, sort_keys=False, default=str))


# the families of summary names (``summary_metrics``), and those whose second part is a task
SUMMARY_FAMILIES = (
    "forgetting",
    "biased_forgetting",
    "final",
    "cl",
    "curvature",
    "scores",
    "example_forgetting",
    "learning",
)
TASK_FAMILIES = ("forgetting", "biased_forgetting", "final", "scores", "example_forgetting", "learning")
CL_METRICS = ("average_accuracy", "bwt", "fwt", "forgetting", "learning")  # metrics.cl_metrics; learning below


def check_summary_name(name: str, tasks: list[str], where: str) -> None:
    """A name ``summary_metrics`` can produce for a chain over ``tasks`` (a sweep or study objective); else one line
    starting with ``where``. Groups and scores are checked only as far as their task: they depend on the data."""
    family, _, rest = name.partition("/")
    if family not in SUMMARY_FAMILIES or not rest:
        raise ConfigError(f"{where}: {name!r} is not a summary metric; names start with {', '.join(SUMMARY_FAMILIES)}/")
    task = rest.split("/")[0]
    if family in TASK_FAMILIES and task not in tasks:
        raise ConfigError(f"{where}: {name!r} names task {task!r}, which the chain does not have ({', '.join(tasks)})")
    if family == "cl" and rest not in CL_METRICS:
        raise ConfigError(f"{where}: {name!r} is not a summary metric; cl/ has {', '.join(CL_METRICS)}")


def summary_metrics(record: dict) -> dict[str, float | str | None]:
    """The run's headline numbers under stable names: what W&B summaries hold and sweep objectives name.

    ``forgetting/<task>[/<group_kind>/<group>]``, ``biased_forgetting/<task>/<group_kind>`` (and ``.../worst_group``),
    ``example_forgetting/<task>[/<group_kind>/<group>]/<forgotten|learned|expected_flip|forgotten_adj|learned_adj>``,
    ``final/<task>/acc`` (last stage), ``learning/<task>`` (``metrics.learning``'s ``learned``) and
    ``learning/<task>/top_answer_share``, ``cl/<metric>`` (``cl/learning``: the mean ``learning/<task>``),
    ``curvature/stage<k>/top_eigenvalue`` and
    ``scores/<task>/<group_kind>/<group>/<score>`` (last stage). Everything but the eigenvalue is in percentage
    points, accuracies included, so one sweep metric never mixes scales.
    """
    metrics = record["metrics"]
    last = max(row["stage"] for row in record["eval"])
    summary: dict[str, float | str | None] = {}

    def group_name(row: dict) -> str:
        return row["task"] if row["group_kind"] == "all" else f"{row['task']}/{row['group_kind']}/{row['group']}"

    for row in metrics["forgetting"]:
        summary[f"forgetting/{group_name(row)}"] = row["F"]
    for row in metrics.get("example_forgetting", []):  # records written before it was measured have none
        for name in EXAMPLE_FORGETTING:
            summary[f"example_forgetting/{group_name(row)}/{name}"] = row[name]
    for row in metrics["biased_forgetting"]:
        summary[f"biased_forgetting/{row['task']}/{row['group_kind']}"] = row["BF"]
        summary[f"biased_forgetting/{row['task']}/{row['group_kind']}/worst_group"] = row["worst_group"]
    for row in record["eval"]:
        if row["stage"] == last and row["group_kind"] == "all":
            summary[f"final/{row['task']}/acc"] = PP * row["acc"]
    summary.update({f"cl/{name}": value for name, value in metrics["cl"].items()})
    for stage in record["stages"]:
        if stage["curvature"]:
            summary[f"curvature/stage{stage['index']}/top_eigenvalue"] = stage["curvature"]["top_eigenvalue"]
    learned = metrics.get("learning", [])  # records written before it was measured have none
    for row in learned:
        summary[f"learning/{row['task']}"] = row["learned"]
        summary[f"learning/{row['task']}/top_answer_share"] = PP * row["top_answer_share_trained"]
    if learned:  # what the chain's stages taught, shortcut-proof, over its trained tasks
        summary["cl/learning"] = sum(row["learned"] for row in learned) / len(learned)
    for row in metrics.get("task_scores", []):
        if row["stage"] == last:
            for name, value in score_values(row).items():
                summary[f"scores/{row['task']}/{row['group_kind']}/{row['group']}/{name}"] = value
    return summary


EXAMPLE_FORGETTING = ("forgotten", "learned", "expected_flip", "forgotten_adj", "learned_adj")  # pp, per example
FRACTION_SCORES = ("acc", "acc_ambig", "balanced_acc")  # task scores stored as fractions (bias scores are x100)


def score_values(row: dict) -> dict[str, float]:
    """The scores of a task-score row (s_dis, s_amb, balanced_acc, ...) in percentage points, without its counts
    and labels."""
    return {
        name: PP * value if name in FRACTION_SCORES else value
        for name, value in row.items()
        if isinstance(value, float) and not name.startswith("n_")
    }


def environment(device: str, threads: int) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": git_sha(),
        "device": device,
        "threads": threads,
        "allocator": allocator.in_use(),
    }


def git_sha() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def content_key(*parts: object) -> str:
    """A stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class StageCache:
    """Finished stages (and their evaluations) stored under a content hash.

    An entry is a directory written in a temp location and renamed into place, with a ``manifest.json``
    of file checksums that is verified on every read; a damaged entry is discarded with a warning. A stage's
    entry holds its trainable weights and its training summary, an evaluation's its predictions, a measurement
    of a stage (its curvature) one JSON object; only this class knows the file names.
    """

    WEIGHTS, SUMMARY, PREDICTIONS, MEASUREMENT = (
        "weights.safetensors",
        "stage.json",
        "predictions.parquet",
        "measurement.json",
    )

    def __init__(self, root: Path, read: bool = True, remote=None, write: bool = True):
        self.root = Path(root)
        self.read = read
        self.write = write  # False: puts store nothing (the ranks above 0 of a data-parallel chain)
        # a remote copy (``lightning_modules.tracking.ArtifactCache``): ``store(key, entry)`` after each put,
        # ``fetch(key, folder) -> bool`` for an entry the local cache lacks
        self.remote = remote

    @classmethod
    def at(cls, cache_dir: str | None, read: bool = True, remote=None, write: bool = True) -> StageCache:
        """The cache in ``cache_dir``, or the user cache directory's ``stages/`` when it is ``None``."""
        from chainforget.tasks.downloads import cache_root

        return cls(Path(cache_dir) if cache_dir else cache_root() / "stages", read=read, remote=remote, write=write)

    def get_stage(self, key: str) -> tuple[Path, dict] | None:
        """A finished stage: its weights file and its training summary, or ``None``."""
        entry = self.get(key)
        return None if entry is None else (entry / self.WEIGHTS, json.loads((entry / self.SUMMARY).read_text()))

    def put_stage(self, key: str, save_weights: Callable[[Path], None], summary: dict) -> None:
        def write(entry: Path) -> None:
            save_weights(entry / self.WEIGHTS)
            (entry / self.SUMMARY).write_text(json.dumps(summary))

        if self.write:
            self.put(key, write)

    def get_predictions(self, key: str) -> pd.DataFrame | None:
        entry = self.get(key)
        return None if entry is None else pd.read_parquet(entry / self.PREDICTIONS)

    def put_predictions(self, key: str, frame: pd.DataFrame) -> pd.DataFrame:
        """Store an evaluation's predictions; returns them as read back, as a later cache hit will see them."""
        if not self.write:
            return frame
        entry = self.put(key, lambda entry: frame.to_parquet(entry / self.PREDICTIONS, index=False))
        return pd.read_parquet(entry / self.PREDICTIONS)

    def get_measurement(self, key: str) -> dict | None:
        entry = self.get(key)
        return None if entry is None else json.loads((entry / self.MEASUREMENT).read_text())

    def put_measurement(self, key: str, measurement: dict) -> dict:
        """Store a measurement of a stage (its curvature); returns it as read back."""
        if not self.write:
            return measurement
        entry = self.put(key, lambda entry: (entry / self.MEASUREMENT).write_text(json.dumps(measurement)))
        return json.loads((entry / self.MEASUREMENT).read_text())

    def weights_for(self, init_from: str) -> Path:
        """The weights file behind a fit's ``model.init_from``: a ``.safetensors`` file, a chain's run directory
        (its last stage), a cache entry's directory, or a cache key."""
        path = Path(init_from).expanduser()
        if path.is_file():
            return path
        if (path / "run.json").exists():
            stages = read_record(path)["stages"]
            if not stages or "cache_key" not in stages[-1]:
                raise ConfigError(f"model.init_from {init_from}: the run record names no cached stage to start from")
            path = self.root / stages[-1]["cache_key"]
        elif not path.is_dir():
            path = self.root / init_from
        if not (path / self.WEIGHTS).exists():
            raise ConfigError(f"model.init_from {init_from}: no {self.WEIGHTS} at {path} (cache dir {self.root})")
        return path / self.WEIGHTS

    def get(self, key: str) -> Path | None:
        entry = self.root / key
        if not self.read:
            return None
        if not (entry / "manifest.json").exists() and not self.fetched(key):
            return None
        if not self.intact(entry):
            warnings.warn(f"stage cache entry {entry} is damaged; discarding it and recomputing", stacklevel=2)
            if self.write:  # a process that writes nothing leaves it to the one that does
                shutil.rmtree(entry, ignore_errors=True)
            return None
        return entry

    @staticmethod
    def intact(entry: Path) -> bool:
        """Every file the entry's manifest lists has the checksum it lists."""
        try:
            expected = json.loads((entry / "manifest.json").read_text())
            return all(file_sha256(entry / name) == digest for name, digest in expected.items())
        except (OSError, ValueError):
            return False

    def fetched(self, key: str) -> bool:
        """Whether the remote copy had the entry: downloaded beside the cache, checked against its own manifest,
        then published as a local entry (a damaged download is discarded, and the entry recomputed)."""
        if self.remote is None:
            return False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}.remote."))
        except OSError:
            return False
        try:
            if not self.remote.fetch(key, tmp):
                return False
            if not self.intact(tmp):
                warnings.warn(f"stage cache entry {key} from the remote cache fails its checksums; recomputing it")
                return False
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another process published the same entry meanwhile: theirs stays
                pass
            return (self.root / key / "manifest.json").exists()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def put(self, key: str, write: Callable[[Path], None]) -> Path:
        """Call ``write(tmp_dir)`` to fill a new entry, then publish it atomically."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_abandoned()
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}."))
        except OSError as exc:
            raise WriteError(f"{self.root}: could not create a stage cache entry ({exc.strerror or exc})") from None
        try:
            write(tmp)
            digests = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / "manifest.json").write_text(json.dumps(digests, indent=1))
            entry = self.root / key
            if entry.exists() and not self.read:  # recomputed on request: replace the old entry
                shutil.rmtree(entry, ignore_errors=True)
            if entry.exists():  # another worker finished the same stage first: keep theirs
                shutil.rmtree(tmp)
            else:
                try:
                    os.replace(tmp, entry)
                except OSError:  # a concurrent writer renamed its copy into place between the check and here
                    shutil.rmtree(tmp, ignore_errors=True)
            if self.remote is not None:
                self.remote.store(key, entry)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(
                f"{self.root / key}: could not write the stage cache entry ({exc.strerror or exc}); nothing was stored"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.root / key

    def remove_abandoned(self, older_than_s: float = 3600.0) -> None:
        """Delete temp entries a killed writer left behind (a live writer finishes its entry in seconds)."""
        for tmp in self.root.glob(".*"):
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)


def read_record(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise DataError(f"{path}: no run record (the run did not finish, or this is not a run directory)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid run record ({exc})") from None
    return load_record(record, str(path))
