"""LDM/Flux-style convolutional decoder, parameter-compatible with the public DMVAE decoder.

Also home of the small conv building blocks (`ResnetBlock`, `AttnBlock`, `Upsample`,
`Downsample`, `group_norm`) that the conv encoder reuses.

Conventions: images are NCHW; latent token sequences are row-major (token = row * w + col).
Parameter names mirror the public checkpoints (`decoder.*` keys without the prefix), so a
released state dict loads with `strict=True` after casting to fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "ResnetBlock",
    "Upsample",
    "group_norm",
    "upsample_conv_weight",
]


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with `gcd(max_groups, channels)` groups (32 whenever `channels % 32 == 0`).

    The public decoder always uses 32 groups; widths that are not multiples of 32 (tiny CPU
    configs) fall back to the largest group count dividing both, instead of failing.
    """
    return nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=eps, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a shortcut.

    `nin_shortcut` (1x1 conv) exists only when `in_channels != out_channels`.
    Shape: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, scale 1/sqrt(C).

    Shape: (B, C, H, W) -> (B, C, H, W); residual.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(
            tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y))
        )
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


def upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) ``conv_transpose2d`` weight (stride 2, padding 1) that equals
    nearest-neighbour x2 upsampling followed by a 3x3 convolution (padding 1) with ``weight``
    (C_out, C_in, 3, 3).

    Why it holds: after nearest x2, the 3x3 window of output row ``2i`` covers input rows
    ``i - 1, i, i`` (taps 0, 1, 2) and that of row ``2i + 1`` rows ``i, i, i + 1``; the transposed
    convolution reaches input rows ``i - 1, i`` with its taps 3, 1 and rows ``i, i + 1`` with taps
    2, 0. So per axis its taps are ``(w2, w1 + w2, w0 + w1, w0)``, and the zero padding of both
    forms lies outside the image in both. The sums are plain additions, so they stay in the
    weight's dtype under autocast.
    """
    w0, w1, w2 = weight.unbind(2)  # rows
    rows = torch.stack([w2, w1 + w2, w0 + w1, w0], dim=2)  # (C_out, C_in, 4, 3)
    c0, c1, c2 = rows.unbind(3)  # columns
    taps = torch.stack([c2, c1 + c2, c0 + c1, c0], dim=3)  # (C_out, C_in, 4, 4)
    return taps.transpose(0, 1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (`conv`): (B, C, H, W) -> (B, C, 2H, 2W).

    Computed as one stride-2 transposed convolution whose 4x4 kernel is built from `conv`'s
    3x3 weight (:func:`upsample_conv_weight`): the same function up to float rounding, with
    4/9 of the multiply-adds and without the 4x-sized upsampled input kept for the backward
    pass (a whole decoder's training pass 0.86x on CPU: ``benchmarks/bench_decoder.py``).
    Parameters stay ``conv.weight`` / ``conv.bias``, so checkpoints load unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = upsample_conv_weight(self.conv.weight)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)


class Downsample(nn.Module):
    """Strided conv3x3 (`conv`, stride 2, padding 1): (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def tokens_to_map(z: torch.Tensor) -> torch.Tensor:
    """(B, N, C) row-major tokens on a square grid -> (B, C, sqrt(N), sqrt(N)); NCHW passes through."""
    if z.ndim == 4:
        return z
    if z.ndim != 3:
        raise ValueError(
            f"expected latents (B, C, h, w) or tokens (B, N, C), got shape {tuple(z.shape)}"
        )
    b, n, c = z.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"token count {n} is not a perfect square; pass an NCHW latent instead")
    return z.reshape(b, side, side, c).permute(0, 3, 1, 2)


class Decoder(nn.Module):
    """Latent -> image conv decoder (LDM / Flux layout, public DMVAE parameter names).

    Layout: `conv_in` -> `mid` (block_1, attn_1, block_2) -> levels `up.{i}` run from
    i = len(ch_mult)-1 down to 0, each with `num_res_blocks + 1` ResnetBlocks (`block.{j}`) and,
    for i >= 1, an `upsample` -> `norm_out`, SiLU, `conv_out`. Level i has width ch * ch_mult[i];
    the mid blocks run at ch * ch_mult[-1].

    Args:
        z_channels: latent channels C.
        out_channels: image channels.
        ch, ch_mult, num_res_blocks: width, per-level multipliers, blocks per level (minus one).
        mid_attention: keep `mid.attn_1`; False replaces it by identity (no parameters).
        input_upsample: public DMVAE layout, where `conv_in` is
            `Sequential(Upsample(z_channels), Conv2d(z_channels, block_in, 3, padding=1))`
            (an extra x2, e.g. 16x16 latents -> 32x32 before the levels). False: plain Conv2d.

    Input (B, C, h, w) or row-major tokens (B, N, C) with N a perfect square.
    Output (B, out_channels, h * f, w * f), unclamped, with
    f = 2 ** (len(ch_mult) - 1) * (2 if input_upsample else 1) (attribute `upsample_factor`).
    """

    def __init__(
        self,
        z_channels: int,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        mid_attention: bool = True,
        input_upsample: bool = False,
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        if not ch_mult or num_res_blocks < 0 or ch <= 0 or z_channels <= 0:
            raise ValueError(
                "Decoder needs z_channels > 0, ch > 0, a non-empty ch_mult and num_res_blocks >= 0"
            )
        self.z_channels = z_channels
        self.out_channels = out_channels
        self.upsample_factor = 2 ** (len(ch_mult) - 1) * (2 if input_upsample else 1)

        block_in = ch * ch_mult[-1]
        if input_upsample:
            self.conv_in = nn.Sequential(
                Upsample(z_channels), nn.Conv2d(z_channels, block_in, 3, padding=1)
            )
        else:
            self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in)
        self.mid.attn_1 = AttnBlock(block_in) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in)

        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            block_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level.block = nn.ModuleList(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # up.0 is the full-resolution level
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # NCHW memory: a channels-last view (tokens, a permuted latent) would be kept by every
        # convolution, and CPU GroupNorm is several times slower on it, backward most
        z = tokens_to_map(z).contiguous()
        if z.shape[1] != self.z_channels:
            raise ValueError(f"Decoder expects {self.z_channels} latent channels, got {z.shape[1]}")
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def get_last_layer(self) -> nn.Parameter:
        """Weight of `conv_out`, used for the adaptive GAN loss weight."""
        return self.conv_out.weight
