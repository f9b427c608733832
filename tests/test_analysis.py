import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import pandas as pd

from analysis.runs import evals_frame, forgetting_frame, load_records, load_runs
from analysis.tables import accuracy_table, score_changes, summary_text
from chainforget.cli import main, parse_chain
from chainforget.errors import DataError
from lightning_modules.chain import run_chain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_orders(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = parse_chain(["--config", str(ROOT / "sweeps/configs/smoke.yaml"), f"--out={out}",
                        f"--cache_dir={out / '.cache'}", "--train.steps=8",
                        f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}", f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}"],
                       prog="test")  # fmt: skip
    records = [run_chain(replace(base, order=order, run_name="-".join(order)), progress=False)
               for order in (["bbq", "csqa"], ["csqa", "bbq"])]  # fmt: skip
    return out, records


def test_frames_and_tables_agree_with_the_records(two_orders):
    out, records = two_orders
    loaded = load_records(out)
    assert [r["run_name"] for r in loaded] == ["bbq-csqa", "csqa-bbq"]
    evals = evals_frame(loaded)
    assert set(evals["order"]) == {"bbq → csqa", "csqa → bbq"}
    table = accuracy_table(loaded)
    for record in records:
        order = " → ".join(record["config"]["order"])
        for row in record["eval"]:
            if row["group_kind"] == "all":
                assert table.loc[(order, row["stage"]), row["task"]] == pytest.approx(round(100 * row["acc"], 1))
    forgetting = forgetting_frame(loaded)
    whole = forgetting[(forgetting["group_kind"] == "all")].set_index("order")
    assert whole.loc["bbq → csqa", "task"] == "bbq" and whole.loc["csqa → bbq", "task"] == "csqa"
    text = summary_text(loaded)
    assert "bbq → csqa" in text and "csqa → bbq" in text and "Forgetting F" in text


def test_report_writes_markdown_and_self_contained_html(two_orders, capsys):
    out, records = two_orders
    assert main(["report", "--source", str(out), "--out", str(out / "report")]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "![Accuracy per stage (%)](accuracy_by_stage.png)" in text
    assert "| bbq → csqa | bbq |" in text
    for name in ("accuracy_by_stage.png", "group_forgetting.png", "forgetting_heatmap.png", "order_asymmetry.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    page = (out / "report" / "report.html").read_text()
    assert page.count("<img ") == 4 and "src='data:image/png;base64," in page  # figures embedded
    assert all(f"config of {r['run_name']}" in page for r in records) and "<h2>Runs</h2>" in page


def test_loading_a_directory_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no run.json found"):
        load_records(tmp_path)


def test_analysis_imports_without_torch_or_lightning():
    code = "import sys, analysis, analysis.report; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_score_changes_compare_the_trained_stage_with_the_last():
    def score(task, stage, group, **values):
        return {"task": task, "stage": stage, "group_kind": "category" if task == "bbq" else "target", "group": group, **values}

    record = {
        "run_name": "r", "config": {"order": ["bbq", "csqa"]},
        "eval": [{"stage": k} for k in (0, 1, 2)],
        "metrics": {
            "task_scores": [
                score("bbq", 1, "Age", s_amb=2.0, s_dis=10.0), score("bbq", 2, "Age", s_amb=9.5, s_dis=None),
                score("toxigen", 0, "asian", balanced_acc=0.5), score("toxigen", 2, "asian", balanced_acc=0.75),
            ],
        },
    }  # fmt: skip
    changes = score_changes([record]).set_index(["task", "score"])
    assert changes.loc[("bbq", "s_AMB"), ["from_stage", "before", "after", "change"]].tolist() == [1, 2.0, 9.5, 7.5]
    assert ("bbq", "s_DIS") not in changes.index  # no value at the last stage: no change reported
    # toxigen is a probe, never trained: its change is measured from the base model
    assert changes.loc[("toxigen", "balanced acc"), ["from_stage", "change"]].tolist() == [0, 25.0]
    record["config"]["order"] = ["csqa", "bbq"]  # bbq trained last: nothing forgotten yet
    assert "bbq" not in set(score_changes([record])["task"])


def test_local_and_offline_wandb_sources_give_identical_frames(two_orders):
    out, _ = two_orders
    local, offline = load_runs(out), load_runs(f"wandb-offline:{out}")
    pd.testing.assert_frame_equal(local.runs, offline.runs)
    pd.testing.assert_frame_equal(local.evals, offline.evals)
    pd.testing.assert_frame_equal(local.predictions(), offline.predictions())
    assert set(local.predictions(["bbq-csqa"])["run_name"]) == {"bbq-csqa"}
    assert local.runs.loc[0, "train.steps"] == 8 and local.runs.loc[0, "model.name"] == "tiny"


class FakeFile:
    def __init__(self, source, downloads):
        self.source, self.downloads = source, downloads

    def download(self, root, replace=False):
        self.downloads.append(self.source.name)
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source, Path(root) / self.source.name)


class FakeRun:
    """The part of wandb.apis.public.Run the adapter uses: .id, .config, .summary, .file(name).download()."""

    def __init__(self, run_dir, downloads):
        record = json.loads((run_dir / "run.json").read_text())
        self.id, self.config, self.summary = record["run_name"], record["config"], {}
        self.run_dir, self.downloads = run_dir, downloads

    def file(self, name):
        return FakeFile(self.run_dir / name, self.downloads)


class FakeApi:
    def __init__(self, run_dirs):
        self.run_dirs, self.downloads, self.calls = run_dirs, [], []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [FakeRun(d, self.downloads) for d in self.run_dirs]


def test_wandb_api_source_downloads_once_and_matches_the_local_frames(two_orders, tmp_path):
    out, _ = two_orders
    api = FakeApi([out / "bbq-csqa", out / "csqa-bbq"])
    first = load_runs("wandb:team/chainforget", filters={"group": "g"}, api=api, cache_dir=tmp_path)
    assert api.calls == [("team/chainforget", {"group": "g"})]
    assert api.downloads == ["run.json", "run.json"]  # predictions are lazy
    pd.testing.assert_frame_equal(first.evals, load_runs(out).evals)
    first.predictions()
    again = load_runs("wandb:team/chainforget", filters={"group": "g"}, api=api, cache_dir=tmp_path)
    again.predictions()
    assert api.downloads == ["run.json", "run.json", "predictions.parquet", "predictions.parquet"]  # cached since


def test_unreachable_wandb_project_is_a_clear_error(tmp_path):
    class Offline:
        def runs(self, path, filters=None):
            raise ConnectionError("no route to host")

    with pytest.raises(DataError, match=r"wandb:team/x: cannot list runs \(ConnectionError: no route to host\)"):
        load_runs("wandb:team/x", api=Offline(), cache_dir=tmp_path)


def test_notebook_runs_top_to_bottom_on_tiny_model_runs(two_orders, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out, _ = two_orders
    study = tmp_path / "pareto.db"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pareto = optuna.create_study(storage=f"sqlite:///{study}", directions=["minimize", "maximize"])
    for x, y in ((1.0, 0.2), (2.0, 0.5), (3.0, 0.4)):
        pareto.add_trial(optuna.trial.create_trial(values=[x, y], params={}, distributions={}))
    monkeypatch.setenv("CHAINFORGET_RUNS", str(out))
    monkeypatch.setenv("CHAINFORGET_STUDY", f"sqlite:///{study}")
    notebook = nbformat.read(ROOT / "analysis" / "notebooks" / "biased_forgetting.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # accuracy, group bars, heatmap, asymmetry, Pareto front
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
