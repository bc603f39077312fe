"""LightningModules: the DMVAE tokenizer, the latent diffusion model and the 2-D toy study."""

from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.modules.toy2d import PointAlignmentModule

__all__ = ["DMVAEModule", "LatentDiffusionModule", "PointAlignmentModule"]
