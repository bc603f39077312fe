"""Training losses: reconstruction (L1 / L2 / LPIPS), adversarial (hinge GAN, DiffAugment) and the
matching losses between the latent distribution and the reference (DMD, MMD, SWD, KL, alignment)."""

from dmvae_lightning.losses.adversarial import (
    AdversarialLoss,
    DiffAugment,
    adaptive_weight,
    consistency_loss,
    generator_adv_loss,
    hinge_d_loss,
)
from dmvae_lightning.losses.matching import (
    DMDLoss,
    GaussianKLLoss,
    MMDLoss,
    PointwiseAlignmentLoss,
    SlicedWassersteinLoss,
    gather_samples,
)
from dmvae_lightning.losses.reconstruction import LPIPS, ReconstructionLoss

__all__ = [
    "LPIPS",
    "AdversarialLoss",
    "DMDLoss",
    "DiffAugment",
    "GaussianKLLoss",
    "MMDLoss",
    "PointwiseAlignmentLoss",
    "ReconstructionLoss",
    "SlicedWassersteinLoss",
    "adaptive_weight",
    "consistency_loss",
    "gather_samples",
    "generator_adv_loss",
    "hinge_d_loss",
]
