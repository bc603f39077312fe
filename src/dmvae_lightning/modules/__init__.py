"""LightningModules: the DMVAE tokenizer and the latent diffusion model."""

from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule

__all__ = ["DMVAEModule", "LatentDiffusionModule"]
