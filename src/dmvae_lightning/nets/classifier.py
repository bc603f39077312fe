"""A small supervised conv classifier: the CPU-scale stand-in for a frozen foundation encoder, and
the design of the offline "domain" feature network used for FID on Fashion-MNIST.

:class:`ConvClassifier` maps images (B, C_img, H, W) in [-1, 1] through a strided stem and
``len(widths)`` conv stages to a feature map (B, widths[-1], H / f, W / f); global average pooling gives the
embedding (B, widths[-1]) and a linear head the logits (B, num_classes).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["ConvClassifier"]

Norm = Literal["group", "batch"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"ConvClassifier.norm must be 'group' or 'batch', got {kind!r}")


class ConvClassifier(nn.Module):
    """Conv classifier with a feature-map output.

    Layout: a 3x3 stem conv with stride ``stem_stride`` to ``widths[0]`` channels, then one stage
    per width, each a stride-2 3x3 conv (from the second stage on) followed by ``blocks`` 3x3
    convs; every conv is followed by the norm and SiLU.

    Args:
        in_channels: image channels.
        num_classes: classes of the linear head.
        widths: channels of each stage.
        blocks: 3x3 convs per stage after its (strided) entry conv.
        stem_stride: stride of the stem (1 or 2).
        norm: ``"group"`` (GroupNorm with gcd(8, C) groups; batch-independent, so a trainable copy behaves the same under DDP
            and any batch size) or ``"batch"``.
        dropout: dropout before the head.

    ``features(x)`` (B, D, h, w) with D = ``out_dim`` = ``widths[-1]`` and
    h = H / ``downsample_factor``, ``downsample_factor = stem_stride * 2 ** (len(widths) - 1)``;
    ``embed(x)`` (B, D); ``forward(x)`` logits (B, num_classes). ``config``: the constructor's
    arguments (plain values), which rebuild the same network: ``ConvClassifier(**net.config)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] | list[int] = (32, 64),
        norm: Norm = "group",
        dropout: float = 0.0,
        blocks: int = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) <= 0 or blocks < 0 or stem_stride not in (1, 2):
            raise ValueError(
                "ConvClassifier needs positive widths, blocks >= 0 and stem_stride 1 or 2; got "
                f"widths={widths}, blocks={blocks}, stem_stride={stem_stride}"
            )
        self.config: dict[str, object] = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "widths": list(widths),
            "norm": str(norm),
            "dropout": float(dropout),
            "blocks": int(blocks),
            "stem_stride": int(stem_stride),
        }

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                _norm(norm, c_out),
                nn.SiLU(),
            ]

        layers = conv(in_channels, widths[0], stem_stride)
        c_prev = widths[0]
        for i, width in enumerate(widths):
            if i > 0:
                layers += conv(c_prev, width, 2)
            layers += [m for _ in range(blocks) for m in conv(width, width)]
            c_prev = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_prev, num_classes))
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.out_dim = c_prev
        self.downsample_factor = stem_stride * 2 ** (len(widths) - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, W) in [-1, 1] -> feature map (B, out_dim, H/f, W/f)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvClassifier expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}"
            )
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, out_dim): the input of the head (and of FID statistics)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.embed(x))
