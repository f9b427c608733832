"""Run the ``chainforget`` command on tcmalloc when it is installed.

glibc's malloc returns large freed blocks to the kernel, so every training step on a CPU takes its
activations as fresh pages again: some 100,000 page faults per SmolLM2 step at batch 32, and matmuls
that write into fresh pages run at a third of their speed. tcmalloc keeps freed memory for reuse
(benchmarks/README.md: 15-37 % more training tokens/s). A library must be preloaded before the process
starts, so the command re-executes itself once with ``LD_PRELOAD``, as PyTorch's own CPU launcher
(``python -m torch.backends.xeon.run_cpu --enable-tcmalloc``) does. ``CHAINFORGET_MALLOC=system``
turns this off.
"""

from __future__ import annotations

import ctypes.util
import gc
import os
import sys
from pathlib import Path

OPT_OUT = "CHAINFORGET_MALLOC"
# set only in the re-executed process: the caller's own LD_PRELOAD, put back for the processes it starts
CALLER_PRELOAD = "CHAINFORGET_CALLER_LD_PRELOAD"


def tcmalloc_library() -> str | None:
    """tcmalloc from the environment's own ``lib`` (conda's gperftools) or the system's (Debian's
    libtcmalloc-minimal4), or None."""
    for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"):
        candidate = Path(sys.prefix, "lib", name)
        if candidate.is_file():
            return str(candidate)
    for name in ("tcmalloc_minimal", "tcmalloc"):
        if found := ctypes.util.find_library(name):
            return found
    return None


def in_use() -> str:
    """The allocator this process runs on: ``tcmalloc``, ``jemalloc`` or ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "system")


def reexec_on_tcmalloc() -> None:
    """Replace this process with the same command on tcmalloc, or return: when already re-executed, on
    tcmalloc or jemalloc already, opted out, not on Linux, or when no tcmalloc is installed."""
    if CALLER_PRELOAD in os.environ:
        caller = os.environ.pop(CALLER_PRELOAD)
        if caller:
            os.environ["LD_PRELOAD"] = caller
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if sys.platform != "linux" or os.environ.get(OPT_OUT) == "system" or in_use() != "system":
        return
    library = tcmalloc_library()
    if library is None:
        return
    caller = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, (library, caller))), **{CALLER_PRELOAD: caller})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_free_memory() -> None:
    """Hand the memory the allocator holds free back to the system: tcmalloc keeps what a process freed for reuse
    (that is its speed), so the freed activations of one chain would sit under the next chain's newly read model
    file and the two would add up. ``malloc_trim`` does the same for glibc's malloc."""
    gc.collect()  # Lightning's trainer and module refer to each other: only the cycle collector frees them
    process = ctypes.CDLL(None)
    for name in ("MallocExtension_ReleaseFreeMemory", "malloc_trim"):
        release = getattr(process, name, None)
        if release is not None:
            release(*([0] if name == "malloc_trim" else []))
            return
