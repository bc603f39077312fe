"""This project's LightningModules: each subclass overrides exactly one hook of the library's.

* :class:`PatchEncoderDMVAE`: :class:`~dmvae_lightning.modules.dmvae.DMVAEModule` with a
  patchify encoder (:meth:`build_encoder`); bottleneck, decoder, GAN, matching loss, EMA, the
  training step and checkpointing are the library's.
* :class:`StratifiedTimeDiffusion`:
  :class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` with stratified training
  times (:meth:`sample_time`); the DiT, flow-matching loss, EMA and samplers are the library's.
"""

from __future__ import annotations

import torch
from torch import nn

from dmvae_lightning import DMVAEModule, LatentDiffusionModule


class PatchEncoder(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``width`` features: a strided conv, GELU and a
    1x1 conv. Images (B, C_img, H, W) in [-1, 1] -> features (B, width, H / p, W / p)."""

    def __init__(self, in_channels: int, width: int = 32, patch_size: int = 4) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.mix = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 1))
        self.out_dim = width  # DMVAEModule sizes the bottleneck from this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.patchify(x))


class PatchEncoderDMVAE(DMVAEModule):
    """A DMVAE tokenizer whose encoder is a :class:`PatchEncoder`.

    Reads its width and patch size from the existing ``encoder`` option (``ch``,
    ``patch_size``), so it needs no ``__init__`` of its own.
    """

    def build_encoder(self) -> nn.Module:
        spec = self.hparams.encoder or {}
        return PatchEncoder(
            self.hparams.image_channels,
            width=int(spec.get("ch", 32)),
            patch_size=int(spec.get("patch_size", 4)),
        )


class StratifiedTimeDiffusion(LatentDiffusionModule):
    """A latent flow-matching DiT trained with stratified times: one ``t`` per stratum
    ``[k / n, (k + 1) / n)`` of the batch, in random order (a lower-variance estimate of the
    same uniform-time loss).

    ``last_time_draw`` keeps the last batch of times, for inspection.
    """

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        # global RNG, which training_step seeds per batch: kill-and-resume stays exact
        strata = torch.randperm(n, device=device).float()
        t = (strata + torch.rand(n, device=device)) / n
        self.last_time_draw = t.detach()
        return t
