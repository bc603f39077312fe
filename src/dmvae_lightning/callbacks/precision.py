"""TF32 matrix multiplies on GPUs that have them (NVIDIA compute capability 8.0+: A100, H100, ...).

Under ``bf16-mixed`` the big matmuls already run in bf16; TF32 speeds up what autocast leaves in
fp32 (fp32-only ops, the fp32 master path of layers autocast skips, and every fp32 run) at
about 10 mantissa bits instead of 23. Off by default everywhere (tests, CPU runs); a config turns
it on by listing the callback::

    trainer:
      callbacks:
        - class_path: dmvae_lightning.callbacks.TF32Matmul

At ``setup`` on a CUDA device of capability >= 8 the callback sets
``torch.set_float32_matmul_precision(precision)`` and ``torch.backends.cudnn.allow_tf32``; at
``teardown`` it restores the previous values. On CPU or older GPUs it does nothing.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch

__all__ = ["TF32Matmul", "tf32_supported"]


def tf32_supported(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA device with TF32 tensor cores (capability 8.0 or higher)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


class TF32Matmul(pl.Callback):
    """Enable TF32 matmuls (``precision="high"``) and cuDNN convolutions for the run on Ampere+.

    Args:
        precision: ``torch.set_float32_matmul_precision`` value, ``"high"`` (TF32) or
            ``"medium"`` (bf16 passes where allowed).
        cudnn: also allow TF32 in cuDNN convolutions.
    """

    def __init__(self, precision: Literal["high", "medium"] = "high", cudnn: bool = True) -> None:
        if precision not in ("high", "medium"):
            raise ValueError(f"TF32Matmul.precision must be 'high' or 'medium', got {precision!r}")
        self.precision = precision
        self.cudnn = cudnn
        self._saved: tuple[str, bool] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved is not None or not tf32_supported(trainer.strategy.root_device):
            return
        self._saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision(self.precision)
        if self.cudnn:
            torch.backends.cudnn.allow_tf32 = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._saved is None:
            return
        precision, cudnn = self._saved
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn
        self._saved = None
