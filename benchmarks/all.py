"""Every benchmark in one run, ending in one table: anchor, chainforget's figure, the anchor's figure, ratio,
target, met. Each part also prints its own details, as when run alone with its defaults.

    pip install -e ".[bench]"
    python benchmarks/all.py
"""

from __future__ import annotations

import sys

import evaluation
import memory
import stage_cache
import training
from table import print_table

from chainforget import allocator


def main() -> int:
    allocator.reexec_on_tcmalloc()  # as the chainforget command does
    rows = []
    for part in (evaluation, training, memory, stage_cache):  # stage_cache last: it pins one thread
        rows += part.measure(part.parser().parse_args([]))
        print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
