"""Keep freed host memory for reuse while chains run on the CPU (glibc only).

PyTorch's CPU allocator is the C library's ``malloc``. Under glibc a block of at least ``M_MMAP_THRESHOLD`` bytes
(adjusted at run time, at most 32 MiB on 64-bit Linux) is mapped fresh from the kernel when allocated and unmapped
when freed, and free memory at the top of the heap beyond ``M_TRIM_THRESHOLD`` is handed back to the kernel. A
sampling step allocates and frees the same large temporaries every step (a language model's logits and their
gradient, B·T·V·4 bytes per chain; attention activations), so with those defaults each step pays a page fault, and
the kernel zeroing a page, for every 4 KiB of them: on this project's VMs about 10 µs per fault, i.e. ~2.5 ms per
MiB allocated. Measured on experiments/bench_refined.py's model (2 layers × 8 heads, d_model 256, d_vocab 1024),
one thread, blocks of 8 (head, chain) pairs, fastest of 7 steps, mean of 2 processes: a refined step took 51 ms per
layer-0 pair and 25 ms per layer-1 pair with glibc's defaults, 36 ms and 14 ms with freed memory kept; a whole run
is 1.20× faster (experiments/bench_host_memory.py, docs/transformers.md, "Speed").

:func:`retained_host_memory` sets ``M_MMAP_MAX`` = 0 (every block from the heap) and ``M_TRIM_THRESHOLD`` = 2 GiB
(the largest value ``mallopt`` takes: the heap's free top is kept) for the duration of a run, then sets the
thresholds glibc's own dynamic rule would have reached (:data:`AFTER`) and returns the heap's free memory with
``malloc_trim(0)``. Resident memory stays at the run's peak until the run ends, which is what the allocations reach
anyway. Nothing is changed where the C library is not glibc, where the caller configured malloc (``MALLOC_*_`` or
``GLIBC_TUNABLES`` in the environment), for a device other than the CPU, or when ``SLT_TOOLS_KEEP_MALLOC=1`` asks to
leave malloc alone. Results are unaffected: it changes where memory comes from, not what is computed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: set when the outermost run ends. Any mallopt call switches glibc's dynamic thresholds off for good, and its static
#: defaults (128 KiB) would then map and unmap every block ≥ 128 KiB for the rest of the process; these are the
#: values its dynamic rule reaches after the first freed large block (threshold = that block, capped at 32 MiB;
#: trim threshold = twice it), so the process continues as glibc would have left it.
AFTER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
RETAINED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}
_lock = threading.Lock()
_depth = 0


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc (with mallopt and malloc_trim), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def applies(device: torch.device | str) -> bool:
    """Whether :func:`retained_host_memory` changes anything for a run on ``device`` (module docstring)."""
    configured = "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_")
                                                      for k in os.environ)
    return (torch.device(device).type == "cpu" and not configured
            and os.environ.get("SLT_TOOLS_KEEP_MALLOC") != "1" and _glibc() is not None)


def _set(libc: ctypes.CDLL, options: dict[int, int]) -> None:
    for option, value in options.items():
        libc.mallopt(option, value)


@contextmanager
def retained_host_memory(device: torch.device | str) -> Iterator[bool]:
    """Within the block, freed host memory is kept for reuse (module docstring); yields whether that applies.
    Re-entrant and thread-safe: when the outermost block ends, malloc gets :data:`AFTER` and the heap is trimmed."""
    global _depth
    libc = _glibc() if applies(device) else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            _set(libc, RETAINED)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, AFTER)
                libc.malloc_trim(0)
