"""LightningModules: the DMVAE tokenizer, the latent diffusion model and the classifier."""

from dmvae_lightning.modules.classifier import ClassifierModule
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule

__all__ = ["ClassifierModule", "DMVAEModule", "LatentDiffusionModule"]
