"""Sweeps without a scheduler of our own: W&B sweep YAMLs driven locally by W&B's own engine, and Optuna.

``wandb_local`` is for clusters with no W&B server: it asks W&B's sweep engine (``sweeps.next_run``) for the
next parameters, builds the command exactly as ``wandb agent`` does (``create_sweep_command`` and
``create_sweep_command_args``), runs it as a subprocess with ``WANDB_MODE=offline`` and feeds the finished
run's summary metrics back to the engine (bayes needs them). The runs sync later with ``wandb sync``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from chainforget.errors import ConfigError
from chainforget.records import read_record, summary_metrics


def load_sweep(path: Path) -> dict:
    """A W&B sweep YAML, validated with the sweep engine's own schema."""
    import sweeps

    if not path.exists():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".split("\n")[0]) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
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
    from chainforget.cli import parse_chain

    if "chain" not in command:
        raise ConfigError(f"sweep command {shlex.join(command)!r} does not run `chainforget chain`")
    config = parse_chain(command[command.index("chain") + 1 :], "chainforget chain")
    return Path(config.out) / (config.run_name or run_id)


def wandb_local(path: Path, *, count: int | None = None, sweep_id: str | None = None) -> list[dict]:
    """Run the sweep in ``path`` to completion (grid) or for ``count`` runs; returns one summary per run."""
    import sweeps

    sweep = load_sweep(path)
    if count is None and sweep.get("method") != "grid":
        raise ConfigError(f"{path}: method {sweep.get('method')!r} never runs out of suggestions; pass --count N")
    sweep_id = sweep_id or f"local-{path.stem}"
    metric = (sweep.get("metric") or {}).get("name")
    history: list = []
    results = []
    while count is None or len(results) < count:
        suggestion = sweeps.next_run(sweep, history, validate=True)
        if suggestion is None:
            break
        parameters = {name: {"value": spec["value"]} for name, spec in suggestion.config.items()}
        run_id = f"{sweep_id}-{uuid.uuid4().hex[:8]}"
        command = agent_command(sweep, parameters)
        run_dir = chain_run_dir(command, run_id)
        env = dict(os.environ, WANDB_MODE="offline", WANDB_RUN_ID=run_id, WANDB_SWEEP_ID=sweep_id, WANDB_RUN_GROUP=sweep_id)
        print(f"[{sweep_id}] run {len(results) + 1}: {shlex.join(command)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, env=env)
        finished = done.returncode == 0 and (run_dir / "run.json").exists()
        summary = summary_metrics(read_record(run_dir)) if finished else {}
        if finished and metric and metric not in summary:
            raise ConfigError(f"{path}: metric.name {metric!r} is not in the run's summary (e.g. {', '.join(sorted(summary)[:4])})")
        state = sweeps.RunState.finished if finished else sweeps.RunState.failed
        history.append(sweeps.SweepRun(name=run_id, state=state, config=suggestion.config, summary_metrics=summary))
        results.append({"run_id": run_id, "run_dir": str(run_dir), "returncode": done.returncode, "parameters": parameters,
                        "objective": summary.get(metric) if metric else None})  # fmt: skip
    return results
