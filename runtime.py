"""Process-wide runtime settings for long numerical runs.

    from xanesdiff.runtime import keep_freed_memory
    keep_freed_memory()     # once, at start-up (the CLI and the benchmarks do this)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc mallopt parameters (malloc.h)
_NEVER = -1  # as size_t: the largest threshold, i.e. never give the heap's top back
_done = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    Tensors above glibc's mmap threshold (≤ 32 MB) are normally mapped fresh on each allocation
    and unmapped on free, so every step of a large cell pays page faults and zeroing for its
    intermediates: a 3000-atom surrogate forward + backward took 15.3 s that way and 4.0 s
    with memory kept (2 threads, dev VM). The price: peak memory 6.6 → 9.0 GB there (freed
    blocks are reused, not returned, and the heap fragments). Returns whether the setting was
    applied (glibc on Linux only; elsewhere, or with XANESDIFF_KEEP_FREED_MEMORY=0, nothing
    changes).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("XANESDIFF_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = (bool(mallopt(_M_MMAP_MAX, 0))          # large blocks from the heap, not fresh maps
             and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
             and bool(mallopt(_M_TOP_PAD, 2**28)))   # grow the heap 256 MB at a time
    return _done
