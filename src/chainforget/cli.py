"""The ``chainforget`` command.

    chainforget demo  [--out runs/demo] [--config FILE] [overrides]   both orders of the default experiment
    chainforget chain --config FILE [--dotted.key=value ...]          one chain
    chainforget fit   --config FILE [--trainer.max_steps N] [...]     one stage through LightningCLI
    chainforget validate|test|predict --config FILE [--ckpt_path C]   a stage scored on its eval split
    chainforget tasks [--config FILE [overrides]]                     registered tasks; with a chain
                                                                       config, their sizes and groups
    chainforget sweep wandb-local FILE [--count N]                    a W&B sweep YAML without a server
    chainforget sweep optuna FILE [--storage URL] [--n-trials N]      an Optuna study (one worker)
    chainforget report --source SOURCE --out DIR                      HTML + Markdown report of runs

Errors a user can cause print one line and exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chainforget.config import ChainConfig, parse_chain
from chainforget.errors import ChainforgetError, ConfigError

DEMO_CONFIG = Path(__file__).with_name("configs") / "demo.yaml"
DEMO_ORDERS = (["bbq", "csqa"], ["csqa", "bbq"])
USAGE = (
    "usage: chainforget {demo,chain,fit,validate,test,predict,tasks,sweep,report} [--debug] [options]"
    "  (chainforget COMMAND --help for options)"
)


def run() -> int:
    """The console script: ``main`` on tcmalloc where it is installed (chainforget.allocator)."""
    from chainforget.allocator import reexec_on_tcmalloc

    reexec_on_tcmalloc()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"chain": chain, "demo": demo, "fit": fit, "tasks": list_tasks, "sweep": sweep, "report": report}
    commands |= {name: lambda rest, name=name: fit(rest, name) for name in ("validate", "test", "predict")}
    if command not in commands:
        print(f"chainforget: unknown command {command!r}; use one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # oneDNN keeps compiled kernels for the last 1,024 matmul shapes it met; every new sequence length adds some,
    # about 6 MB each, and bucketed batches meet hundreds (a whole demo: ~250 MB). 256 keeps what a stage reuses
    # (same speed, measured) and caps the rest. Read when oneDNN first runs, so set before any matmul.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    try:
        check_environment()
        return commands[command](rest) or 0
    except (ChainforgetError, argparse.ArgumentError) as exc:
        if debug:
            raise
        message = " ".join(str(exc).split())
        print(f"chainforget {command}: error: {message}", file=sys.stderr)
        return 2


def chain(argv: list[str]) -> int:
    _single_thread_if_asked()
    from analysis.tables import summary_text
    from lightning_modules.chain import run_chain, writes_the_run

    config = check_chain(argv)
    record = run_chain(config)
    if writes_the_run():  # not the ranks above 0 of a data-parallel chain, which wrote nothing
        print(summary_text([record]))
        print(f"run written to {Path(config.out) / record['run_name']}")
    return 0


def check_chain(argv: list[str], prog: str = "chainforget chain") -> ChainConfig:
    """The config ``chain`` runs, checked as ``run_chain`` checks it before it reads data or loads a model
    (``lightning_modules.chain.preflight``): a user's error raises ChainforgetError, nothing is written. Cheap
    (no data, no model), so tests can try many configs through it."""
    from lightning_modules.chain import preflight

    config = parse_chain(argv, prog)
    preflight(config)
    return config


def demo(argv: list[str]) -> int:
    """Both orders of the default experiment (SmolLM2-135M-Instruct + LoRA, BBQ and CommonsenseQA)."""
    _single_thread_if_asked()
    from dataclasses import replace

    from analysis.report import write_report
    from analysis.tables import summary_text
    from lightning_modules.chain import run_chain

    base = parse_chain(argv, "chainforget demo", defaults=DEMO_CONFIG)
    records = []
    for order in DEMO_ORDERS:
        wandb = replace(base.wandb, group=base.wandb.group or base.run_name)  # both orders in one W&B group
        config = replace(base, order=order, run_name="-".join(order), wandb=wandb)
        print(f"== chain {' -> '.join(order)} ==", file=sys.stderr, flush=True)
        records.append(run_chain(config))
    print(summary_text(records))
    report = write_report(Path(base.out), Path(base.out) / "report")
    print(f"runs in {base.out}/, report: {report}")
    return 0


def fit(argv: list[str], subcommand: str = "fit") -> int:
    """One stage through LightningCLI: ``fit`` it, or ``validate``/``test``/``predict`` it on its eval split."""
    _single_thread_if_asked()
    from lightning_modules.cli import run_stage

    run_stage(subcommand, argv)
    return 0


def list_tasks(argv: list[str]) -> int:
    """The task registry; with ``--config``, every task of that chain loaded: split sizes and group counts."""
    import pandas as pd

    from chainforget import tasks

    if not argv:
        rows = [
            {
                "task": name,
                "role": (t := tasks.get(name)).role,
                "sources": ", ".join(t.sources),
                "groups": ", ".join(t.group_kinds) or "-",
            }
            for name in tasks.names()
        ]
        print(pd.DataFrame(rows).to_string(index=False))
        return 0
    config = parse_chain(argv, "chainforget tasks")
    rows = []
    for name, data in tasks.load_all(config.tasks, config.seed, config.train_size).items():
        groups = []
        for kind in data.group_kinds:
            sizes = pd.Series([e.groups[kind] for e in data.eval]).value_counts()
            groups.append(f"{kind}: {len(sizes)} (eval n {sizes.min()}-{sizes.max()})")
        rows.append(
            {
                "task": name,
                "role": data.role,
                "source": tasks.resolve_source(tasks.get(name), config.tasks[name]).source,
                "train": len(data.train),
                "eval": len(data.eval),
                "groups": "; ".join(groups) or "-",
            }
        )
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose every refusal ``main`` prints on one line: argparse's own ``error`` prints the usage too and
    exits, which it still does for unknown or missing arguments under ``exit_on_error=False``."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, message)


def positive(text: str) -> int:
    """A count of runs or trials."""
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text} is not allowed; use a positive integer")
    return int(text)


def sweep(argv: list[str]) -> int:
    """``sweep wandb-local FILE``: drive a W&B sweep YAML with W&B's own engine, without a server."""
    parser = Parser(prog="chainforget sweep", exit_on_error=False)
    engines = parser.add_subparsers(dest="engine", required=True)
    local = engines.add_parser("wandb-local", help="run a W&B sweep YAML without a W&B server (offline runs)")
    local.add_argument("file", type=Path)
    local.add_argument("--count", type=positive, default=None, help="runs to start (required for random and bayes)")
    local.add_argument(
        "--sweep-id",
        default=None,
        help="names the runs and their W&B group; running the same "
        "sweep id again continues it (default: the file's name)",
    )
    study = engines.add_parser("optuna", help="run or join an Optuna study (start several workers to share it)")
    study.add_argument("file", type=Path)
    study.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB URL or journal:///FILE (default: sqlite:///<out>/optuna/<study>.db)",
    )
    study.add_argument(
        "--n-trials", type=positive, default=None, help="trials for this worker (grid studies stop by themselves)"
    )
    study.add_argument("--out", default=None, help="run directory root (default: the chain config's out)")
    study.add_argument(
        "--config", action="append", default=[], help="extra chain config after the study's base (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.engine == "optuna":
        return run_optuna(args)
    from lightning_modules.search import wandb_local

    results = wandb_local(args.file, count=args.count, sweep_id=args.sweep_id)
    for result in results:
        status = "failed" if result["returncode"] else f"objective {result['metric']} = {result['objective']}"
        print(f"{result['run_id']}: {status}  {result['run_dir']}")
    return 1 if any(r["returncode"] != 0 for r in results) else 0


def report(argv: list[str]) -> int:
    """``report --source S --out DIR``: S is a run directory tree, ``wandb-offline:DIR`` or ``wandb:ENTITY/PROJECT``."""
    parser = Parser(prog="chainforget report", exit_on_error=False)
    parser.add_argument("--source", required=True, help="runs dir, wandb-offline:<dir> or wandb:<entity>/<project>")
    parser.add_argument("--out", required=True, type=Path, help="directory for report.html, report.md and figures")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: a file; use a folder for report.html, report.md and the figures")
    from analysis.report import write_report

    print(f"report: {write_report(args.source, args.out)}")
    return 0


def run_optuna(args) -> int:
    _single_thread_if_asked()
    from lightning_modules.search import optuna_study

    study = optuna_study(args.file, storage=args.storage, n_trials=args.n_trials, out=args.out, configs=args.config)
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    print(f"study {study.study_name}: {len(finished)} complete of {len(study.trials)} trials")
    best = study.best_trials if len(study.directions) > 1 else ([study.best_trial] if finished else [])
    for trial in best:
        print(
            f"  trial {trial.number}: values {trial.values} params {trial.params} run {trial.user_attrs.get('run_dir')}"
        )
    return 0


def check_environment() -> None:
    """The environment variables chainforget reads, checked before anything runs: a typo would otherwise be ignored
    (CHAINFORGET_MALLOC) or fail only once files are written (WANDB_MODE, read when the W&B run starts)."""
    threads = os.environ.get("CHAINFORGET_THREADS")
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ConfigError(f"CHAINFORGET_THREADS={threads!r}: not allowed; use a positive number of torch threads")
    malloc = os.environ.get("CHAINFORGET_MALLOC")
    if malloc and malloc != "system":
        raise ConfigError(
            f"CHAINFORGET_MALLOC={malloc!r}: not allowed; use system (glibc's malloc), or leave it unset for tcmalloc"
        )
    mode = os.environ.get("WANDB_MODE")
    if mode and mode not in ("online", "offline", "disabled"):  # the common ones without importing wandb
        import typing

        from wandb.sdk.wandb_settings import Settings

        modes = typing.get_args(Settings.model_fields["mode"].annotation)  # W&B's own list
        if mode not in modes:
            raise ConfigError(f"WANDB_MODE={mode!r}: not allowed; use one of {', '.join(modes)}")


def _single_thread_if_asked() -> None:
    threads = os.environ.get("CHAINFORGET_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


if __name__ == "__main__":
    sys.exit(run())
