"""Callbacks shipped with the library."""

from dmvae_lightning.callbacks.evaluation import FIDMonitor
from dmvae_lightning.callbacks.prediction_writer import PredictionWriter

# ReferenceFeeder lives in dmvae_lightning.callbacks.reference_feeder (importing it here would
# cycle through data.reference, which owns one).
__all__ = ["FIDMonitor", "PredictionWriter"]
