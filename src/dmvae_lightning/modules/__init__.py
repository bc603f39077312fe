"""LightningModules: the DMVAE tokenizer (and, with its issue, the latent diffusion model)."""

from dmvae_lightning.modules.dmvae import DMVAEModule

__all__ = ["DMVAEModule"]
