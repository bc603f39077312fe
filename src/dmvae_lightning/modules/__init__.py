"""LightningModules: the DMVAE tokenizer, the latent diffusion model, the classifier and the
2-D toy study."""

from dmvae_lightning.modules.classifier import ClassifierModule
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.modules.toy2d import PointAlignmentModule

__all__ = ["ClassifierModule", "DMVAEModule", "LatentDiffusionModule", "PointAlignmentModule"]
