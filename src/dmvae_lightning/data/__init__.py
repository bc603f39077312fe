"""Data: image data sets, the `ReferenceDistribution` data module and the reference sources."""

from dmvae_lightning.data.images import (
    FASHION_MNIST_DEFAULT_ROOT,
    FashionMNIST,
    ImageFolderDataset,
    SyntheticImages,
    adm_center_crop,
    build_image_dataset,
    read_idx,
)
from dmvae_lightning.data.reference import ReferenceDistribution
from dmvae_lightning.data.sources import (
    BankSource,
    CheckpointFeatureSource,
    Draw,
    EncoderFeatureSource,
    GaussianSource,
    MixtureSource,
    NoisedSource,
    ReferenceSource,
    ReferenceSpec,
    SourceContext,
    SphereSource,
    TextSource,
    TimmFeatureSource,
    build_source,
)

__all__ = [
    "FASHION_MNIST_DEFAULT_ROOT",
    "BankSource",
    "CheckpointFeatureSource",
    "Draw",
    "EncoderFeatureSource",
    "FashionMNIST",
    "GaussianSource",
    "ImageFolderDataset",
    "MixtureSource",
    "NoisedSource",
    "ReferenceDistribution",
    "ReferenceSource",
    "ReferenceSpec",
    "SourceContext",
    "SphereSource",
    "SyntheticImages",
    "TextSource",
    "TimmFeatureSource",
    "adm_center_crop",
    "build_image_dataset",
    "build_source",
    "read_idx",
]
