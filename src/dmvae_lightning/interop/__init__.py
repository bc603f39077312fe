"""Interoperability with released weights: :mod:`dmvae_lightning.interop.public` imports the
public DMVAE tokenizer and LightningDiT checkpoints as this project's Lightning checkpoints."""

from dmvae_lightning.interop.public import (
    convert_public_dit,
    convert_public_tokenizer,
    load_public_checkpoint,
)

__all__ = ["convert_public_dit", "convert_public_tokenizer", "load_public_checkpoint"]
