"""Tokenizer networks: encoders, MLP bottleneck, conv decoder and PatchGAN discriminator."""

from .decoder import Decoder
from .discriminator import PatchDiscriminator
from .encoders import ConvEncoder, MLPBottleneck, TimmEncoder, build_encoder

__all__ = [
    "ConvEncoder",
    "Decoder",
    "MLPBottleneck",
    "PatchDiscriminator",
    "TimmEncoder",
    "build_encoder",
]
