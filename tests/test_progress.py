"""Progress in a log file (a SLURM job): timed lines on stderr; stdout keeps the results."""

import io

from tqdm import tqdm

from chainforget.cli import main
from chainforget.progress import LogLines


def test_a_bar_in_a_log_file_writes_its_first_state_then_timed_lines_and_its_last_state():
    log = io.StringIO()
    with tqdm(total=50, desc="eval", file=LogLines(interval=3600, stream=log), ascii=True, ncols=80) as bar:
        for _ in range(50):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert " 0/50" in lines[0] and "100%" in lines[1] and "50/50" in lines[1]

    log = io.StringIO()
    with tqdm(total=3, file=LogLines(interval=0, stream=log), mininterval=0, ascii=True) as bar:
        for _ in range(3):
            bar.update(1)
    assert [line.split("|")[-1].split()[0] for line in log.getvalue().splitlines()][:4] == ["0/3", "1/3", "2/3", "3/3"]


def test_a_chain_writes_progress_to_stderr_and_only_results_to_stdout(smoke_config, capsys):
    paths = [f"--out={smoke_config.out}", f"--cache_dir={smoke_config.cache_dir}"]
    code = main(["chain", "--config", "sweeps/configs/smoke.yaml", *paths, "--train.steps=3", "--wandb.mode=disabled"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("Accuracy per stage") and "\n\n\n" not in out
    assert "it/s" not in out and "q/s" not in out
    for stage in ("train stage 1 (bbq)", "train stage 2 (csqa)", "eval bbq @ stage 0", "eval csqa @ stage 2"):
        assert stage in err
    assert "GPU available" not in err and "litlogger" not in err and "LeafSpec" not in err


def test_a_studys_progress_line_counts_what_is_done_and_what_is_left():
    from chainforget.progress import study_progress

    line = study_progress("order", 3, 24, [4.0, 6.0, 5.0], running=1)
    # 21 chains left at 5 min each, two workers at it (one other running, plus this one's next)
    assert line == "[order] 3/24 trials done, 5.0 min per chain, about 52 min left with 2 worker(s)"
    assert study_progress("order", 24, 24, [5.0], running=0) == "[order] 24/24 trials done, 5.0 min per chain"
    assert study_progress("tpe", 0, None, [], running=0) == "[tpe] 0/? trials done"
