"""An example project that plugs its own parts into dmvae-lightning by subclassing."""

from plugin_example.losses import MomentMatchingLoss
from plugin_example.modules import PatchEncoder, PatchEncoderDMVAE, StratifiedTimeDiffusion
from plugin_example.sources import LaplaceSource

__all__ = [
    "LaplaceSource",
    "MomentMatchingLoss",
    "PatchEncoder",
    "PatchEncoderDMVAE",
    "StratifiedTimeDiffusion",
]
