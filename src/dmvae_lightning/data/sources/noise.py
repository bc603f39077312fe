"""``diffusion_noise``: another source's samples on the flow path at a fixed ``t``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
    SourceContext,
)

__all__ = [
    "NoisedSource",
]


class NoisedSource(ReferenceSource):
    """Diffusion-noise states ``z_t = t z + (1 - t) eps`` of ``base`` (``eps`` drawn after the
    base sample). With a Gaussian base ``N(m, s^2)``: ``E[z_t] = t m``, ``Var = t^2 s^2 +
    (1 - t)^2``. Labels and requirements are the base's."""

    name = "diffusion_noise"

    def __init__(self, base: ReferenceSource, t: float = 0.5, option: str = OPTION) -> None:
        super().__init__(base.shape, option)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"`{option}.t` must be in [0, 1] (1 = data, 0 = noise), got {t}")
        self.base, self.t = base, float(t)
        self.uses_images, self.uses_labels = base.uses_images, base.uses_labels
        self.num_classes = base.num_classes

    def prepare(self, context: SourceContext) -> None:
        self.base.prepare(context)
        self.num_classes = self.base.num_classes

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, labels = self.base.draw(request)
        eps = request.randn(request.n, *self.shape)
        return self.t * z.float() + (1.0 - self.t) * eps, labels

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base.load_state_dict(state)
