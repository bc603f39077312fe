"""Callbacks shipped with the library."""

from dmvae_lightning.callbacks.evaluation import FIDMonitor
from dmvae_lightning.callbacks.precision import TF32Matmul
from dmvae_lightning.callbacks.prediction_writer import PredictionWriter
from dmvae_lightning.callbacks.reference_feeder import ReferenceFeeder
from dmvae_lightning.callbacks.requeue import SynchronizedRequeue

__all__ = ["FIDMonitor", "PredictionWriter", "ReferenceFeeder", "SynchronizedRequeue", "TF32Matmul"]
