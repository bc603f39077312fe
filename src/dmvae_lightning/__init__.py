"""dmvae-lightning: Distribution-Matching VAEs and latent flow-matching DiTs for Lightning.

The public API: everything in ``__all__`` imports from here, and each name also has a stable
home in its subpackage (``dmvae_lightning.modules``, ``.data``, ``.losses``, ``.callbacks``,
``.nets``, ``.metrics``), which is the path to use in ``class_path`` entries of configs, e.g.
``dmvae_lightning.modules.dmvae.DMVAEModule`` or ``dmvae_lightning.losses.matching.MMDLoss``.

Importing the package also registers its named Lightning strategies (``trainer.strategy:
ddp_explicit`` and ``fsdp2``, see :mod:`dmvae_lightning.strategies`).
"""

from dmvae_lightning.callbacks import (
    FIDMonitor,
    PredictionWriter,
    ReferenceFeeder,
    SynchronizedRequeue,
)
from dmvae_lightning.checkpoints import CheckpointError
from dmvae_lightning.data import (
    BankSource,
    CheckpointFeatureSource,
    Draw,
    EncoderFeatureSource,
    FashionMNIST,
    GaussianSource,
    ImageFolderDataset,
    MixtureSource,
    NoisedSource,
    ReferenceDistribution,
    ReferenceSource,
    ReferenceSpec,
    SourceContext,
    SphereSource,
    SyntheticImages,
    TextSource,
    TimmFeatureSource,
    build_source,
)
from dmvae_lightning.distributed import ExplicitDDPStrategy
from dmvae_lightning.ema import EMA
from dmvae_lightning.latents import LatentCache, load_frozen_tokenizer
from dmvae_lightning.losses import (
    LPIPS,
    AdversarialLoss,
    DiffAugment,
    DMDLoss,
    GaussianKLLoss,
    MMDLoss,
    PointwiseAlignmentLoss,
    ReconstructionLoss,
    SlicedWassersteinLoss,
)
from dmvae_lightning.metrics import (
    DomainFeatures,
    FeatureStats,
    InceptionFeatures,
    StatsCache,
    build_extractor,
    feature_stats,
    frechet_distance,
)
from dmvae_lightning.modules import ClassifierModule, DMVAEModule, LatentDiffusionModule
from dmvae_lightning.nets import (
    ClassifierEncoder,
    ConvClassifier,
    ConvEncoder,
    Decoder,
    DiT,
    MLPBottleneck,
    PatchDiscriminator,
    TimmEncoder,
    Tokenizer,
)
from dmvae_lightning.strategies import FSDP2Strategy, register_strategies

register_strategies()

__all__ = [
    # LightningModules
    "ClassifierModule",
    "DMVAEModule",
    "LatentDiffusionModule",
    # the DataModule and image data sets
    "FashionMNIST",
    "ImageFolderDataset",
    "LatentCache",
    "ReferenceDistribution",
    "SyntheticImages",
    # reference sources
    "BankSource",
    "CheckpointFeatureSource",
    "Draw",
    "EncoderFeatureSource",
    "GaussianSource",
    "MixtureSource",
    "NoisedSource",
    "ReferenceSource",
    "ReferenceSpec",
    "SourceContext",
    "SphereSource",
    "TextSource",
    "TimmFeatureSource",
    "build_source",
    # losses
    "LPIPS",
    "AdversarialLoss",
    "DMDLoss",
    "DiffAugment",
    "GaussianKLLoss",
    "MMDLoss",
    "PointwiseAlignmentLoss",
    "ReconstructionLoss",
    "SlicedWassersteinLoss",
    # callbacks
    "FIDMonitor",
    "PredictionWriter",
    "ReferenceFeeder",
    "SynchronizedRequeue",
    # networks
    "ClassifierEncoder",
    "ConvClassifier",
    "ConvEncoder",
    "Decoder",
    "DiT",
    "MLPBottleneck",
    "PatchDiscriminator",
    "TimmEncoder",
    "Tokenizer",
    # distributed training
    "ExplicitDDPStrategy",
    "FSDP2Strategy",
    # metrics and EMA
    "EMA",
    "DomainFeatures",
    "FeatureStats",
    "InceptionFeatures",
    "StatsCache",
    "build_extractor",
    "feature_stats",
    "frechet_distance",
    "load_frozen_tokenizer",
    # checkpoints
    "CheckpointError",
]
__version__ = "0.1.0"
