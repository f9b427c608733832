"""Hyper-parameter search without a scheduler of our own: W&B sweep YAMLs driven locally by W&B's own engine
(W&B's ``sweeps`` package; the YAMLs live in the repository's ``sweeps/`` folder), and Optuna studies.

``optuna_study`` runs one chain per trial in this process against any Optuna RDB storage (SQLite by default,
PostgreSQL for many workers on many machines) or Optuna's journal file (many workers on a shared filesystem, no
database server), with heartbeats so a killed worker's trial is retried, the per-stage objective reported for
pruning, and grid points never run twice across workers.

``wandb_local`` is for clusters with no W&B server: it asks W&B's sweep engine (``sweeps.next_run``) for the
next parameters, builds the command exactly as ``wandb agent`` does (``create_sweep_command`` and
``create_sweep_command_args``), runs it as a subprocess with ``WANDB_MODE=offline`` and feeds the finished
run's summary metrics back to the engine (bayes needs them). The runs sync later with ``wandb sync`` as
ordinary runs of the chain config's project, grouped by the sweep's name.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from chainforget.config import INT_LIMIT, is_file, is_plain_name, key_type, parse_chain, read_mapping
from chainforget.errors import ConfigError
from chainforget.progress import study_progress
from chainforget.records import atomic_write_text, check_summary_name, read_record, summary_metrics


def load_sweep(path: Path) -> dict:
    """A W&B sweep YAML, validated with the sweep engine's own schema, then every parameter against the chain
    config its command runs: a name that is no config key, or a value the chain would refuse, is one line now
    rather than a failed run later."""
    sweeps = import_sweeps()
    config = read_mapping(path, "sweep", "method, metric, parameters and command")
    command = config.get("command")
    if not command:
        raise ConfigError(f"{path}: command: missing; give the chainforget command with ${{args}}")
    parameters = config.get("parameters")
    if not isinstance(parameters, dict) or not parameters:  # the engine's own check fails on these with a traceback
        raise ConfigError(f"{path}: parameters: {parameters!r} is not allowed; use a mapping of chain config keys")
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: parameters.{name}: {spec!r} is not allowed; use {{values: [...]}} or {{...}}")
        for bound in ("min", "max"):
            value = spec.get(bound, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= INT_LIMIT:
                raise ConfigError(f"{path}: parameters.{name}.{bound}: {value!r} is not allowed; use a finite number")
    violations = sweeps.schema_violations_from_proposed_config(config)
    for name, spec in parameters.items() if violations else ():
        alone = {"method": config.get("method"), "parameters": {name: spec}, "command": command}
        wrong = sweeps.schema_violations_from_proposed_config(alone)
        if wrong:  # the engine names neither the parameter nor what it takes
            raise ConfigError(
                f"{path}: invalid sweep: parameters.{name}: {spec!r} is not allowed "
                f"({'; '.join(dict.fromkeys(wrong))}); use {{values: [...]}}, {{value: v}} or {{distribution: ..., "
                "min: a, max: b}"
            )
    if violations:
        raise ConfigError(f"{path}: invalid sweep: {'; '.join(dict.fromkeys(violations))}")
    if not isinstance(command, list) or "${args}" not in command:
        raise ConfigError(
            f"{path}: command: {command!r} is not allowed; use a list with ${{args}} where the parameters go, "
            "e.g. [chainforget, chain, --config, FILE, '${args}']"
        )
    if config.get("method") == "bayes" and not (config.get("metric") or {}).get("name"):
        raise ConfigError(f"{path}: metric: missing; method bayes needs {{name: SUMMARY KEY, goal: minimize|maximize}}")
    check_sweep_parameters(path, config)
    return config


def import_sweeps():
    """W&B's sweep engine (the ``sweeps`` package)."""
    with warnings.catch_warnings():  # the engine's pydantic models use v1 option names: nothing a user can change
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps
    return sweeps


def check_param_key(key: str, where: str) -> None:
    """A chain config key, or ``config``: a chain config file per value, for settings that only make sense
    together (a regime: fine-tuning method with its learning rate, answer format with its eval mode)."""
    if key != "config":
        key_type(key, where)


def check_sweep_parameters(path: Path, sweep: dict) -> None:
    """Each parameter a chain config key, each value it can take (every one of ``values``, a distribution's ends
    and middle) one the chain accepts with the others at their first value, and a run directory per run."""
    from sweeps.params import HyperParameter

    def arguments(values: dict) -> list[str]:
        return chain_arguments(agent_command(sweep, {name: {"value": value} for name, value in values.items()}))

    candidates = {}
    for name, spec in sweep["parameters"].items():
        check_param_key(name, f"{path}: parameters.")
        if "parameters" in spec:
            raise ConfigError(f"{path}: parameters.{name}: nested parameters are not allowed; name each setting")
        if "values" in spec:
            candidates[name] = [(f"values[{i}]", value) for i, value in enumerate(spec["values"])]
        elif "value" in spec:
            candidates[name] = [("value", spec["value"])]
        else:  # a distribution: its lowest, middle and highest value (an unbounded one: its middle)
            hyper = HyperParameter(name, spec)
            values = [plain(hyper.ppf(q)) for q in (0.0, 0.5, 1.0)]
            if hyper.type in VALUE_RANGES:  # min and max are values: take them as written, not as rounded by ppf
                values = [spec["min"], values[1], spec["max"]]
            candidates[name] = [(at, v) for at, v in zip(("min", "middle", "max"), values) if is_finite(v)]
    try:
        parse_chain(arguments({}), "chainforget chain")  # the command alone, as wandb_local resolves its run directory
    except ConfigError as exc:
        raise ConfigError(f"{path}: command: {exc}") from None
    check_candidates(path, "parameters", candidates, arguments)
    config = parse_chain(arguments({name: found[0][1] for name, found in candidates.items() if found}))
    if config.run_name is not None:
        raise ConfigError(
            f"{path}: command: its chain config sets run_name {config.run_name!r}, so every run would write to "
            f"{Path(config.out) / config.run_name}; add --run_name=null before ${{args}} (each run gets its id)"
        )


VALUE_RANGES = ("param_uniform", "param_int_uniform", "param_loguniform_v2", "param_inv_loguniform_v2")


def plain(value):
    """A numpy scalar as the Python number it holds."""
    return value.item() if hasattr(value, "item") else value


def is_finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def check_candidates(path: Path, block: str, candidates: dict, arguments) -> None:
    """Every candidate value of every parameter accepted by the chain, the other parameters at their first value;
    ``candidates``: ``{name: [(where, value), ...]}``, ``arguments(values)``: the chain's command line for them."""
    from lightning_modules.chain import preflight

    first = {name: found[0][1] for name, found in candidates.items() if found}
    for name, found in candidates.items():
        for where, value in found:
            try:
                preflight(parse_chain(arguments({**first, name: value}), "chainforget chain"))
            except ConfigError as exc:
                message = str(exc)
                if message.startswith(f"{name}: "):  # the chain's refusal of this very value: name where it is
                    raise ConfigError(f"{path}: {block}.{name}.{where}: {message.removeprefix(f'{name}: ')}") from None
                raise ConfigError(
                    f"{path}: {block}.{name}.{where}: with {name} = {value!r} the chain config is refused: {message}"
                ) from None


def chain_arguments(command: list[str]) -> list[str]:
    """The arguments after ``chain`` in a command that runs ``chainforget chain``."""
    if "chain" not in command:
        raise ConfigError(f"sweep command {shlex.join(command)!r} does not run `chainforget chain`")
    return command[command.index("chain") + 1 :]


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
    config = parse_chain(chain_arguments(command), "chainforget chain")
    return Path(config.out) / (config.run_name or run_id)


def wandb_local(path: Path, *, count: int | None = None, sweep_id: str | None = None) -> list[dict]:
    """Run the sweep in ``path`` to completion (grid) or for ``count`` more runs; returns one summary per run.

    Like W&B's controller, a failed run or one whose summary lacks the sweep's metric is recorded and the sweep
    goes on. Its state (every run's parameters, state and summary) is kept in ``<out>/sweeps/<sweep id>.json``,
    so running the same command again continues the sweep: a run that was killed is run again under its id
    (the chain resumes from its checkpoints), then the engine suggests the next.
    """
    sweeps = import_sweeps()
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ConfigError(f"--count {count}: not allowed; use a positive number of runs")
    sweep = load_sweep(path)
    if count is None and sweep.get("method") != "grid":
        raise ConfigError(f"{path}: method {sweep.get('method')!r} never runs out of suggestions; pass --count N")
    given = f"--sweep-id {sweep_id}" if sweep_id else f"{path}: name" if sweep.get("name") else f"{path}: file name"
    sweep_id = sweep_id or str(sweep.get("name") or path.stem)
    if not is_plain_name(sweep_id):  # it names the state file and every run
        raise ConfigError(f"{given}: {sweep_id!r} is not allowed as a sweep id; use letters, digits and . _ -")
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
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "nsga2": "NSGAIISampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "threshold": "ThresholdPruner"}
PARAM_KEYS = {"categorical": ("type", "choices"), "float": ("type", "low", "high", "log", "step")}
PARAM_KEYS["int"] = PARAM_KEYS["float"]


def load_study_spec(path: Path, configs: list[str] = ()) -> dict:
    """An Optuna study spec (``sweeps/optuna/*.yaml``), checked field by field, then every parameter value against
    the chain config it varies (``configs``: chain config files applied after ``base``): nothing a trial would refuse
    reaches a study."""
    spec = read_mapping(path, "study", ", ".join(sorted(STUDY_KEYS)))
    unknown = sorted(set(spec) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: field {unknown[0]!r} is unknown; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for field in ("study_name", "base", "objectives", "params"):
        if not spec.get(field):
            raise ConfigError(f"{path}: field {field!r} is missing")
    name = spec["study_name"]
    if not isinstance(name, str) or not is_plain_name(f"{name}-trial0"):  # it names the SQLite file and every run
        raise ConfigError(f"{path}: study_name: {name!r} is not allowed; use letters, digits and . _ -")
    for field in ("base", "objectives", "overrides"):
        value = spec.get(field, [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"{path}: {field}: {value!r} is not allowed; use a list of strings")
    for where, config_file in [(f"{path}: base", f) for f in spec["base"]] + [("--config", f) for f in configs]:
        if not is_file(config_file):
            raise ConfigError(f"{where}: {config_file}: no such chain config file (relative to {Path.cwd()})")
    spec.setdefault("directions", ["minimize"] * len(spec["objectives"]))
    directions = spec["directions"]
    if (
        not isinstance(directions, list)
        or len(directions) != len(spec["objectives"])
        or not all(direction in ("minimize", "maximize") for direction in directions)
    ):
        raise ConfigError(f"{path}: directions {directions} must be minimize/maximize, one per objective")
    trials = spec.get("n_trials")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"{path}: n_trials: {trials!r} is not allowed; use a positive integer")
    beat = spec.get("heartbeat") or {}
    if not isinstance(beat, dict) or set(beat) - {"interval", "grace_period", "max_retry"}:
        raise ConfigError(f"{path}: heartbeat: {beat!r}; use {{interval: s, grace_period: s, max_retry: n}} (seconds)")
    for key, value in beat.items():
        least = 0 if key == "max_retry" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{path}: heartbeat.{key}: {value!r} is not allowed; use an integer >= {least}")
    if not isinstance(spec["params"], dict):
        raise ConfigError(f"{path}: params: {spec['params']!r} is not allowed; use a mapping of chain config keys")
    for key, param in spec["params"].items():
        check_param(path, key, param)
    make_sampler(spec, path)
    make_pruner(spec, path)
    for key in spec["params"]:
        check_param_key(key, f"{path}: params.")
    candidates = {key: param_values(param) for key, param in spec["params"].items()}
    start = study_arguments(spec, configs)
    tasks = list(parse_chain(start, "chainforget chain").tasks)
    for objective in spec["objectives"]:
        check_summary_name(objective, tasks, f"{path}: objectives")
    check_candidates(
        path, "params", candidates, lambda values: [*start, *(as_override(k, v) for k, v in values.items())]
    )
    return spec


def check_param(path: Path, name: str, param) -> None:
    """One search-space entry in the form Optuna samples from: a non-empty list of distinct choices Optuna can
    store, or finite bounds low <= high (low > 0 on a log scale) with an optional positive step."""
    key = f"{path}: params.{name}"
    kind = param.get("type") if isinstance(param, dict) else None
    if not isinstance(kind, str) or kind not in PARAM_KEYS:
        raise ConfigError(
            f"{key}: {param!r} is not allowed; use {{type: categorical, choices: [...]}} "
            "or {type: float|int, low, high[, log][, step]}"
        )
    unknown = sorted(set(param) - set(PARAM_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; a {kind} param has {', '.join(PARAM_KEYS[kind])}")
    if kind == "categorical":
        choices = param.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{key}.choices: {choices!r} is not allowed; use a non-empty list")
        for i, choice in enumerate(choices):
            if not (choice is None or isinstance(choice, (bool, int, str)) or is_finite_float(choice)):
                raise ConfigError(
                    f"{key}.choices[{i}]: {choice!r} is not allowed; use null, true, false, a finite number or a "
                    "string (what Optuna can store)"
                )
            if (type(choice), choice) in [(type(c), c) for c in choices[:i]]:
                raise ConfigError(f"{key}.choices[{i}]: {choice!r} is given twice; list each choice once")
        return
    number = "an integer" if kind == "int" else "a finite number"
    for bound in ("low", "high", "step"):
        value = param.get(bound)
        if value is None and bound == "step":
            continue
        if isinstance(value, bool) or not (isinstance(value, int) or kind == "float" and is_finite_float(value)):
            raise ConfigError(f"{key}.{bound}: {value!r} is not allowed; use {number}")
    low, high, step, log = param["low"], param["high"], param.get("step"), param.get("log", False)
    if low > high:
        raise ConfigError(f"{key}: low {low} > high {high} is not allowed; use low <= high")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}.log: {log!r} is not allowed; use true or false")
    if log and low <= 0:
        raise ConfigError(f"{key}.low: {low} is not allowed with log: true; use low > 0")
    if step is not None and step <= 0:
        raise ConfigError(f"{key}.step: {step} is not allowed; use a step > 0")
    if step is not None and log:
        raise ConfigError(f"{key}: step with log: true is not allowed; Optuna samples a log scale without steps")


def is_finite_float(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def param_values(param: dict) -> list[tuple[str, object]]:
    """The values of one search-space entry worth checking against the chain config: every choice, or both ends."""
    if param["type"] == "categorical":
        return [(f"choices[{i}]", choice) for i, choice in enumerate(param["choices"])]
    return [("low", param["low"]), ("high", param["high"])]


def study_arguments(spec: dict, configs: list[str] = ()) -> list[str]:
    """The chain command line every trial starts from: the study's base files, then ``configs``, then its overrides."""
    return [arg for config_file in [*spec["base"], *configs] for arg in ("--config", config_file)] + list(
        spec.get("overrides") or []
    )


def as_override(name: str, value) -> str:
    """A command-line override; task orders are categorical strings such as ``"bbq,csqa"``."""
    if name == "order" and isinstance(value, str):
        value = "[" + value + "]"
    return f"--{name}={value}"


def make_sampler(spec: dict, path: Path | str = "study"):
    """The study's sampler, its options checked against the sampler class (a grid's space comes from params)."""
    import optuna

    settings = options_of(spec, "sampler", path)
    name = settings.pop("name", "tpe")
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ConfigError(f"{path}: sampler.name {name!r} is unknown; use one of {', '.join(SAMPLERS)}")
    settings.setdefault("seed", 0)  # a study reproduces unless its file says otherwise
    given = {}
    if name == "grid":
        if any(p["type"] != "categorical" for p in spec["params"].values()):
            raise ConfigError(f"{path}: sampler grid needs every param to be categorical")
        given["search_space"] = {key: param["choices"] for key, param in spec["params"].items()}
    return build(getattr(optuna.samplers, SAMPLERS[name]), settings, given, f"{path}: sampler")


def make_pruner(spec: dict, path: Path | str = "study"):
    """The study's pruner (none by default), its options checked against the pruner class."""
    import optuna

    settings = options_of(spec, "pruner", path)
    name = settings.pop("name", "none")
    if not isinstance(name, str) or name not in PRUNERS:
        raise ConfigError(f"{path}: pruner.name {name!r} is unknown; use one of {', '.join(PRUNERS)}")
    if name != "none" and len(spec["objectives"]) > 1:
        raise ConfigError(f"{path}: pruner {name!r}: Optuna prunes single-objective studies only; use name: none")
    return build(getattr(optuna.pruners, PRUNERS[name]), settings, {}, f"{path}: pruner")


def options_of(spec: dict, field: str, path) -> dict:
    settings = spec.get(field) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: {field}: {settings!r} is not allowed; use a mapping such as {{name: ..., seed: 0}}")
    return dict(settings)


# What YAML can give an option, by the name its annotation uses, and how a message says it (integers here are
# counts, steps or seeds: never negative)
YAML_TYPES = {
    "None": (type(None), "null"),
    "bool": (bool, "true or false"),
    "int": (int, "an integer >= 0"),
    "float": (float, "a finite number"),
    "str": (str, "a string"),
}


def build(cls, settings: dict, given: dict, where: str):
    """``cls(**settings, **given)`` with every option of ``settings`` checked first: a name ``cls`` takes, a value
    its annotation allows (YAML holds no Python objects, so options that take one are not settable), then the
    class's own checks of the values; each refusal one line."""
    settable = {}
    for name, parameter in inspect.signature(cls).parameters.items():
        annotation = parameter.annotation
        words = [w.strip() for w in getattr(annotation, "__name__", str(annotation)).split("|")]
        if name not in given and all(word in YAML_TYPES for word in words):
            settable[name] = [YAML_TYPES[word] for word in words]
    for name, value in settings.items():
        if name not in settable:
            raise ConfigError(f"{where}.{name}: unknown option of {cls.__name__}; use {', '.join(settable) or 'none'}")
        kinds = [kind for kind, _ in settable[name]]
        fits = type(value) in kinds or (type(value) is int and float in kinds)
        if not fits or not is_finite(value) or (type(value) is int and int in kinds and value < 0):
            allowed = " or ".join(words for _, words in settable[name])
            raise ConfigError(f"{where}.{name}: {value!r} is not allowed; use {allowed}")
    try:
        return cls(**settings, **given)
    except (ValueError, TypeError) as exc:  # Optuna's own checks of the values, e.g. population_size >= 2
        raise ConfigError(f"{where}: {exc}") from None


JOURNAL = "journal:///"  # journal:///PATH: Optuna's journal file (relative PATH; journal:////PATH is absolute)

# A heartbeat for storages without one of their own (Optuna's journal file): each running trial's worker writes
# the time into this user attribute every ``interval`` seconds.
BEAT = "heartbeat_at"


def check_storage(url: str) -> None:
    """An RDB URL whose database SQLAlchemy knows, or a journal file in a folder that exists (nothing is connected to
    or created yet)."""
    if url.startswith(JOURNAL):
        folder = Path(url.removeprefix(JOURNAL)).parent
        if not url.removeprefix(JOURNAL) or not folder.is_dir():
            raise ConfigError(
                f"--storage {url}: no folder {folder} for the journal file; create it or correct the path"
            )
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"--storage {url}: not allowed ({exc}); use an RDB URL such as sqlite:///runs/optuna/NAME.db "
            "or postgresql://USER@HOST/DB, or a journal file journal:///runs/optuna/NAME.log"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"--storage {url}: an in-memory database ends with this worker; use sqlite:///FILE")


def make_storage(url: str, heartbeat: dict | None = None, attempts: int = 3):
    """An RDB storage with heartbeats: a trial whose worker has not beaten for ``grace_period`` seconds (it was
    killed) is marked failed and retried once more per ``max_retry`` by the next worker that asks for a trial.

    Workers started together race to create the schema; the loser retries and finds it there.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

    beat = {"interval": 10, "grace_period": 30, "max_retry": 2, **(heartbeat or {})}
    if url.startswith(JOURNAL):  # no heartbeat of its own: optuna_study beats (JournalBeat)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = url.removeprefix(JOURNAL)
        try:  # the open-file lock works on network filesystems (NFS, Lustre) where symlinks may not be atomic
            return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        except OSError as exc:
            raise ConfigError(f"--storage {url}: cannot open the journal file ({exc.strerror or exc})") from None
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
        except (SQLAlchemyError, ImportError) as exc:  # an unreachable server, a database driver not installed
            raise ConfigError(
                f"--storage {url}: cannot open the study storage ({type(exc).__name__}: {exc})".split("\n")[0]
            ) from None


class JournalBeat:
    """Heartbeats for a storage without its own (a journal file): while a trial runs, a thread stamps it with the
    time every ``interval`` seconds; ``retry_stale`` fails a running trial whose stamp (or, before the first one, its
    start) is more than ``grace_period`` seconds old and hands it to Optuna's ``RetryHeartbeatStaleTrialCallback``,
    as Optuna does for an RDB storage's heartbeats (at most ``max_retry`` retries; grace 120 s unless the study
    says). Workers' clocks must agree to within the grace period (they do under NTP)."""

    def __init__(self, study, heartbeat: dict | None):
        self.study = study
        # a longer default grace than an RDB's: a shared filesystem can stall a stamp for a while
        self.beat = {"interval": 10, "grace_period": 120, "max_retry": 2, **(heartbeat or {})}

    def retry_stale(self) -> None:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        now = time.time()
        for trial in self.study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            # a retried trial carries its predecessor's last stamp: its own start is the fresher
            stamp = max(trial.user_attrs.get(BEAT, 0.0), trial.datetime_start.timestamp())
            if now - stamp <= self.beat["grace_period"]:
                continue
            try:
                self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker failed it first: it retries it
                continue
            RetryHeartbeatStaleTrialCallback(max_retry=self.beat["max_retry"])(self.study, trial)  # Optuna's retry

    @contextmanager
    def beating(self, trial):
        stop = threading.Event()

        def beat() -> None:
            while True:
                try:
                    trial.set_user_attr(BEAT, time.time())
                except Exception as exc:  # a stalled shared filesystem: try again next interval, never stop beating
                    print(f"chainforget: heartbeat of trial {trial.number} not written ({exc})", file=sys.stderr)
                if stop.wait(self.beat["interval"]):
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat of trial {trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def first_attempt(trial) -> int:
    """The number of the trial this one retries (Optuna's ``failed_trial``; itself where it retries none): a retry
    runs in the first attempt's run directory, so its chain resumes from that attempt's stage checkpoint."""
    (frozen,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    return frozen.system_attrs.get("failed_trial", trial.number)


def duplicate_of(trial) -> int | None:
    """The grid point ``trial`` drew that another worker already ran or is running (the lower trial number
    keeps it), else ``None``. Optuna's grid sampler can hand the same point to two workers."""
    import optuna

    taken = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for other in trial.study.get_trials(deepcopy=False, states=taken):
        if other.number < trial.number and other.params == trial.params:
            return other.number
    return None


def refuse_data_parallel(config, path: Path) -> None:
    """A worker runs its chains in its own process, so the extra processes of a data-parallel chain (Lightning's
    launcher runs the command again for each) would be workers of their own, each taking a trial."""
    from lightning_modules.chain import check_trainer_options, trainer_options

    devices, nodes = config.trainer.devices, config.trainer.num_nodes
    if check_trainer_options(trainer_options(config)) > 1:  # as Lightning counts them (-1, auto, lists)
        raise ConfigError(
            f"{path}: trainer.devices={devices}, trainer.num_nodes={nodes}: an Optuna worker runs one process per "
            "chain; run one worker per device (sweeps/slurm/optuna_worker.sbatch), or data-parallel chains from a W&B "
            "agent"
        )


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

    from chainforget.plan import plan_chain
    from lightning_modules.chain import ChainStopped, run_chain

    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ConfigError(f"--n-trials {n_trials}: not allowed; use a positive number of trials")
    if storage:
        check_storage(storage)
    spec = load_study_spec(path, configs)  # everything a user can get wrong is refused before anything is created
    base = study_arguments(spec, configs) + ([f"--out={out}"] if out else [])
    refuse_data_parallel(parse_chain(base, "chainforget sweep optuna"), path)
    name = spec["study_name"]
    grid = (spec.get("sampler") or {}).get("name") == "grid"
    if not grid and not (n_trials or spec.get("n_trials")):
        raise ConfigError(f"{path}: n_trials: missing; only a grid study knows when it is done (or pass --n-trials)")
    storage_url = storage or f"sqlite:///{Path(out or 'runs') / 'optuna' / name}.db"
    sampler, pruner = make_sampler(spec, path), make_pruner(spec, path)
    if storage_url.startswith("sqlite:///"):
        folder = Path(storage_url.removeprefix("sqlite:///")).parent
        if storage and not folder.is_dir():  # as SQLite itself would refuse it: a mistyped path makes no folders
            raise ConfigError(f"--storage {storage_url}: no folder {folder}; create it or correct the path")
        try:
            folder.mkdir(parents=True, exist_ok=True)  # the default storage's folder, under --out
        except OSError as exc:
            raise ConfigError(f"--storage {storage_url}: cannot create {folder} ({exc.strerror})") from None
    multi = len(spec["objectives"]) > 1
    with warnings.catch_warnings():  # heartbeats and metric names are "experimental" in Optuna: nothing to act on
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=name,
            storage=make_storage(storage_url, spec.get("heartbeat")),
            load_if_exists=True,
            directions=spec["directions"],
            sampler=sampler,
            pruner=pruner,
        )
        study.set_metric_names(list(spec["objectives"]))  # what optuna-dashboard and trials_dataframe() show
    journal = JournalBeat(study, spec.get("heartbeat")) if storage_url.startswith(JOURNAL) else None

    def objective(trial):
        params = {}
        for key, param in spec["params"].items():
            if param["type"] == "categorical":
                params[key] = trial.suggest_categorical(key, param["choices"])
            else:
                suggest = trial.suggest_int if param["type"] == "int" else trial.suggest_float
                step = {"step": param["step"]} if "step" in param else {}
                params[key] = suggest(key, param["low"], param["high"], log=param.get("log", False), **step)
        original = duplicate_of(trial) if grid else None
        if original is not None:
            trial.set_user_attr("duplicate_of", original)
            raise optuna.TrialPruned(f"grid point already taken by trial {original}")
        config = parse_chain([*base, *(as_override(k, v) for k, v in params.items())], "chainforget sweep optuna")
        config = replace(
            config, run_name=f"{name}-trial{first_attempt(trial)}", wandb=replace(config.wandb, group=name)
        )

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
            with journal.beating(trial) if journal else nullcontext():
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

    total = grid_size(spec) if grid else n_trials or spec.get("n_trials")
    budget, ran = n_trials or spec.get("n_trials"), 0

    def count(study, trial) -> None:
        # a grid point another worker took first does not use up this worker's trials (a job array of one trial
        # per job would otherwise end a job without running anything)
        nonlocal ran
        ran += "duplicate_of" not in trial.user_attrs
        if budget is not None and ran >= budget:
            study.stop()

    callbacks = [progress(name, total), count]
    if journal is not None:  # before the first trial and after every one, as Optuna checks an RDB's heartbeats
        journal.retry_stale()
        callbacks.append(lambda study, trial: journal.retry_stale())
    study.optimize(objective, catch=(), callbacks=callbacks)
    return study


def grid_size(spec: dict) -> int:
    return math.prod(len(param["choices"]) for param in spec["params"].values())


def progress(name: str, total: int | None):
    """An Optuna callback printing ``study_progress``'s line after each trial, from what the storage holds (every
    worker's trials, so the line is the study's, not this worker's)."""
    import optuna

    states = optuna.trial.TrialState

    def after_trial(study, _trial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == states.COMPLETE]
        minutes = [(t.datetime_complete - t.datetime_start).total_seconds() / 60 for t in done]
        running = sum(t.state == states.RUNNING for t in trials)
        print(study_progress(name, len(done), total, minutes, running), file=sys.stderr, flush=True)

    return after_trial
