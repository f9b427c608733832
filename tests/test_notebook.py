"""The analysis notebook, executed top to bottom on what researchers really have: a local run tree, and the W&B
offline runs of the same chains next to a crashed chain, a pruned Optuna trial and a ``chainforget fit`` run."""

from dataclasses import replace
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis.runs import load_runs
from chainforget.cli import main
from chainforget.config import parse_chain
from lightning_modules.chain import ChainStopped, run_chain

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis" / "notebooks" / "biased_forgetting.ipynb"


def crash(stage: int, summary: dict) -> None:
    raise RuntimeError("out of memory (planted)")


def prune(stage: int, summary: dict) -> None:
    raise ChainStopped(f"pruned after stage {stage}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Both orders x two seeds and a replay-stage chain (tiny model, curvature on), each with its offline W&B run
    under ``<run dir>/wandb/``; a chain that crashes and one pruned after stage 1 (W&B runs, no run.json); a
    ``chainforget fit`` run logged offline to ``fit/wandb/``; and a two-objective Optuna study."""
    import optuna

    out = tmp_path_factory.mktemp("tree")
    args = ["--config", str(ROOT / "sweeps/configs/smoke.yaml"), f"--out={out}", f"--cache_dir={out / '.cache'}"]
    args += [f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}", f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}"]
    args += ["--train.steps=4", "--eval.bootstrap=50", "--wandb.mode=offline"]
    args += ["--curvature.enabled=true", "--curvature.batches=1", "--curvature.max_iter=3"]
    base = parse_chain(args, prog="test")
    for order in (["bbq", "csqa"], ["csqa", "bbq"]):
        for seed in (0, 1):
            run_chain(replace(base, order=order, seed=seed, run_name=f"{'-'.join(order)}-s{seed}"), progress=False)
    replay = replace(base.mitigation, name="replay_stage", strength=0.5)
    run_chain(replace(base, mitigation=replay, run_name="replay"), progress=False)
    with pytest.raises(RuntimeError, match="planted"):
        run_chain(replace(base, run_name="crashed"), progress=False, on_stage=crash)
    with pytest.raises(ChainStopped):
        run_chain(replace(base, run_name="pruned", seed=7), progress=False, on_stage=prune)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # stage_smoke.yaml names the fixture data relative to the repository root
        fit = ["fit", "--config", "sweeps/configs/stage_smoke.yaml", "--trainer.max_steps=2"]
        fit += [f"--trainer.default_root_dir={out / 'fit'}", "--trainer.logger=lightning.pytorch.loggers.WandbLogger"]
        fit += ["--trainer.logger.init_args.offline=true", f"--trainer.logger.init_args.save_dir={out / 'fit'}"]
        assert main(fit) == 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{out / 'pareto.db'}", directions=["minimize", "maximize"])
    study.set_metric_names(["forgetting/bbq", "final/csqa/acc"])  # as `chainforget sweep optuna` names them
    for x, y in ((1.0, 0.2), (2.0, 0.5), (3.0, 0.4)):
        study.add_trial(optuna.trial.create_trial(values=[x, y], params={}, distributions={}))
    return out


def execute(source: str, study: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as patch:  # the kernel inherits the environment
        patch.setenv("CHAINFORGET_RUNS", source)
        patch.setenv("CHAINFORGET_STUDY", study)
        where = {"metadata": {"path": str(ROOT)}}
        client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=where)
        client.execute()
    return notebook


@pytest.fixture(scope="module")
def executed(tree):
    study = f"sqlite:///{tree / 'pareto.db'}"
    return {"local": execute(str(tree), study), "offline": execute(f"wandb-offline:{tree}", study)}


def cells(notebook: nbformat.NotebookNode, tag: str) -> list:
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def shown(cell, kind: str) -> list[str]:
    return [o["data"][kind] for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_offline_runs_without_a_run_record_are_skipped_with_their_state_and_reason(tree):
    with pytest.warns(UserWarning, match="skipped 3 of 8 runs that have no run.json") as caught:
        runs = load_runs(f"wandb-offline:{tree}")
    assert len(caught) == 1
    names = sorted(record["run_name"] for record in runs.records)
    assert names == ["bbq-csqa-s0", "bbq-csqa-s1", "csqa-bbq-s0", "csqa-bbq-s1", "replay"]
    skipped = runs.skipped.set_index("name", drop=False)
    assert skipped.loc["crashed", "state"] == "failed"  # exit code 1
    assert skipped.loc["crashed", "reason"] == "chain ended without a run record (see state)"
    assert skipped.loc["pruned", "state"] == "finished"  # ChainStopped ends the W&B run cleanly
    assert skipped.loc["pruned", "reason"] == "chain stopped early (pruned after stage 1)"
    fit = runs.skipped[runs.skipped["where"].str.contains(str(tree / "fit"))]
    assert fit[["state", "reason"]].values.tolist() == [["finished", "not a chainforget chain (job type unset)"]]
    # one replay ratio among the runs where it acts: the ratio does not vary, so it is not in the label
    plain = {"bbq → csqa (mitigation.name=none)", "csqa → bbq (mitigation.name=none)"}
    assert set(runs.runs["condition"]) == plain | {"bbq → csqa (mitigation.name=replay_stage)"}


def test_notebook_gives_the_same_tables_from_the_local_tree_and_the_offline_runs(executed):
    local, offline = executed["local"], executed["offline"]
    for notebook in (local, offline):
        assert [o for cell in notebook.cells for o in cell.get("outputs", []) if o["output_type"] == "error"] == []
    local_tables, offline_tables = cells(local, "table"), cells(offline, "table")
    assert len(local_tables) >= 9
    for here, there in zip(local_tables, offline_tables):
        assert shown(here, "text/html") and shown(here, "text/html") == shown(there, "text/html"), here.source
    (skipped,) = [cell for cell in offline.cells if cell.cell_type == "code" and "runs.skipped" in cell.source]
    assert shown(skipped, "text/html")[0].count("<tr") == 4  # a header row and the three skipped runs


def test_every_figure_cell_shows_exactly_one_figure(executed):
    for notebook in executed.values():
        figures = cells(notebook, "figure")
        assert len(figures) == 7  # accuracy, group bars, heatmap, asymmetry, replay, curvature, Pareto front
        assert [len(shown(cell, "image/png")) for cell in figures] == [1] * len(figures)
        assert sum(len(shown(cell, "image/png")) for cell in notebook.cells) == len(figures)  # nowhere else
