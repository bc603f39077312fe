"""Training losses: reconstruction (L1 / L2 / LPIPS) and adversarial (hinge GAN, DiffAugment)."""

from dmvae_lightning.losses.adversarial import (
    AdversarialLoss,
    DiffAugment,
    adaptive_weight,
    consistency_loss,
    generator_adv_loss,
    hinge_d_loss,
)
from dmvae_lightning.losses.reconstruction import LPIPS, ReconstructionLoss

__all__ = [
    "LPIPS",
    "AdversarialLoss",
    "DiffAugment",
    "ReconstructionLoss",
    "adaptive_weight",
    "consistency_loss",
    "generator_adv_loss",
    "hinge_d_loss",
]
