"""The tokenizer as a plain ``nn.Module``: image -> latent -> image, usable without Lightning."""

from __future__ import annotations

import torch
from torch import nn


class Tokenizer(nn.Module):
    """``encoder -> bottleneck -> z -> decoder``.

    * ``encode(x)``: images (B, C_img, H, W) in [-1, 1] -> latents (B, C, h, w), h = H / f.
    * ``decode(z)``: latents (B, C, h, w) -> images (B, C_img, H, W), roughly in [-1, 1], unclamped.

    Latents are *raw* (not normalised); a diffusion model on top normalises them with its own
    stored mean / scale. Parameter names: ``encoder.*``, ``bottleneck.*``, ``decoder.*``.
    """

    def __init__(self, encoder: nn.Module, bottleneck: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, latent)``."""
        z = self.encode(x)
        return self.decode(z), z
