import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from analysis import plots
from analysis.runs import evals_frame, forgetting_frame, load_records, load_runs
from analysis.tables import accuracy_table, score_changes, summary_text
from chainforget.cli import main
from chainforget.config import parse_chain
from chainforget.errors import DataError
from lightning_modules.chain import run_chain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_orders(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = parse_chain(
        [
            "--config",
            str(ROOT / "sweeps/configs/smoke.yaml"),
            f"--out={out}",
            f"--cache_dir={out / '.cache'}",
            "--train.steps=8",
            "--wandb.mode=offline",
            f"--tasks.bbq.path={ROOT / 'tests/fixtures/bbq'}",
            f"--tasks.csqa.path={ROOT / 'tests/fixtures/csqa'}",
        ],
        prog="test",
    )
    records = [
        run_chain(replace(base, order=order, run_name="-".join(order)), progress=False)
        for order in (["bbq", "csqa"], ["csqa", "bbq"])
    ]
    return out, records


def test_frames_and_tables_agree_with_the_records(two_orders):
    out, records = two_orders
    loaded = load_records(out)
    assert [r["run_name"] for r in loaded] == ["bbq-csqa", "csqa-bbq"]
    evals = evals_frame(loaded)
    assert set(evals["order"]) == {"bbq → csqa", "csqa → bbq"}
    assert set(evals["condition"]) == {"bbq → csqa", "csqa → bbq"}  # only the order differs: nothing else to show
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
    assert "| bbq → csqa | 0 | bbq |" in text  # condition, seed, task
    figures = ("accuracy_by_stage", "group_forgetting", "forgetting_heatmap", "example_forgetting", "order_asymmetry")
    for name in figures:
        data = (out / "report" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "![Per-example forgetting and learning (pp)](example_forgetting.png)" in text
    # one seed per condition: the MDEs come from each run's own forgotten / learned shares
    power = text.split("## Power before data (pp)")[1].split("## ")[0]
    assert "| bbq → csqa | bbq | 1 |" in power and "| examples |" in power and "seeds" not in power.split("|---")[1]
    page = (out / "report" / "report.html").read_text()
    assert page.count("<img ") == 5 and "src='data:image/png;base64," in page  # figures embedded
    assert all(f"config of {r['run_name']}" in page for r in records) and "<h2>Runs</h2>" in page


def test_the_report_leaves_out_per_example_forgetting_for_records_written_before_it(two_orders):
    from analysis.report import sections

    runs = load_runs(two_orders[0])
    for record in runs.records:
        del record["metrics"]["example_forgetting"]
    headings = [heading for heading, *_ in sections(runs)]
    assert "Forgetting and biased forgetting (pp)" in headings and not any("Per-example" in h for h in headings)
    plots.plt.close("all")


def test_loading_a_directory_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no run.json found"):
        load_records(tmp_path)


def test_analysis_imports_without_torch_or_lightning():
    code = "import sys, analysis, analysis.report; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_score_changes_compare_the_trained_stage_with_the_last():
    def score(task, stage, group, **values):
        return {
            "task": task,
            "stage": stage,
            "group_kind": "category" if task == "bbq" else "target",
            "group": group,
            **values,
        }

    record = {
        "run_name": "r",
        "config": {"order": ["bbq", "csqa"], "seed": 0},
        "mitigation": {"name": "none", "kind": "none", "knobs": []},
        "eval": [{"stage": k} for k in (0, 1, 2)],
        "tasks": {
            "bbq": {"role": "safety", "group_kinds": ["category"], "trained_stage": 1},
            "csqa": {"role": "capability", "group_kinds": [], "trained_stage": 2},
            "toxigen": {"role": "safety", "group_kinds": ["target"], "trained_stage": None},
        },
        "metrics": {
            "task_scores": [
                score("bbq", 1, "Age", s_amb=2.0, s_dis=10.0),
                score("bbq", 2, "Age", s_amb=9.5, s_dis=None),
                score("toxigen", 0, "asian", balanced_acc=0.5),
                score("toxigen", 2, "asian", balanced_acc=0.75),
            ],
        },
    }
    changes = score_changes([record]).set_index(["task", "score"])
    assert changes.loc[("bbq", "s_AMB"), ["from_stage", "before", "after", "change"]].tolist() == [1, 2.0, 9.5, 7.5]
    assert ("bbq", "s_DIS") not in changes.index  # no value at the last stage: no change reported
    # toxigen is a probe, never trained: its change is measured from the base model
    assert changes.loc[("toxigen", "balanced acc"), ["from_stage", "change"]].tolist() == [0, 25.0]
    record["config"]["order"] = ["csqa", "bbq"]  # bbq trained last: nothing forgotten yet
    record["tasks"]["bbq"]["trained_stage"], record["tasks"]["csqa"]["trained_stage"] = 2, 1
    assert "bbq" not in set(score_changes([record])["task"])


def test_local_and_offline_wandb_sources_give_identical_frames(two_orders):
    out, _ = two_orders
    local, offline = load_runs(out), load_runs(f"wandb-offline:{out}")
    pd.testing.assert_frame_equal(local.runs, offline.runs)
    pd.testing.assert_frame_equal(local.evals, offline.evals)
    pd.testing.assert_frame_equal(local.predictions(), offline.predictions())
    assert set(local.predictions(["bbq-csqa"])["run_name"]) == {"bbq-csqa"}
    assert local.runs.loc[0, "train.steps"] == 8 and local.runs.loc[0, "model.name"] == "tiny"


class FakeServiceApi:
    """The two calls wandb.apis.public.Run and File make to fetch run files, answered from local run folders: the
    RunFiles GraphQL query (a run's files by name) and the download request wandb-core would carry out."""

    def __init__(self, folders: dict[str, Path]):
        self.folders, self.downloads = folders, []

    def execute_graphql(self, query, variables=None, **_):
        folder = self.folders[variables["name"]]
        names = [name for name in variables["fileNames"] if (folder / name).is_file()]
        edges = []
        for name in names:
            node = {"id": name, "name": name, "url": str(folder / name), "sizeBytes": (folder / name).stat().st_size}
            edges.append({"cursor": name, "node": node | dict.fromkeys(("directUrl", "mimetype", "updatedAt", "md5"))})
        page = {"edges": edges, "pageInfo": {"endCursor": None, "hasNextPage": False}}
        return {"project": {"internalId": "1", "run": {"fileCount": len(edges), "files": page}}}

    def send_api_request(self, request):
        download = request.download_file_request
        Path(download.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(download.url, download.path)
        self.downloads.append(Path(download.path).name)


class FakeApi:
    """``wandb.Api().runs(path, filters)``: the runs as wandb.apis.public.Run objects built from their attributes,
    as the API builds them from a GraphQL page."""

    def __init__(self, runs: dict[str, tuple[Path, dict]]):
        self.service = FakeServiceApi({run_id: folder for run_id, (folder, _) in runs.items()})
        self.runs_attrs, self.calls = {run_id: attrs for run_id, (_, attrs) in runs.items()}, []

    def runs(self, path, filters=None):
        from wandb.apis.public import Run

        self.calls.append((path, filters))
        entity, project = path.split("/")
        attrs = self.runs_attrs.items()
        return [Run(self.service, entity, project, run_id, attrs={"name": run_id, **a}) for run_id, a in attrs]


def chain_attrs(name: str, state: str = "finished", **attrs) -> dict:
    return {"displayName": name, "state": state, "jobType": "chain", "tags": [], **attrs}


def test_wandb_api_source_downloads_once_and_matches_the_local_frames(two_orders, tmp_path):
    out, _ = two_orders
    api = FakeApi(
        {"r1": (out / "bbq-csqa", chain_attrs("bbq-csqa")), "r2": (out / "csqa-bbq", chain_attrs("csqa-bbq"))}
    )
    first = load_runs("wandb:team/chainforget", filters={"group": "g"}, api=api, cache_dir=tmp_path)
    assert api.calls == [("team/chainforget", {"group": "g"})]
    assert api.service.downloads == ["run.json", "run.json"]  # predictions are lazy
    pd.testing.assert_frame_equal(first.evals, load_runs(out).evals)
    assert first.skipped.empty
    first.predictions()
    again = load_runs("wandb:team/chainforget", filters={"group": "g"}, api=api, cache_dir=tmp_path)
    again.predictions()
    assert api.service.downloads == ["run.json", "run.json", "predictions.parquet", "predictions.parquet"]  # cached


def test_wandb_runs_without_a_run_record_are_skipped_and_reported_once(two_orders, tmp_path):
    out, _ = two_orders
    empty = tmp_path / "no-files"
    empty.mkdir()
    stopped = chain_attrs("trial-3", tags=["stopped"], summaryMetrics='{"stopped": "pruned after stage 1"}')
    fit = {"displayName": "fit", "state": "finished", "jobType": None, "tags": []}
    project = {
        "r1": (out / "bbq-csqa", chain_attrs("bbq-csqa")),
        "r2": (empty, chain_attrs("crashed-chain", "failed")),
        "r3": (empty, stopped),
        "r4": (empty, fit),
    }
    api = FakeApi(project)
    with pytest.warns(UserWarning, match="skipped 3 of 4 runs that have no run.json") as caught:
        runs = load_runs("wandb:team/p", api=api, cache_dir=tmp_path / "cache")
    assert len(caught) == 1 and [r["run_name"] for r in runs.records] == ["bbq-csqa"]
    skipped = runs.skipped
    assert skipped[["id", "name", "state"]].values.tolist() == [
        ["r2", "crashed-chain", "failed"],
        ["r3", "trial-3", "finished"],
        ["r4", "fit", "finished"],
    ]
    assert skipped["reason"].tolist() == [
        "chain ended without a run record (see state)",
        "chain stopped early (pruned after stage 1)",
        "not a chainforget chain (job type unset)",
    ]
    assert skipped["where"].tolist() == ["team/p/r2", "team/p/r3", "team/p/r4"]
    api = FakeApi({"r2": (empty, chain_attrs("crashed-chain", "failed"))})
    with pytest.raises(DataError, match=r"none of the 1 runs has a run.json run file \(1 × chain ended without"):
        load_runs("wandb:team/p", api=api, cache_dir=tmp_path / "cache")


def test_predictions_of_a_source_without_them_are_a_clear_error():
    runs = load_runs(ROOT / "docs" / "results" / "runs")
    with pytest.raises(DataError, match="no predictions.parquet for run\\(s\\) findings-order-trial0"):
        runs.predictions(["findings-order-trial0"])


def test_unreachable_wandb_project_is_a_clear_error(tmp_path):
    class Offline:
        def runs(self, path, filters=None):
            raise ConnectionError("no route to host")

    with pytest.raises(DataError, match=r"wandb:team/x: cannot list runs \(ConnectionError: no route to host\)"):
        load_runs("wandb:team/x", api=Offline(), cache_dir=tmp_path)
