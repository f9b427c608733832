"""Progress bars that read well in a terminal and in a log file (a SLURM job's output), always on stderr so
stdout keeps the results. One library, tqdm, for downloads, training and evaluation."""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0  # a log file gets one line per bar every 30 s, rather than a redraw every 0.1 s


class LogLines:
    """A file for one tqdm bar in a log file: tqdm redraws with a carriage return, which a log file keeps as one
    ever-growing line. This writes the first state, then at most one line per ``interval`` seconds, and the
    last state when the bar closes (tqdm's closing newline)."""

    def __init__(self, interval: float = LOG_INTERVAL_S, stream=None):
        self.interval, self.stream = interval, stream or sys.stderr
        self.last_emit: float | None = None
        self.pending = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.pending = line
            if self.last_emit is None or time.monotonic() - self.last_emit >= self.interval:
                self.emit()
        elif "\n" in text and self.pending:
            self.emit()

    def emit(self) -> None:
        self.stream.write(self.pending + "\n")
        self.last_emit, self.pending = time.monotonic(), ""

    def flush(self) -> None:
        self.stream.flush()


def bar_options() -> dict:
    """Keyword arguments for ``tqdm``: a live bar on a terminal, timed lines in a log file."""
    if sys.stderr.isatty():
        return {"file": sys.stderr, "dynamic_ncols": True}
    return {"file": LogLines(), "ascii": True, "ncols": 100}


def study_progress(name: str, finished: int, total: int | None, minutes: list[float], running: int) -> str:
    """One line after a study's trial: how many of its ``total`` trials (a grid's points) are done, the mean chain
    time over ``minutes`` (the finished trials' durations), and the time left at that pace with the workers now at
    it (``running`` other trials plus the next one this worker starts)."""
    mean = sum(minutes) / len(minutes) if minutes else None
    line = f"[{name}] {finished}/{total if total is not None else '?'} trials done"
    if mean is not None:
        line += f", {mean:.1f} min per chain"
    if total is not None and mean is not None and finished < total:
        workers = running + 1
        line += f", about {mean * (total - finished) / workers:.0f} min left with {workers} worker(s)"
    return line
