"""``s_shape``: the paper's 2-D toy density (PAPER.md section 2)."""

from __future__ import annotations

import math
from typing import Any

import torch

from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
)

__all__ = [
    "SShapeSource",
]


class SShapeSource(ReferenceSource):
    """The paper's 2-D S-shaped toy density (module docstring), as ``(n, 2, 1, 1)`` points.

    Per draw, in this order from ``request.generator``: ``u ~ U(-1, 1)`` (n,), the normal offset
    ``N(0, 1)`` (n,), the isotropic noise ``N(0, 1)`` (n, 2). :meth:`curve` and :meth:`normal`
    give the centre curve and its unit normal *before* the ``y`` flip. No labels.
    """

    name = "s_shape"

    def __init__(
        self,
        shape: Any = (2, 1, 1),
        amplitude: float = 0.85,
        vertical_scale: float = 0.85,
        skew: float = 0.15,
        thickness: float = 0.06,
        noise: float = 0.03,
        flip_y: bool = True,
        clip: float = 1.0,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if self.shape != (2, 1, 1):
            raise ValueError(
                f"`{option}.shape` must be [2, 1, 1] for name 's_shape' (one 2-D point as a "
                f"single 2-channel token), got {list(self.shape)}"
            )
        for key, value in (("thickness", thickness), ("noise", noise)):
            if value < 0:
                raise ValueError(f"`{option}.{key}` must be >= 0, got {value}")
        if clip <= 0:
            raise ValueError(f"`{option}.clip` must be > 0, got {clip}")
        self.amplitude, self.vertical_scale, self.skew = (
            float(amplitude),
            float(vertical_scale),
            float(skew),
        )
        self.thickness, self.noise = float(thickness), float(noise)
        self.flip_y, self.clip = bool(flip_y), float(clip)

    def curve(self, u: torch.Tensor) -> torch.Tensor:
        """Centre-curve points (n, 2) at parameters ``u`` (n,), before the ``y`` flip."""
        x = self.amplitude * torch.sin(math.pi * u)
        y = self.vertical_scale * u - self.skew * torch.sin(2 * math.pi * u)
        return torch.stack([x, y], dim=1)

    def normal(self, u: torch.Tensor) -> torch.Tensor:
        """Unit normals (n, 2) of the centre curve at ``u``: the unit tangent turned by +90
        degrees, ``(-T_y, T_x)``, before the ``y`` flip."""
        dx = self.amplitude * math.pi * torch.cos(math.pi * u)
        dy = self.vertical_scale - 2 * math.pi * self.skew * torch.cos(2 * math.pi * u)
        tangent = torch.stack([dx, dy], dim=1)
        tangent = tangent / tangent.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.stack([-tangent[:, 1], tangent[:, 0]], dim=1)

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        n, gen, device = request.n, request.generator, request.device
        u = 2.0 * torch.rand(n, generator=gen, device=device) - 1.0
        offset = request.randn(n)
        iso = request.randn(n, 2)
        points = self.curve(u) + (self.thickness * offset)[:, None] * self.normal(u)
        points = points + iso * (self.noise * (0.4 + 0.6 * u.abs()))[:, None]
        if self.flip_y:
            points = points * points.new_tensor([1.0, -1.0])
        points = points.clamp(-self.clip, self.clip)
        return points.view(n, 2, 1, 1), None
