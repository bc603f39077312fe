"""Data: image data sets and the `ReferenceDistribution` data module."""

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

__all__ = [
    "FASHION_MNIST_DEFAULT_ROOT",
    "FashionMNIST",
    "ImageFolderDataset",
    "ReferenceDistribution",
    "SyntheticImages",
    "adm_center_crop",
    "build_image_dataset",
    "read_idx",
]
