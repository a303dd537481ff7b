"""Process-wide runtime settings for long numerical runs.

    from xanesdiff.runtime import configure_process, fit_kept_memory
    configure_process()     # once, at start-up (the CLI and the benchmarks do this)
    fit_kept_memory(expected_mb)   # before a run whose working set may not fit that way
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4  # malloc.h
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_GLIBC_TOP_PAD = _GLIBC_TRIM_THRESHOLD = 128 << 10  # glibc's defaults of M_TOP_PAD, M_TRIM_THRESHOLD
KEPT_HEAP_FACTOR = 1.7
"""Peak memory with freed memory kept ÷ peak without: the heap fragments (guided 3000-atom step:
7.2 GB against 4.4 GB, dev VM)."""
_NEVER = -1  # as size_t: the largest threshold, i.e. never give the heap's top back
_kept = False
_fitted_mb = 0.0  # the largest working set fit_kept_memory has let the kept heap serve


def configure_process() -> None:
    """Start-up settings of every entry point: `keep_freed_memory` and `reproducible_kernels`."""
    keep_freed_memory()
    reproducible_kernels()


def reproducible_kernels() -> None:
    """Make torch pick deterministic kernels, so a seed gives the same structure again with any
    fixed thread count. Without it, two-thread guided samples of one seed differed (parallel
    reductions in the surrogate's backward pass, amplified by the sampler); the deterministic
    kernels cost no measurable time on CPU. Where an op has none (some CUDA ops), torch warns
    instead of failing. Deterministic mode would also fill every new tensor before its first
    write (`fill_uninitialized_memory`), which only matters to code that reads memory it never
    wrote; that pass over each gathered (edges × features) block is switched off (≈3 % of a
    PaiNN prior's forward+backward)."""
    import torch
    import torch.utils.deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


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
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("XANESDIFF_KEEP_FREED_MEMORY") == "0":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _kept = (bool(mallopt(_M_MMAP_MAX, 0))          # large blocks from the heap, not fresh maps
             and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
             and bool(mallopt(_M_TOP_PAD, 2**28)))   # grow the heap 256 MB at a time
    return _kept


def fit_kept_memory(expected_mb: float, budget_fraction: float = 0.8, device=None) -> bool:
    """Give up `keep_freed_memory`'s speed where its fragmented heap would not fit.

    `expected_mb` is the run's working set without kept memory. When it times
    `KEPT_HEAP_FACTOR` exceeds `budget_fraction` of the memory available now, blocks of 16 MB
    and more are mapped fresh and returned on free again (glibc's usual way, at a fixed
    threshold): steps get slower (×2.3 for a guided 3000-atom step on the dev VM), peak memory
    is the working set. Returns True when it switched (only after `keep_freed_memory` was applied). Fresh maps
    cost far less with transparent huge pages, which glibc uses when the process starts with
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (it cannot be switched on later). A working set on a
    GPU (`device` other than the CPU) is not in this heap: nothing to fit.
    """
    global _kept, _fitted_mb
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return False
    if not _kept or expected_mb <= _fitted_mb:  # the heap kept for a size that fitted is reused
        return False
    available_mb = _available_mb()
    if available_mb is None:
        return False
    if expected_mb * KEPT_HEAP_FACTOR <= budget_fraction * available_mb:
        _fitted_mb = expected_mb
        return False
    mallopt = _mallopt()
    mallopt(_M_MMAP_THRESHOLD, 16 << 20)
    mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    # undo the heap's 256 MB growth step and never-trim too, and give back its free top: a large
    # block would otherwise still be carved from that padding instead of being mapped
    mallopt(_M_TOP_PAD, _GLIBC_TOP_PAD)
    mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    _malloc_trim()
    _kept = False
    hint = ("" if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", "") else
            "; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment makes them cheaper "
            "(10⁴-atom guided step 64 → 35 s)")
    print(f"note: about {expected_mb / 1024:.1f} GB needed, {available_mb / 1024:.1f} GB "
          f"available: large blocks are mapped afresh (slower steps, less memory){hint}",
          file=sys.stderr)
    return True


def memory_kept() -> bool:
    """Whether freed memory is being kept for reuse (`keep_freed_memory`, not undone since)."""
    return _kept


def _libc_function(name: str):
    """A function of the C library by name, or None (musl or another libc without it)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _mallopt():
    """glibc's `mallopt(param, value)`, or None (musl or another libc without it)."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _malloc_trim() -> None:
    """glibc's `malloc_trim(0)`: return the heap's free memory to the system (no-op elsewhere)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def resolve_device(name="auto"):
    """A torch device from a config value: `auto` → the first CUDA GPU when torch sees one,
    else the CPU; anything else (`cpu`, `cuda`, `cuda:1`, a `torch.device`) as given. Asking
    for CUDA where torch has none is an error that says so (instead of torch's at first use)."""
    import torch

    from xanesdiff.datasets.errors import XanesdiffInputError

    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise XanesdiffInputError(f"{name!r} is not a torch device ({exc}); expected "
                                  "auto, cpu, cuda or cuda:N", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XanesdiffInputError(f"{name!r} asked for, but torch sees no CUDA GPU "
                                  f"(torch {torch.__version__}); use device=auto or cpu",
                                  "device")
    return device


def lightning_trainer_options(options: dict) -> dict:
    """Trainer options with `accelerator: auto` read as `device=auto` is: a CUDA GPU when torch
    sees one, else the CPU (Lightning's own `auto` would also pick Apple's MPS, where the e3nn
    and M3GNet models are not tested)."""
    options = dict(options)
    if str(options.get("accelerator", "auto")) == "auto":
        options["accelerator"] = "gpu" if resolve_device("auto").type == "cuda" else "cpu"
    return options


def device_memory_mb(device=None) -> float | None:
    """Memory (MB) of the device a tensor lives on: the GPU's for CUDA, else the machine's."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory / 2 ** 20
    return total_memory_mb()


@functools.lru_cache(maxsize=1)
def total_memory_mb() -> float | None:
    """The machine's memory (MemTotal, MB); None where /proc/meminfo does not say."""
    return _meminfo_mb("MemTotal")


def _available_mb() -> float | None:
    return _meminfo_mb("MemAvailable")


def _meminfo_mb(key: str) -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
