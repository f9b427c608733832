"""Sweeps without a scheduler of our own: W&B sweep YAMLs driven locally by W&B's own engine, and Optuna.

``optuna_study`` runs one chain per trial in this process against any Optuna RDB storage (SQLite by default,
PostgreSQL for many workers on many machines), with heartbeats so a killed worker's trial is retried, the
per-stage objective reported for pruning, and grid points never run twice across workers.

``wandb_local`` is for clusters with no W&B server: it asks W&B's sweep engine (``sweeps.next_run``) for the
next parameters, builds the command exactly as ``wandb agent`` does (``create_sweep_command`` and
``create_sweep_command_args``), runs it as a subprocess with ``WANDB_MODE=offline`` and feeds the finished
run's summary metrics back to the engine (bayes needs them). The runs sync later with ``wandb sync`` as
ordinary runs of the chain config's project, grouped by the sweep's name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

from chainforget.config import read_mapping
from chainforget.errors import ConfigError
from chainforget.records import atomic_write_text, read_record, summary_metrics


def load_sweep(path: Path) -> dict:
    """A W&B sweep YAML, validated with the sweep engine's own schema."""
    with warnings.catch_warnings():  # the engine's pydantic models use v1 option names: nothing a user can change
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps

    config = read_mapping(path, "sweep", "method, metric, parameters and command")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise ConfigError(f"{path}: invalid sweep: {'; '.join(violations)}")
    if not config.get("command"):
        raise ConfigError(f"{path}: command: missing; give the chainforget command with ${{args}}")
    return config


def agent_command(sweep: dict, parameters: dict) -> list[str]:
    """The command ``wandb agent`` would run for these parameters (``{name: {"value": v}}``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    variables = create_sweep_command_args({"args": parameters})
    variables["interpreter"] = ["python"]
    variables["program"] = [sweep.get("program", "")]
    variables["env"] = ["/usr/bin/env"]
    command = []
    for part in create_sweep_command([str(c) for c in sweep["command"]]):
        if part.startswith("${") and part.endswith("}"):
            command += variables.get(part[2:-1]) or []
        else:
            command.append(part)
    return command


def chain_run_dir(command: list[str], run_id: str) -> Path:
    """Where the chain that ``command`` starts writes its record (resolving its config like it will)."""
    from chainforget.config import parse_chain

    if "chain" not in command:
        raise ConfigError(f"sweep command {shlex.join(command)!r} does not run `chainforget chain`")
    config = parse_chain(command[command.index("chain") + 1 :], "chainforget chain")
    return Path(config.out) / (config.run_name or run_id)


def wandb_local(path: Path, *, count: int | None = None, sweep_id: str | None = None) -> list[dict]:
    """Run the sweep in ``path`` to completion (grid) or for ``count`` more runs; returns one summary per run.

    Like W&B's controller, a failed run or one whose summary lacks the sweep's metric is recorded and the sweep
    goes on. Its state (every run's parameters, state and summary) is kept in ``<out>/sweeps/<sweep id>.json``,
    so running the same command again continues the sweep: a run that was killed is run again under its id
    (the chain resumes from its checkpoints), then the engine suggests the next.
    """
    import sweeps

    sweep = load_sweep(path)
    if count is None and sweep.get("method") != "grid":
        raise ConfigError(f"{path}: method {sweep.get('method')!r} never runs out of suggestions; pass --count N")
    sweep_id = sweep_id or sweep.get("name") or path.stem
    metric = (sweep.get("metric") or {}).get("name")
    program = next(part for part in agent_command(sweep, {}) if part != "/usr/bin/env")
    if shutil.which(program) is None:  # every run would fail to start: say why once
        raise ConfigError(
            f"{path}: command {program!r} is not on PATH; activate the environment it is installed in "
            "(e.g. source .venv/bin/activate)"
        )
    state_file = chain_run_dir(agent_command(sweep, {}), "-").parent / "sweeps" / f"{sweep_id}.json"
    runs = read_sweep_state(state_file, sweep, sweep_id)
    results = []
    while count is None or len(results) < count:
        pending = [run for run in runs if run["state"] == "running"]  # killed with the sweep process
        if pending:
            run = pending[0]
        else:
            history = [
                sweeps.SweepRun(
                    name=r["run_id"],
                    state=sweeps.RunState(r["state"]),
                    config=r["config"],
                    summary_metrics=r["summary"],
                )
                for r in runs
            ]
            suggestion = sweeps.next_run(sweep, history, validate=True)
            if suggestion is None:
                break
            run = {
                "run_id": f"{sweep_id}-{uuid.uuid4().hex[:8]}",
                "config": suggestion.config,
                "state": "running",
                "summary": {},
            }
            runs.append(run)
            atomic_write_text(state_file, json.dumps({"sweep": sweep, "runs": runs}, indent=1, default=str))
        parameters = {name: {"value": spec["value"]} for name, spec in run["config"].items()}
        command = agent_command(sweep, parameters)
        run_dir = chain_run_dir(command, run["run_id"])
        # No WANDB_SWEEP_ID: no W&B server knows this sweep, and W&B would send the run to a sweep that `wandb sync`
        # cannot find. The runs are grouped by the sweep's name instead.
        env = dict(os.environ, WANDB_MODE="offline", WANDB_RUN_ID=run["run_id"], WANDB_RUN_GROUP=sweep_id)
        print(f"[{sweep_id}] run {run['run_id']}: {shlex.join(command)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, env=env)
        finished = done.returncode == 0 and (run_dir / "run.json").exists()
        run["summary"] = summary_metrics(read_record(run_dir)) if finished else {}
        run["state"] = "finished" if finished else "failed"
        atomic_write_text(state_file, json.dumps({"sweep": sweep, "runs": runs}, indent=1, default=str))
        objective = run["summary"].get(metric) if metric else None
        if finished and metric and objective is None:
            print(
                f"[{sweep_id}] run {run['run_id']}: its summary has no {metric!r} (the sweep goes on without it; "
                f"summary keys are e.g. {', '.join(sorted(run['summary'])[:3])})",
                file=sys.stderr,
                flush=True,
            )
        results.append(
            {
                "run_id": run["run_id"],
                "run_dir": str(run_dir),
                "returncode": done.returncode,
                "parameters": parameters,
                "metric": metric,
                "objective": objective,
            }
        )
    if not results:
        print(f"[{sweep_id}] no run left to start: {len(runs)} runs are recorded in {state_file}", file=sys.stderr)
    return results


def read_sweep_state(state_file: Path, sweep: dict, sweep_id: str) -> list[dict]:
    """The runs of an earlier invocation of this sweep, or none; a sweep file edited since is refused."""
    if not state_file.exists():
        return []
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{state_file}: unreadable sweep state ({exc}); delete it to start the sweep over") from None
    if json.loads(json.dumps(sweep, default=str)) != state.get("sweep"):
        raise ConfigError(
            f"{state_file}: sweep {sweep_id!r} ran with a different sweep file; pass --sweep-id NEW "
            "to start a new sweep, or delete the file to start this one over"
        )
    return state["runs"]


STUDY_KEYS = {
    "study_name",
    "base",
    "overrides",
    "objectives",
    "directions",
    "params",
    "sampler",
    "pruner",
    "n_trials",
    "heartbeat",
}
SAMPLERS = ("tpe", "random", "grid", "nsga2")


def load_study_spec(path: Path) -> dict:
    """An Optuna study spec (``sweeps/optuna/*.yaml``), checked field by field."""
    spec = read_mapping(path, "study", ", ".join(sorted(STUDY_KEYS)))
    unknown = sorted(set(spec) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: field {unknown[0]!r} is unknown; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for field in ("study_name", "base", "objectives", "params"):
        if not spec.get(field):
            raise ConfigError(f"{path}: field {field!r} is missing")
    spec.setdefault("directions", ["minimize"] * len(spec["objectives"]))
    if len(spec["directions"]) != len(spec["objectives"]) or not set(spec["directions"]) <= {"minimize", "maximize"}:
        raise ConfigError(f"{path}: directions {spec['directions']} must be minimize/maximize, one per objective")
    for name, param in spec["params"].items():
        kind = (param or {}).get("type")
        if kind == "categorical" and param.get("choices"):
            continue
        if kind in ("float", "int") and "low" in param and "high" in param and param["low"] <= param["high"]:
            continue
        raise ConfigError(
            f"{path}: params.{name}: {param!r}; use {{type: categorical, choices: [...]}} "
            "or {type: float|int, low, high[, log]}"
        )
    beat = spec.get("heartbeat") or {}
    if not isinstance(beat, dict) or set(beat) - {"interval", "grace_period", "max_retry"}:
        raise ConfigError(f"{path}: heartbeat: {beat!r}; use {{interval: s, grace_period: s, max_retry: n}} (seconds)")
    sampler = (spec.get("sampler") or {}).get("name", "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{path}: sampler.name {sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    if sampler == "grid" and any(p["type"] != "categorical" for p in spec["params"].values()):
        raise ConfigError(f"{path}: sampler grid needs every param to be categorical")
    return spec


def as_override(name: str, value) -> str:
    """A command-line override; task orders are categorical strings such as ``"bbq,csqa"``."""
    if name == "order" and isinstance(value, str):
        value = "[" + value + "]"
    return f"--{name}={value}"


def make_sampler(spec: dict):
    import optuna

    settings = dict(spec.get("sampler") or {})
    name, seed = settings.pop("name", "tpe"), settings.pop("seed", 0)
    if name == "grid":
        space = {key: param["choices"] for key, param in spec["params"].items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **settings)
    return optuna.samplers.TPESampler(seed=seed, **settings)


def make_storage(url: str, heartbeat: dict | None = None, attempts: int = 3):
    """An RDB storage with heartbeats: a trial whose worker has not beaten for ``grace_period`` seconds (it was
    killed) is marked failed and retried once more per ``max_retry`` by the next worker that asks for a trial.

    Workers started together race to create the schema; the loser retries and finds it there.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    beat = {"interval": 10, "grace_period": 30, "max_retry": 2, **(heartbeat or {})}
    for attempt in range(attempts):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=beat["interval"],
                grace_period=beat["grace_period"],
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=beat["max_retry"]),
            )
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # SQLite says "table ... already exists" (an OperationalError) where PostgreSQL raises the other two
            lost_race = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if not lost_race or attempt == attempts - 1:
                raise ConfigError(
                    f"--storage {url}: cannot open the study storage ({type(exc).__name__}: {exc})".split("\n")[0]
                ) from None
            time.sleep(1.0 + attempt)
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or an unreachable server
            raise ConfigError(
                f"--storage {url}: cannot open the study storage ({type(exc).__name__}: {exc})".split("\n")[0]
            ) from None


def duplicate_of(trial) -> int | None:
    """The grid point ``trial`` drew that another worker already ran or is running (the lower trial number
    keeps it), else ``None``. Optuna's grid sampler can hand the same point to two workers."""
    import optuna

    taken = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for other in trial.study.get_trials(deepcopy=False, states=taken):
        if other.number < trial.number and other.params == trial.params:
            return other.number
    return None


def optuna_study(
    path: Path,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    out: str | None = None,
    configs: list[str] = (),
):
    """Run (or join) the study in ``path``: one chain per trial, reporting per-stage objectives for pruning.

    ``configs`` are chain config files applied after the study's ``base`` (e.g. local data paths).
    """
    import optuna

    from chainforget.config import parse_chain
    from chainforget.plan import plan_chain
    from lightning_modules.chain import ChainStopped, run_chain

    spec = load_study_spec(path)
    name = spec["study_name"]
    if (spec.get("sampler") or {}).get("name") != "grid" and not (n_trials or spec.get("n_trials")):
        raise ConfigError(f"{path}: n_trials: missing; only a grid study knows when it is done (or pass --n-trials)")
    storage_url = storage or f"sqlite:///{Path(out or 'runs') / 'optuna' / name}.db"
    if storage_url.startswith("sqlite:///"):
        Path(storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    pruner_spec = dict(spec.get("pruner") or {"name": "none"})
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "threshold": optuna.pruners.ThresholdPruner,
    }
    pruner_name = pruner_spec.pop("name")
    if pruner_name not in pruners:
        raise ConfigError(f"{path}: pruner.name {pruner_name!r} is unknown; use one of {', '.join(pruners)}")
    pruner = pruners[pruner_name](**pruner_spec)
    multi = len(spec["objectives"]) > 1
    grid = (spec.get("sampler") or {}).get("name") == "grid"
    with warnings.catch_warnings():  # heartbeats and metric names are "experimental" in Optuna: nothing to act on
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=name,
            storage=make_storage(storage_url, spec.get("heartbeat")),
            load_if_exists=True,
            directions=spec["directions"],
            sampler=make_sampler(spec),
            pruner=pruner,
        )
        study.set_metric_names(list(spec["objectives"]))  # what optuna-dashboard and trials_dataframe() show
    base = [arg for config_file in [*spec["base"], *configs] for arg in ("--config", config_file)] + list(
        spec.get("overrides") or []
    )
    if out:
        base.append(f"--out={out}")

    def objective(trial):
        params = {}
        for key, param in spec["params"].items():
            if param["type"] == "categorical":
                params[key] = trial.suggest_categorical(key, param["choices"])
            elif param["type"] == "int":
                params[key] = trial.suggest_int(key, param["low"], param["high"], log=param.get("log", False))
            else:
                params[key] = trial.suggest_float(key, param["low"], param["high"], log=param.get("log", False))
        original = duplicate_of(trial) if grid else None
        if original is not None:
            trial.set_user_attr("duplicate_of", original)
            raise optuna.TrialPruned(f"grid point already taken by trial {original}")
        config = parse_chain([*base, *(as_override(k, v) for k, v in params.items())], "chainforget sweep optuna")
        config = replace(config, run_name=f"{name}-trial{trial.number}", wandb=replace(config.wandb, group=name))

        stages = len(plan_chain(config))

        def report(stage: int, summary: dict) -> None:
            # The last stage's value is the trial's result, not an intermediate one: pruning there would throw
            # away a finished chain. Objectives that only exist at the end (cl/forgetting in a two-stage chain)
            # therefore never prune.
            value = summary.get(spec["objectives"][0])
            if multi or value is None or stage >= stages:
                return
            trial.report(value, stage)
            if trial.should_prune():
                raise ChainStopped(f"pruned after stage {stage}")

        try:
            record = run_chain(
                config,
                on_stage=report,
                wandb_config={"optuna": {"study": name, "trial": trial.number, "params": params}},
            )
        except ChainStopped as stop:
            raise optuna.TrialPruned(str(stop)) from None
        summary = summary_metrics(record)
        missing = [o for o in spec["objectives"] if summary.get(o) is None]
        if missing:
            raise ConfigError(f"{path}: objective {missing[0]!r} is not in the run's summary")
        trial.set_user_attr("run_dir", str(Path(config.out) / record["run_name"]))
        values = [float(summary[o]) for o in spec["objectives"]]
        return values if multi else values[0]

    study.optimize(objective, n_trials=n_trials or spec.get("n_trials"), catch=())
    return study
