"""glibc malloc thresholds (dmvae_lightning.utils.malloc): each case runs in a fresh process,
since the thresholds are process-wide and glibc's default ones move with what was freed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dmvae_lightning.utils.malloc import tune_malloc

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt / mallinfo2 are glibc's",
)

# A 24 MiB block: above glibc's starting mmap threshold (128 KiB), below tune_malloc's (32 MiB).
PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from dmvae_lightning.utils.malloc import malloc_stats, tune_malloc
    {setup}
    s0 = malloc_stats()
    x = torch.empty(6 * 2**20)
    s1 = malloc_stats()
    del x
    s2 = malloc_stats()
    y = torch.empty(6 * 2**20)
    s3 = malloc_stats()
    print("RESULT " + json.dumps({{
        "applied": applied,
        "mmapped": s1.hblkhd - s0.hblkhd,
        "heap_in_use": s1.uordblks - s0.uordblks,
        "trimmed": s1.arena - s2.arena,
        "mapped_after_free": s2.hblkhd - s0.hblkhd,
        "mmapped_again": s3.hblkhd - s2.hblkhd,
    }}))
    """
)


def probe(setup: str, env: dict[str, str] | None = None) -> dict:
    code = PROBE.format(setup=setup)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


MIB24 = 24 * 2**20


def test_tuned_blocks_come_from_the_heap_and_stay_there():
    out = probe("applied = tune_malloc()")
    assert out["applied"] is True
    assert out["mmapped"] == 0  # not an mmap of its own ...
    assert out["heap_in_use"] >= MIB24  # ... but heap
    assert out["trimmed"] == 0  # freed, the heap is kept (not trimmed back to the system)
    assert out["mmapped_again"] == 0  # the next block of that size: the heap again


def test_opt_out_keeps_glibc_defaults():
    out = probe("applied = tune_malloc()", {"DMVAE_TUNE_MALLOC": "0"})
    assert out["applied"] is False
    assert out["mmapped"] >= MIB24  # glibc's default: a block this size is mmapped ...
    assert out["heap_in_use"] < MIB24
    assert out["mapped_after_free"] == 0  # ... and unmapped when freed


@pytest.mark.parametrize(
    "setup",
    [
        "from dmvae_lightning.cli import main\ntry:\n    main(['fit', '--help'])\n"
        "except SystemExit:\n    pass\napplied = None",
        "from dmvae_lightning.study.cli import main\n"
        f"main(['--list', '--root', {str(REPO)!r}])\napplied = None",
    ],
    ids=["dmvae", "study"],
)
def test_entry_points_tune(setup):
    """`dmvae ...` and `python -m dmvae_lightning.study` (and its workers) apply it at start."""
    out = probe(setup)
    assert out["mmapped"] == 0 and out["heap_in_use"] >= MIB24


@pytest.mark.parametrize(
    "kwargs", [{"mmap_threshold": 64 * 2**20}, {"mmap_threshold": 0}, {"trim_threshold": 2**31}]
)
def test_refuses_values_glibc_cannot_take(kwargs):
    with pytest.raises(ValueError, match="must be in"):
        tune_malloc(**kwargs)
