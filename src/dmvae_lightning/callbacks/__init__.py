"""Callbacks shipped with the library."""

from dmvae_lightning.callbacks.prediction_writer import PredictionWriter

__all__ = ["PredictionWriter"]
