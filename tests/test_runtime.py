"""The allocator setting large cells rely on: big blocks come from the reusable heap."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = r"""
import ctypes, sys
from xanesdiff.runtime import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(64 << 20)  # 64 MB: above glibc's largest mmap threshold
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-"))
print(applied, lo <= address < hi)
"""


def probe(**env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return out.stdout.split()


def test_large_blocks_come_from_the_heap_once_freed_memory_is_kept():
    assert probe() == ["True", "True"]


def test_the_setting_can_be_switched_off():
    assert probe(XANESDIFF_KEEP_FREED_MEMORY="0") == ["False", "False"]


FIT_PROBE = r"""
import ctypes, sys
from xanesdiff.runtime import fit_kept_memory, keep_freed_memory
keep_freed_memory()
fits = fit_kept_memory(1.0)             # 1 MB: keeps the setting
switched = fit_kept_memory(float(1 << 40))  # 1 TB: cannot fit, large blocks are mapped again
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(64 << 20)
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-"))
print(fits, switched, lo <= address < hi)
"""


def test_a_working_set_too_large_for_a_kept_heap_maps_large_blocks_again():
    out = subprocess.run([sys.executable, "-c", FIT_PROBE], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True", "False"]
    assert "large blocks are mapped afresh" in out.stderr
