"""Randomness that survives kill-and-resume.

Training steps draw their random numbers (DiffAug, label dropout, flow-matching t and noise) from
the global torch RNG, which Lightning does not checkpoint. :func:`step_rng` makes every draw inside
a step a pure function of ``(seed, step, rank)`` and leaves the global RNG as it found it, so a
resumed run repeats exactly what an uninterrupted run does, with nothing extra to save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant; spreads nearby (seed, step, rank) apart


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed unique to ``(seed, step, rank)``."""
    value = (seed * _MIX + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 63)
    return value or 1


@contextlib.contextmanager
def step_rng(
    seed: int, step: int, rank: int = 0, device: torch.device | None = None
) -> Iterator[None]:
    """Seed torch's global RNGs (CPU and ``device``) for one step; restore them on exit."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        s = step_seed(seed, step, rank)
        torch.manual_seed(s)
        if devices:
            torch.cuda.manual_seed(s)
        yield
