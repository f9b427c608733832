"""W&B for a chain, in one place: one run per chain that follows W&B's own settings, a history row per stage
(``stage`` as the step metric), the summary and the run record at the end. The runner calls these."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import uuid
from pathlib import Path

import pandas as pd

from chainforget import metrics
from chainforget.config import ChainConfig
from chainforget.errors import ConfigError
from chainforget.evaluation import stage_scores
from chainforget.records import PP, atomic_write_text, score_values, summary_metrics


def start_run(config: ChainConfig, run_dir: Path, extra_config: dict | None = None):
    """One W&B run per chain; ``stage`` is the step metric of every ``eval/*`` series."""
    import wandb

    mode = wandb_mode(config.wandb.mode)
    if mode == "disabled":
        return None
    # Under `wandb agent` the run's id, project and entity are the sweep's (W&B ignores them with a warning)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    # a re-run of a killed chain (same run directory) continues the same W&B run instead of starting another
    id_file = run_dir / "wandb_run_id"
    run_id = os.environ.get("WANDB_RUN_ID") or (
        id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    )
    atomic_write_text(id_file, run_id)
    settings = dict(
        id=None if in_sweep else run_id,
        resume="allow",
        project=None if in_sweep else config.wandb.project or os.environ.get("WANDB_PROJECT") or "chainforget",
        entity=None if in_sweep else config.wandb.entity,
        group=config.wandb.group or os.environ.get("WANDB_RUN_GROUP") or config.run_name,
        job_type="chain",
        name=config.run_name,
        dir=str(run_dir),
        config={**config.to_dict(), **(extra_config or {})},
        tags=config.wandb.tags,
        mode=mode,
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        run = wandb.init(**settings)
    except Exception as exc:  # W&B's own error types vary by version; only this one message is handled
        # a killed process's W&B service can hold its run id long after it (a retried trial or a requeued job that
        # resumes the run would wait on it): the chain continues as a new W&B run, its run directory unchanged
        if in_sweep or "is in use" not in str(exc):
            raise
        settings["id"] = uuid.uuid4().hex[:12]
        atomic_write_text(id_file, settings["id"])
        print(
            f"chainforget: W&B run {run_id} is held by another process; logging to run {settings['id']}",
            file=sys.stderr,
        )
        run = wandb.init(**settings)
    run.define_metric("stage")
    run.define_metric("eval/*", step_metric="stage")
    return run


class ArtifactCache:
    """The stage cache's remote copy in W&B: every entry (a stage's weights and summary, an evaluation's
    predictions, a measurement) an artifact of type ``chainforget-cache`` named ``cf-<content key>``, logged by the
    chain's run as it is stored locally, and fetched by name when the local cache lacks it. W&B checks its own
    digests on download and the stage cache then checks the entry's manifest. An offline run logs the artifacts
    (``wandb sync`` uploads them) but cannot fetch any: W&B has no artifacts without its server, so an offline chain
    reads the local cache only (said once on stderr)."""

    TYPE = "chainforget-cache"

    def __init__(self, run):
        self.run = run
        self.offline = run.offline
        self.said = False

    def store(self, key: str, entry: Path) -> None:
        import wandb

        try:
            artifact = wandb.Artifact(f"cf-{key}", type=self.TYPE, metadata={"key": key})
            # online the files upload from the entry itself (it never changes once published); offline W&B keeps a
            # copy, since `wandb sync` may run after the entry is gone
            artifact.add_dir(str(entry), policy="mutable" if self.offline else "immutable")
            self.run.log_artifact(artifact)
        except (wandb.errors.Error, OSError, ValueError) as exc:  # the local entry stands; only sharing failed
            print(f"chainforget: cache: wandb could not log {key} ({exc})".splitlines()[0], file=sys.stderr)

    def fetch(self, key: str, folder: Path) -> bool:
        import wandb

        if self.offline:
            if not self.said:
                print("chainforget: cache: wandb in an offline run reads the local cache only", file=sys.stderr)
                self.said = True
            return False
        try:
            self.run.use_artifact(f"cf-{key}:latest", type=self.TYPE).download(root=str(folder))
        except (wandb.errors.Error, OSError, ValueError):  # not there (the usual miss) or unreachable: compute it
            return False
        return True


def check_settings(config: ChainConfig) -> None:
    """The ``wandb`` block's names checked by W&B's own settings (project characters and length, tag length) before
    anything is written; W&B itself would refuse them only when the run starts. ``cache: wandb`` needs a run."""
    if config.cache == "wandb" and wandb_mode(config.wandb.mode) == "disabled":
        raise ConfigError(
            "cache: wandb keeps the stage cache as artifacts of the chain's W&B run, and W&B is disabled "
            "(wandb.mode or WANDB_MODE); use cache: true, or wandb.mode: online or offline"
        )
    spec = config.wandb
    given = {"project": spec.project, "entity": spec.entity, "group": spec.group, "tags": spec.tags or None}
    if not any(given.values()):
        return
    from pydantic import ValidationError
    from wandb.errors import UsageError
    from wandb.sdk.wandb_settings import Settings

    names = {"project": "project", "entity": "entity", "group": "run_group", "tags": "run_tags"}
    for key, value in given.items():
        try:
            if value is not None:
                Settings(**{names[key]: tuple(value) if key == "tags" else value})
        except (UsageError, ValidationError) as exc:
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"wandb.{key}: {value!r} is not allowed by W&B ({reason.splitlines()[0]})") from None


def wandb_mode(configured: str | None) -> str:
    """The config's ``wandb.mode`` if set, else W&B's own (``$WANDB_MODE``, ``wandb offline``, a sweep agent's
    environment); where that is online but no credentials exist, offline, said once per process on stderr."""
    if configured:
        return configured
    import wandb

    try:
        mode = wandb.setup().settings.mode
    except ValueError as exc:  # pydantic's ValidationError: a malformed WANDB_MODE
        raise ConfigError(
            f"WANDB_MODE={os.environ.get('WANDB_MODE')!r}: not allowed; use online, offline or disabled"
        ) from exc
    if mode in ("online", "run", "shared") and not wandb_credentials():
        say_offline_once()
        return "offline"
    return mode


@functools.cache
def say_offline_once() -> None:
    print(
        "chainforget: no W&B login and no WANDB_MODE: W&B runs are logged offline in each run directory's wandb/ "
        "(`wandb login`, then `wandb sync <dir>` uploads them; WANDB_MODE=disabled turns W&B off)",
        file=sys.stderr,
        flush=True,
    )


def wandb_credentials() -> bool:
    """Whether W&B finds credentials (``$WANDB_API_KEY``, ``.netrc`` from ``wandb login``, its settings) without
    prompting. The lookup lives in a private module that moves between wandb releases: without it, wandb.init
    decides."""
    import wandb

    try:
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:
        return True
    try:
        host = wandb.setup().settings.base_url
        return authenticate_session(host=host, source="chainforget", prompt=False, update_session=False) is not None
    except Exception:  # a malformed key: let wandb.init report it in its own words
        return True


def log_stage(run, predictions: pd.DataFrame, data) -> None:
    """History row of one stage: accuracy per task and group, and the task-specific scores."""
    if run is None:
        return
    stage = int(predictions["stage"].iloc[0])
    rows = metrics.eval_rows(predictions, {name: data[name].group_kinds for name in predictions["task"].unique()})
    history = {"stage": stage}
    for row in rows:
        suffix = "acc" if row["group_kind"] == metrics.ALL else f"{row['group_kind']}/{row['group']}/acc"
        history[f"eval/{row['task']}/{suffix}"] = PP * row["acc"]
    for row in stage_scores(predictions):
        for name, value in score_values(row).items():
            history[f"eval/{row['task']}/{row['group_kind']}/{row['group']}/{name}"] = value
    run.log(history)


def finish_run(run, record: dict, run_dir: Path) -> None:
    if run is None:
        return
    import wandb

    run.summary.update(summary_metrics(record))
    run.log({"eval_matrix": wandb.Table(dataframe=pd.DataFrame(record["eval"]))})
    for name in ("run.json", "predictions.parquet"):  # the run's files folder is uploaded as it is at the end
        shutil.copy2(run_dir / name, Path(run.dir) / name)
    run.finish()


def stop_run(run, reason: str | None) -> None:
    """End a chain's run early: cleanly, tagged ``stopped``, when it was stopped on purpose (``reason``), else as
    failed (exit code 1)."""
    if run is None:
        return
    if reason is None:
        run.finish(exit_code=1)
        return
    run.tags = (*run.tags, "stopped")
    run.summary["stopped"] = reason
    run.finish()
