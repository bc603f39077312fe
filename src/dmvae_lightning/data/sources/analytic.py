"""Closed-form sources: ``gaussian``, ``gmm`` (a mixture, optionally one component per class)
and ``sphere``."""

from __future__ import annotations

import math
from typing import Any

import torch

from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
    SourceContext,
)

__all__ = [
    "GaussianSource",
    "MixtureSource",
    "SphereSource",
]


# --------------------------------------------------------------------------------- simple sources
class GaussianSource(ReferenceSource):
    """``N(mean, std^2 I)`` (no labels)."""

    name = "gaussian"

    def __init__(self, shape: Any, mean: float = 0.0, std: float = 1.0, option: str = OPTION):
        super().__init__(shape, option)
        if std <= 0:
            raise ValueError(f"`{option}.std` must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        return self.mean + self.std * request.randn(request.n, *self.shape), None


class MixtureSource(ReferenceSource):
    """Mixture of ``num_components`` isotropic Gaussians (see the module docstring).

    ``means``: float32 ``(k, C, H, W)`` from ``N(0, center_std^2)`` with a generator seeded by
    ``seed``; ``weights``: ``(k,)`` probabilities. Labels: component indices ``(n,)``."""

    name = "gmm"

    def __init__(
        self,
        shape: Any,
        num_components: int = 10,
        per_class: bool = False,
        center_std: float = 1.0,
        std: float = 0.5,
        weights: list[float] | None = None,
        seed: int = 0,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if num_components < 1:
            raise ValueError(f"`{option}.num_components` must be >= 1, got {num_components}")
        if std <= 0 or center_std < 0:
            raise ValueError(f"`{option}.std` must be > 0 and `center_std` >= 0")
        if weights is not None:
            if per_class:
                raise ValueError(f"`{option}.weights` does not apply with per_class: true")
            if len(weights) != num_components or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"`{option}.weights` must hold {num_components} non-negative numbers with a "
                    f"positive sum, got {weights}"
                )
        self.per_class = per_class
        self.std = float(std)
        self.num_classes = num_components
        generator = torch.Generator().manual_seed(seed)
        self.means = center_std * torch.randn((num_components, *self.shape), generator=generator)
        w = torch.ones(num_components) if weights is None else torch.tensor(weights)
        self.weights = (w / w.sum()).float()
        self.uses_labels = per_class

    def prepare(self, context: SourceContext) -> None:
        if self.per_class and context.num_classes != self.num_classes:
            raise ValueError(
                f"`{self.option}.num_components` is {self.num_classes} but per_class: true needs "
                f"one component per image class ({context.num_classes}); set them equal"
            )

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        device = request.device
        if self.per_class:
            labels = self._labels(request)
        else:
            labels = torch.multinomial(
                self.weights.to(device), request.n, replacement=True, generator=request.generator
            )
        noise = request.randn(request.n, *self.shape)
        return self.means.to(device)[labels] + self.std * noise, labels


class SphereSource(ReferenceSource):
    """Uniform on a sphere (see the module docstring); no labels."""

    name = "sphere"

    def __init__(
        self,
        shape: Any,
        radius: float | None = None,
        per_position: bool = False,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        c, h, w = self.shape
        default = math.sqrt(c) if per_position else math.sqrt(c * h * w)
        self.radius = default if radius is None else float(radius)
        if self.radius <= 0:
            raise ValueError(f"`{option}.radius` must be > 0, got {radius}")
        self.per_position = per_position

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        g = request.randn(request.n, *self.shape)
        if self.per_position:
            norm = g.norm(dim=1, keepdim=True)
        else:
            norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return g / norm.clamp_min(1e-12) * self.radius, None
