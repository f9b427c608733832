import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from analysis.report import write_report
from analysis.runs import evals_frame, forgetting_frame, load_records
from analysis.tables import accuracy_table, summary_text
from chainforget.cli import parse_chain
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


def test_report_writes_markdown_and_two_figures(two_orders):
    out, _ = two_orders
    report = write_report(out, out / "report")
    text = report.read_text()
    assert "![accuracy across stages](accuracy_by_stage.png)" in text
    assert "| bbq → csqa | bbq |" in text
    for name in ("accuracy_by_stage.png", "group_forgetting.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_loading_a_directory_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no run.json found"):
        load_records(tmp_path)


def test_analysis_imports_without_torch_or_lightning():
    code = "import sys, analysis, analysis.report; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
