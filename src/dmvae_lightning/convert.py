"""Former path of :mod:`dmvae_lightning.interop.public` (importing the released DMVAE
checkpoints); ``from dmvae_lightning.convert import ...`` and ``python -m dmvae_lightning.convert``
keep working."""

from dmvae_lightning.interop.public import (
    DINOV2_SIZES,
    DIT_FIXED_TABLES,
    VAE_NORMALISATION_KEYS,
    convert_public_dit,
    convert_public_tokenizer,
    load_public_checkpoint,
    main,
)

__all__ = [
    "DINOV2_SIZES",
    "DIT_FIXED_TABLES",
    "VAE_NORMALISATION_KEYS",
    "convert_public_dit",
    "convert_public_tokenizer",
    "load_public_checkpoint",
    "main",
]

if __name__ == "__main__":  # pragma: no cover
    main()
