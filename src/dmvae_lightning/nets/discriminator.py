"""PatchGAN discriminator (pix2pix / taming-transformers layout)."""

from __future__ import annotations

import torch
from torch import nn

from .decoder import group_norm

__all__ = ["PatchDiscriminator"]

_NORMS = ("batch", "group", "none")


class PatchDiscriminator(nn.Module):
    """PatchGAN: `n_layers` conv4x4 stride-2 stages (width ch * min(2**k, 8)), one conv4x4
    stride-1 stage, then a 1-channel conv4x4 stride-1 head; LeakyReLU(0.2) between convs, no
    norm after the first conv.

    Input (B, in_channels, H, W) in [-1, 1] -> logits (B, 1, H', W') with
    H' = floor(H / 2**n_layers) - 2 (e.g. 32x32, n_layers=3 -> 2x2; 256x256 -> 30x30).
    Needs H, W >= 3 * 2**n_layers.

    Args:
        norm: "group" (default; GroupNorm with gcd(32, C) groups, batch-independent),
            "batch" (BatchNorm2d as in pix2pix; under DDP convert it with
            `torch.nn.SyncBatchNorm.convert_sync_batchnorm`, or per-rank statistics differ and
            real/fake batches normalise differently), or "none".
    Convs are initialised N(0, 0.02), norm gains N(1, 0.02), as in pix2pix.
    """

    def __init__(
        self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, norm: str = "group"
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(
                f"model.init_args.discriminator.norm={norm!r} is unknown; valid: {list(_NORMS)}"
            )
        if n_layers < 1:
            raise ValueError("model.init_args.discriminator.n_layers must be >= 1")
        self.n_layers = n_layers

        def make_norm(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return group_norm(c, eps=1e-5)
            return nn.Identity()

        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        c_prev = ch
        for k in range(1, n_layers + 1):
            c = ch * min(2**k, 8)
            stride = 2 if k < n_layers else 1
            layers += [
                nn.Conv2d(c_prev, c, 4, stride=stride, padding=1, bias=bias),
                make_norm(c),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 3 * 2**self.n_layers
        if x.ndim != 4 or min(x.shape[-2:]) < min_size:
            raise ValueError(
                f"PatchDiscriminator with n_layers={self.n_layers} needs (B, C, H, W) with "
                f"H, W >= {min_size}, got {tuple(x.shape)}; lower "
                "model.init_args.discriminator.n_layers"
            )
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
