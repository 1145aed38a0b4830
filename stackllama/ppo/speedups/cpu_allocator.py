"""glibc malloc settings that stop CPU training from faulting in fresh pages every step.

glibc serves large allocations with ``mmap`` and gives freed heap memory back to the
kernel; both thresholds adapt, but on PyTorch's allocation pattern (tensors of a few MB,
made and freed many times per step) they keep settling below what the step allocates, so
the same memory is unmapped and faulted in again and again. With allocations up to 32 MB
served from the heap, and up to 256 MB of free heap kept, most of those faults go
(``benchmarks/RESULTS.md``). Peak memory is unchanged, but memory freed after the
peak stays with the process (up to 256 MB more). Setting only one of the
two is worse than neither: a fixed trim threshold switches off the adaptation of the
mmap threshold too.

The same as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` in the
environment, done in-process with ``mallopt``; left alone when the environment already
sets glibc malloc options, and a no-op off glibc (macOS, musl, a preloaded jemalloc or
tcmalloc ignores it).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for the adaptive threshold on 64-bit
TRIM_THRESHOLD = 256 << 20

_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_applied = False


def keep_freed_memory(device=None) -> bool:
    """Applies the settings above once per process when ``device`` (the process's training
    device) is the CPU or not given; True when they are in effect. Process-wide: the script
    calls it, before the models are loaded."""
    global _applied
    if device is not None and str(device).split(":")[0] != "cpu":
        return False
    if _applied:
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _ENV):
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap first: once the trim threshold is fixed, glibc stops adapting the mmap one
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
