"""A reference source of this project: a Laplace distribution, which the library does not ship.

Only :meth:`~dmvae_lightning.data.sources.ReferenceSource.draw` is written here; the data module
feeds its samples into ``batch["reference"]`` (seeded streams, checkpointed state, held-out
validation samples) as for the built-in sources. Named in YAML by class path::

    data:
      init_args:
        reference:
          class_path: plugin_example.sources.LaplaceSource
          init_args: {shape: [4, 8, 8], loc: 2.0, scale: 0.5}
"""

from __future__ import annotations

from typing import Any

import torch

from dmvae_lightning.data.sources import OPTION, Draw, ReferenceSource


class LaplaceSource(ReferenceSource):
    """i.i.d. ``Laplace(loc, scale)`` coordinates (mean ``loc``, variance ``2 scale^2``), no labels.

    Args:
        shape: ``[C, H, W]`` of one sample (the latent shape).
        loc: location (= mean).
        scale: scale (> 0; the mean absolute deviation from ``loc``).
    """

    name = "laplace"

    def __init__(self, shape: Any, loc: float = 0.0, scale: float = 1.0, option: str = OPTION):
        super().__init__(shape, option)
        if scale <= 0:
            raise ValueError(f"`{option}.init_args.scale` must be > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        # inverse CDF of the Laplace distribution on uniforms from the request's generator
        u = torch.rand((request.n, *self.shape), generator=request.generator, device=request.device)
        u = (u - 0.5).clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        return self.loc - self.scale * u.sign() * torch.log1p(-2 * u.abs()), None
