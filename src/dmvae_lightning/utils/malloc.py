"""glibc ``malloc`` settings for CPU tensor work: keep freed tensor memory for the next batch.

PyTorch's CPU allocator is the C library's ``malloc``. glibc serves a request above its mmap
threshold (128 KiB at start, raised on the fly to the largest mmapped block freed so far) with a
fresh ``mmap``, and gives the top of its heap back to the system once more than the trim
threshold (128 KiB at start, then twice the mmap threshold) is free there. A loop that allocates
and frees the same megabyte-sized activations at every call (the decoder on 500 latents, the
encoder over a data set, the DiT sampler's 50 Euler steps) then keeps asking the kernel for
zeroed pages: page faults, not arithmetic. :func:`tune_malloc` fixes both thresholds
(``mallopt``), so that blocks up to ``mmap_threshold`` come from the heap and up to
``trim_threshold`` of free heap is kept. ``benchmarks/bench_malloc.py`` (one thread, the study's
sizes): decoding 0.57x the time, encoding 0.69x, sampling 0.85-1.02x, a training step unchanged
(it keeps its memory between steps anyway); a whole study arm 0.91x, with the same results to
the last bit.

The ``dmvae`` command (every subcommand, ``make demo`` too) and ``python -m
dmvae_lightning.study`` (its worker processes too) call it at start; ``DMVAE_TUNE_MALLOC=0``
keeps glibc's defaults. Other programs (a Lightning project of your own) may call it once at
start. It changes nothing where the C library is not glibc (macOS, Windows, musl):
:func:`tune_malloc` returns False there. The cost is memory held, not used: a process keeps up
to ``trim_threshold`` of freed heap per malloc arena (one per thread that allocates, at most
eight per core) instead of returning it (peak resident memory 1.09x in the benchmark).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["ENV", "MallocStats", "malloc_stats", "tune_malloc"]

ENV = "DMVAE_TUNE_MALLOC"
"""Environment variable: ``0`` (or ``false`` / ``no`` / ``off``) keeps glibc's defaults."""

_M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's glibc, or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)  # the symbols of the running process: glibc's mallopt, mallinfo2


def _enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def tune_malloc(mmap_threshold: int = 32 * _MIB, trim_threshold: int = 1024 * _MIB) -> bool:
    """Fix glibc's mmap and trim thresholds (bytes) for this process; True when applied.

    Args:
        mmap_threshold: requests of at least this size get an ``mmap`` of their own (returned
            to the system when freed); smaller ones come from the heap. glibc accepts at most
            32 MiB on 64-bit systems (its default cap of the dynamic threshold).
        trim_threshold: free memory at the top of the heap kept for later requests before any
            is returned to the system (at most ``2**31 - 1``: ``mallopt`` takes a C int).

    Returns:
        False, changing nothing, when ``DMVAE_TUNE_MALLOC=0`` or the C library is not glibc.
        Raises ``ValueError`` for a value glibc refuses.
    """
    if not 0 < mmap_threshold <= 32 * _MIB:
        raise ValueError(f"mmap_threshold must be in (0, 32 MiB], got {mmap_threshold}")
    if not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in (0, 2**31), got {trim_threshold}")
    libc = _libc()
    if libc is None or not _enabled():
        return False
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise ValueError(f"glibc's mallopt refused parameter {param} = {value}")
    return True


class MallocStats(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (bytes): ``arena`` heap obtained with ``sbrk``, ``hblkhd``
    held in mmapped blocks, ``uordblks`` in use, ``fordblks`` free, ``keepcost`` trimmable."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_stats() -> MallocStats | None:
    """glibc's ``mallinfo2()`` of the main arena (None without glibc 2.33+)."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = MallocStats
    return fn()
