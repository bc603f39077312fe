"""dmvae-lightning: Distribution-Matching VAEs and latent flow-matching DiTs for Lightning."""

from dmvae_lightning.callbacks import PredictionWriter
from dmvae_lightning.data.reference import ReferenceDistribution
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.nets.tokenizer import Tokenizer

__all__ = [
    "DMVAEModule",
    "LatentDiffusionModule",
    "PredictionWriter",
    "ReferenceDistribution",
    "Tokenizer",
]
__version__ = "0.1.0"
