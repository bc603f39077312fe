"""Networks: encoders, MLP bottleneck, conv decoder, PatchGAN discriminator, the tokenizer that
chains them, the classifier CNN and the LightningDiT-style DiT."""

from .classifier import ConvClassifier
from .decoder import Decoder
from .discriminator import PatchDiscriminator
from .dit import DiT
from .encoders import ClassifierEncoder, ConvEncoder, MLPBottleneck, TimmEncoder, build_encoder
from .tokenizer import Tokenizer

__all__ = [
    "ClassifierEncoder",
    "ConvClassifier",
    "ConvEncoder",
    "Decoder",
    "DiT",
    "MLPBottleneck",
    "PatchDiscriminator",
    "TimmEncoder",
    "Tokenizer",
    "build_encoder",
]
