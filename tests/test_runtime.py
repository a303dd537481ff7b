"""Process start-up settings: the allocator setting large cells rely on (big blocks come from the
reusable heap, unless that would not fit) and deterministic kernels (a seed repeats)."""

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
on_gpu = fit_kept_memory(float(1 << 40), device="cuda")  # not in this heap: keeps the setting
assert on_gpu is False
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


SEED_PROBE = r"""
import numpy as np, torch
from omegaconf import OmegaConf
from xanesdiff.runtime import reproducible_kernels
reproducible_kernels()  # without it, this printed 11.8 (Å) on the 2-core dev VM
torch.set_num_threads(2)
from xanesdiff.datasets.dataset import load_dataset
from xanesdiff.diffusion.prior import load_prior
from xanesdiff.forward.surrogate import load_surrogate
from xanesdiff.guidance.request import build_terms, compose_generate_config, make_generator
frame = next(f for f in load_dataset().frames if f.network == "rho2.49")
prior, surrogate = load_prior(), load_surrogate()
cfg = OmegaConf.merge(compose_generate_config(["sampler.n_steps=12"]), {"target": "frame"})
terms = [t.bind(surrogate, frame.mean_spectrum.astype(np.float64)) for t in build_terms(cfg)]
generator = make_generator(cfg, prior, surrogate, terms)
first, second = (generator.generate(2.5, seed=0)[0].positions for _ in range(2))
print(float(np.abs(first - second).max()))
"""


def test_a_seed_gives_the_same_guided_structure_again_with_two_threads():
    out = subprocess.run([sys.executable, "-c", SEED_PROBE], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout.split()[-1]) == 0.0
