"""Former home of :class:`~dmvae_lightning.data.feeder.ReferenceFeeder` (it lives beside the data
module it feeds now); this path keeps working for configs and imports."""

from dmvae_lightning.data.feeder import ReferenceFeeder

__all__ = ["ReferenceFeeder"]
