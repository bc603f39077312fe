"""LightningDiT-style flow-matching transformer, parameter-compatible with the public LightningDiT.

Contract: ``DiT(x, t, y) -> v`` with ``x`` an (N, C, H, W) latent, ``t`` (N,) in [0, 1] with
**t = 1 data, t = 0 noise** (``x_t = t * x_data + (1 - t) * noise``), ``y`` (N,) int64 class
labels where index ``num_classes`` is the null (unconditional) class, and ``v`` the predicted
velocity ``x_data - noise`` of shape (N, C, H, W). Tokens are the rows of the patch grid:
token = row * w + col.

Architecture: patch embedding, fixed 2-D sin-cos position embedding, 2-D RoPE after QK RMSNorm,
SDPA attention, SwiGLU MLP, RMSNorm (eps 1e-6, gain, no bias), adaLN-Zero conditioning on
``c = t_emb + y_emb``. Every convention in which LightningDiT-style code bases differ is a
constructor option; the defaults are the public DMVAE/LightningDiT conventions, so the released
checkpoints load with ``strict=True`` after casting to fp32 (``DiT.from_public_kwargs`` maps the
public constructor arguments):

* time embedding: ``t * time_embed_scale`` (public 1.0: unscaled; DiT/SiT-style 1000) into a
  256-d sinusoid ordered ``[cos | sin]`` (``time_embed_order="cos_sin"``), max period 1e4;
* position embedding: first half of the channels encodes the column, second half the row
  (``pos_embed_order="col_row"``), each half ``[sin | cos]`` with omega_k = 1e4^(-k / (D/4));
* RoPE: first half of ``head_dim`` encodes the row, second half the column
  (``rope_order="row_col"``), frequencies theta^(-2i / (head_dim/2)), each frequency shared by an
  interleaved channel pair (2i, 2i+1) rotated as (a, b) -> (a cos - b sin, b cos + a sin);
* SwiGLU width ``int(2/3 * int(mlp_ratio * D))`` (``swiglu_hidden="public"``, 682 for D = 256).

The position-embedding and RoPE tables are **non-persistent buffers**: recomputed from the
configuration, never trained, never saved, and identical on every rank. Loading a public state
dict that still carries ``pos_embed`` / ``feat_rope.freqs_cos`` / ``feat_rope.freqs_sin`` drops
those keys (with a warning if the stored table differs from the recomputed one by more than 1e-4).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmvae_lightning.flow import cfg_velocity

__all__ = [
    "DIT_CONFIGS",
    "Attention",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "RMSNorm",
    "RotaryEmbedding2D",
    "SwiGLU",
    "TimestepEmbedder",
    "sincos_pos_embed_2d",
]

# Named sizes (depth, width, heads) of the LightningDiT family plus a CPU-sized "tiny".
DIT_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 2, "hidden_size": 64, "num_heads": 4},
    "Mini": {"depth": 6, "hidden_size": 256, "num_heads": 4},
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
    "1p0B": {"depth": 24, "hidden_size": 1536, "num_heads": 24},
    "1p6B": {"depth": 28, "hidden_size": 1792, "num_heads": 28},
}

# Public LightningDiT constructor defaults (used by `DiT.from_public_kwargs` for absent keys).
_PUBLIC_DEFAULTS: dict[str, Any] = {
    "input_size": 32,
    "patch_size": 2,
    "in_channels": 32,
    "hidden_size": 1152,
    "depth": 28,
    "num_heads": 16,
    "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1,
    "num_classes": 1000,
    "learn_sigma": False,
    "use_qknorm": True,
    "use_swiglu": True,
    "use_rope": True,
    "use_rmsnorm": True,
    "wo_shift": False,
    "use_checkpoint": False,
}


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {size}")
    return size  # type: ignore[return-value]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``.

    Normalises in fp32 and casts back to the input dtype before the gain (as the public code).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel instead of four passes (bit-identical here: bench_dit_ops.py)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _norm(dim: int, rms: bool) -> nn.Module:
    """Block / final norm: RMSNorm with gain, or the public fallback LayerNorm without affine."""
    return RMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a | b] = w12(x)``. Shape (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """Two-layer MLP with tanh-GELU (timm ``Mlp`` parameter names ``fc1``/``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sincos_pos_embed_2d(
    dim: int, height: int, width: int, order: Literal["col_row", "row_col"] = "col_row"
) -> torch.Tensor:
    """Fixed 2-D sin-cos table of shape (height * width, dim), fp32, row-major tokens.

    Each axis gets ``dim / 2`` channels ``[sin(p * omega) | cos(p * omega)]`` with
    ``omega_k = 1e4^(-k / (dim / 4))``, k < dim / 4; ``order="col_row"`` (public) puts the column
    half first. Computed in fp64 and rounded once to fp32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float64).repeat(height)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    halves = (axis(cols), axis(rows)) if order == "col_row" else (axis(rows), axis(cols))
    return torch.cat(halves, dim=1).float()


class RotaryEmbedding2D(nn.Module):
    """2-D rotary embedding over a token grid, applied per head to q and k.

    The tables ``freqs_cos`` / ``freqs_sin`` (T, head_dim) for the configured grid are
    non-persistent buffers (absent from ``state_dict``); other grid sizes are computed on the fly.
    ``order="row_col"`` (public): channels [0, head_dim/2) rotate with the row index, the rest with
    the column. Frequencies ``theta^(-i / (head_dim / 4))``, each used by the interleaved pair
    (2i, 2i+1).
    """

    def __init__(
        self,
        head_dim: int,
        grid: tuple[int, int],
        theta: float = 10000.0,
        order: Literal["row_col", "col_row"] = "row_col",
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim % 4 == 0, got head_dim={head_dim}")
        self.head_dim, self.grid, self.theta, self.order = head_dim, grid, theta, order
        cos, sin = self.compute(*grid)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def compute(self, height: int, width: int, device: Any = None) -> tuple[torch.Tensor, ...]:
        """(cos, sin) tables of shape (height * width, head_dim), fp32 (computed in fp64)."""
        quarter = self.head_dim // 4
        freqs = self.theta ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
        rows = torch.arange(height, dtype=torch.float64, device=device).repeat_interleave(width)
        cols = torch.arange(width, dtype=torch.float64, device=device).repeat(height)
        first, second = (rows, cols) if self.order == "row_col" else (cols, rows)
        angle = torch.cat([first[:, None] * freqs, second[:, None] * freqs], dim=1)
        angle = angle.repeat_interleave(2, dim=1)
        return angle.cos().float(), angle.sin().float()

    def tables(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (height, width) == self.grid:
            return self.freqs_cos, self.freqs_sin
        return self.compute(height, width, device=self.freqs_cos.device)  # type: ignore[return-value]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of ``x`` (..., T, head_dim) by the angles of the tables."""
        pairs = x.unflatten(-1, (-1, 2))
        swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        for index, name in enumerate(("freqs_cos", "freqs_sin")):
            _drop_fixed_table(
                state_dict, prefix + name, lambda i=index: self.compute(*self.grid)[i]
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _drop_fixed_table(state_dict: dict, key: str, reference: Callable[[], torch.Tensor]) -> None:
    """Remove a recomputed table from an incoming state dict; warn if it differs from the fp32
    ``reference()`` (by more than 1e-4 or in size), i.e. it was made for another grid/layout."""
    if key not in state_dict:
        return
    theirs = state_dict.pop(key).detach().float().reshape(-1).cpu()
    ours = reference().reshape(-1)
    same = theirs.numel() == ours.numel() and torch.allclose(theirs, ours, atol=1e-4, rtol=0)
    if not same:
        warnings.warn(
            f"ignored '{key}' from the state dict: it differs from the recomputed fixed table "
            "(different grid or layout?); the recomputed table is used",
            stacklevel=3,
        )


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` ([q | k | v], head-major), per-head QK norm,
    optional RoPE on q and k, SDPA with scale 1/sqrt(head_dim), output ``proj``.

    Shape (N, T, D) -> (N, T, D).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rms: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda d: RMSNorm(d)) if rms else (lambda d: nn.LayerNorm(d))
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = RotaryEmbedding2D.rotate(q, *rope), RotaryEmbedding2D.rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): sinusoid of ``t * scale`` (fp32, autocast off) then Linear-SiLU-Linear."""

    def __init__(
        self,
        hidden_size: int,
        freq_dim: int = 256,
        scale: float = 1.0,
        order: Literal["cos_sin", "sin_cos"] = "cos_sin",
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        self.freq_dim, self.scale, self.order, self.max_period = freq_dim, scale, order, max_period
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def sinusoid(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N,) -> (N, freq_dim) ``[cos | sin]`` of ``t * scale * f_k``, ``f_k =
        max_period^(-k / half)``, computed in ``dtype`` (fp32 or fp64) with autocast off."""
        with torch.autocast(t.device.type, enabled=False):
            t = t.to(dtype) * self.scale
            half = self.freq_dim // 2
            k = torch.arange(half, dtype=dtype, device=t.device)
            freqs = torch.exp(-math.log(self.max_period) * k / half)
            angle = t[:, None] * freqs[None]
            parts = [angle.cos(), angle.sin()]
            if self.order == "sin_cos":
                parts.reverse()
            if self.freq_dim % 2:
                parts.append(torch.zeros_like(angle[:, :1]))
            return torch.cat(parts, dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """The MLP sees the fp32 sinusoid (fp64 for an fp64 model; cast down only for a model
        whose weights are half precision without autocast, e.g. Lightning "bf16-true")."""
        weight_dtype = self.mlp[0].weight.dtype
        freq = self.sinusoid(t, torch.float64 if weight_dtype == torch.float64 else torch.float32)
        return self.mlp(freq.to(weight_dtype) if freq.dtype != weight_dtype else freq)


class LabelEmbedder(nn.Module):
    """Class embedding with ``num_classes + 1`` rows; row ``num_classes`` is the null class.

    In training mode each label is replaced by the null class with probability ``dropout_prob``
    (unless ``force_drop_ids`` is given); in eval mode labels are never dropped at random.
    ``force_drop_ids`` (N,) bool/int: nonzero entries are replaced by the null class, in any mode.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {dropout_prob}")
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=labels.device).bool()
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return self.embedding_table(labels)
        return self.embedding_table(torch.where(drop, self.num_classes, labels))


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) tokens by a ``p x p`` stride-``p`` conv ``proj``; T = HW / p^2."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` per sample: x (N, T, D), shift and scale (N, D)."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # one pass over x


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. ``adaLN_modulation = (SiLU, Linear(D, 6D))`` gives
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); with ``wo_shift`` a
    Linear(D, 4D) gives the four scales/gates only. Shapes: x (N, T, D), c (N, D)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_hidden: int,
        use_qknorm: bool,
        use_swiglu: bool,
        use_rmsnorm: bool,
        wo_shift: bool,
    ) -> None:
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = _norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, rms=use_rmsnorm)
        self.norm2 = _norm(hidden_size, use_rmsnorm)
        mlp_cls = SwiGLU if use_swiglu else GeluMlp
        self.mlp = mlp_cls(hidden_size, mlp_hidden)
        chunks = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size)
        )

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), h)  # x + gate * h
        h = self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on ``norm_final`` then ``linear`` to ``p*p*C`` outputs per token."""

    def __init__(self, hidden_size: int, out_dim: int, use_rmsnorm: bool) -> None:
        super().__init__()
        self.norm_final = _norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """LightningDiT-style velocity network on latents (see the module docstring for conventions).

    Args:
        input_size: latent height/width (int) or (H, W); sets the cached position tables. Any
            other grid divisible by ``patch_size`` also works (tables computed on the fly).
        in_channels: latent channels C.
        patch_size: token patch side p (1 or 2 in the released models).
        hidden_size, depth, num_heads, mlp_ratio: transformer size (see ``DIT_CONFIGS``).
        num_classes: real classes; the null class is index ``num_classes`` (table has one more row).
        class_dropout_prob: label-dropout probability in training mode (for CFG).
        use_rope, use_qknorm, use_swiglu, use_rmsnorm, use_pos_embed: architecture switches
            (public: all on). Without RMSNorm, block norms are affine-free LayerNorm (eps 1e-6)
            and QK norms affine LayerNorm (eps 1e-5), as in the public code.
        grad_checkpointing: recompute each block in backward (only while grad is enabled).
        time_embed_scale: multiplier of t before the sinusoid (public 1.0; DiT/SiT-style 1000).
        time_embed_order: "cos_sin" (public) or "sin_cos".
        time_freq_dim: sinusoid width (public 256).
        swiglu_hidden: "public" = ``int(2/3 * int(mlp_ratio * D))``; "multiple_of_8" rounds that
            up to a multiple of 8; or an explicit int. Ignored without SwiGLU (GELU MLP uses
            ``int(mlp_ratio * D)``).
        pos_embed_order: "col_row" (public: first half encodes the column) or "row_col".
        rope_order: "row_col" (public: first half of head_dim rotates with the row) or "col_row".
        rope_theta: RoPE base (public 1e4).
        wo_shift: adaLN without shift terms (public option, default off).
        learn_sigma: output 2C channels and keep the first C (public option, default off).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 16,
        in_channels: int = 32,
        patch_size: int = 1,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        use_rope: bool = True,
        use_qknorm: bool = True,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        use_pos_embed: bool = True,
        grad_checkpointing: bool = False,
        time_embed_scale: float = 1.0,
        time_embed_order: Literal["cos_sin", "sin_cos"] = "cos_sin",
        time_freq_dim: int = 256,
        swiglu_hidden: Literal["public", "multiple_of_8"] | int = "public",
        pos_embed_order: Literal["col_row", "row_col"] = "col_row",
        rope_order: Literal["row_col", "col_row"] = "row_col",
        rope_theta: float = 10000.0,
        wo_shift: bool = False,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        height, width = _pair(input_size)
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f"input_size {(height, width)} is not divisible by patch {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        for name, value, choices in (
            ("time_embed_order", time_embed_order, ("cos_sin", "sin_cos")),
            ("pos_embed_order", pos_embed_order, ("col_row", "row_col")),
            ("rope_order", rope_order, ("row_col", "col_row")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.hidden_size, self.num_heads = num_classes, hidden_size, num_heads
        self.grid = (height // patch_size, width // patch_size)
        self.use_pos_embed, self.pos_embed_order = use_pos_embed, pos_embed_order
        self.grad_checkpointing, self.learn_sigma = grad_checkpointing, learn_sigma

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(
            hidden_size, time_freq_dim, time_embed_scale, time_embed_order
        )
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if use_pos_embed:
            table = sincos_pos_embed_2d(hidden_size, *self.grid, order=pos_embed_order)
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:
            self.pos_embed = None
        head_dim = hidden_size // num_heads
        self.feat_rope = (
            RotaryEmbedding2D(head_dim, self.grid, rope_theta, rope_order) if use_rope else None
        )
        mlp_hidden = self._mlp_hidden(hidden_size, mlp_ratio, use_swiglu, swiglu_hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden_size, num_heads, mlp_hidden, use_qknorm, use_swiglu, use_rmsnorm, wo_shift
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(
            hidden_size, patch_size * patch_size * self.out_channels, use_rmsnorm
        )
        self.initialize_weights()

    @staticmethod
    def _mlp_hidden(dim: int, ratio: float, swiglu: bool, rule: str | int) -> int:
        base = int(dim * ratio)
        if not swiglu:
            return base
        if isinstance(rule, int):
            return rule
        hidden = int(2 / 3 * base)
        if rule == "public":
            return hidden
        if rule == "multiple_of_8":
            return -(-hidden // 8) * 8
        raise ValueError(f"swiglu_hidden must be 'public', 'multiple_of_8' or an int, got {rule!r}")

    @property
    def null_class(self) -> int:
        """Label index of the null (unconditional) class."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """adaLN-Zero init: Xavier-uniform linears / patch conv, N(0, 0.02) label table and time
        MLP weights, zero biases, zero adaLN projections and zero output layer (output is 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        if self.pos_embed is not None:
            _drop_fixed_table(
                state_dict,
                prefix + "pos_embed",
                lambda: sincos_pos_embed_2d(
                    self.hidden_size, *self.grid, order=self.pos_embed_order
                ),
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _position_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == self.grid:
            return self.pos_embed  # type: ignore[return-value]
        table = sincos_pos_embed_2d(self.hidden_size, h, w, order=self.pos_embed_order)
        return table[None].to(self.pos_embed.device)  # type: ignore[union-attr]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        Args:
            x: (N, C, H, W) noisy latent, H and W divisible by ``patch_size``.
            t: (N,) or scalar time in [0, 1], t = 1 data; used in fp32 (pass fp32: a bf16 ``t``
                has already lost precision).
            y: (N,) int64 labels in [0, num_classes]; None means all null (unconditional).
            force_drop_ids: optional (N,) mask; nonzero entries use the null class. When given,
                no random label dropout happens.

        Returns:
            (N, C, H, W) velocity; dtype follows autocast.
        """
        n, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {tuple(x.shape)} is not divisible by patch size {p}")
        h, w = height // p, width // p
        t = torch.as_tensor(t, device=x.device)
        t = t.float().expand(n) if t.ndim == 0 else t
        if t.shape != (n,):
            raise ValueError(f"t must be a scalar or shape ({n},), got {tuple(t.shape)}")
        if y is None:
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=x.device)

        tokens = self.x_embedder(x)
        if self.pos_embed is not None:
            tokens = tokens + self._position_embed(h, w)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)
        rope = self.feat_rope.tables(h, w) if self.feat_rope is not None else None
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                tokens = checkpoint(block, tokens, c, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, rope)
        out = self.final_layer(tokens, c)  # (N, T, p*p*C_out), channels ordered (p, q, c)
        out = out.view(n, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(n, self.out_channels, height, width)
        return out[:, : self.in_channels] if self.learn_sigma else out

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor,
        cfg_scale: float,
        null_class: int | None = None,
        interval: tuple[float, float] | None = None,
        guided_channels: int | None = None,
    ) -> torch.Tensor:
        """Standard classifier-free guidance ``v_null + s * (v_cond - v_null)`` on all channels.

        Cond and null run as ONE batched forward of size 2N; random label dropout is disabled.
        ``interval=(lo, hi)`` guides only samples with lo <= t <= hi (others get v_cond).
        ``guided_channels=k`` guides only channels ``[:k]`` and returns ``v_cond`` elsewhere: the
        public ``forward_with_cfg(standard_cfg=False)`` default (k = 3, a DiT leftover; its
        sampler never uses it), kept so imported models reproduce every public output.
        Takes the N inputs once (unlike the public method, which wants them duplicated).
        Returns (N, C, H, W) fp32.
        """

        def model_fn(xx: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return self(xx, tt, yy, force_drop_ids=torch.zeros_like(yy, dtype=torch.bool))

        null = self.num_classes if null_class is None else null_class
        if guided_channels is None:
            return cfg_velocity(model_fn, x, t, y, cfg_scale, null, interval=interval)
        if interval is not None:
            raise ValueError("guided_channels and interval cannot be combined")
        n = x.shape[0]
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
        out = model_fn(
            torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null)])
        ).float()
        v_cond, v_null = out[:n], out[n:]
        guided = v_null + cfg_scale * (v_cond - v_null)
        return torch.cat([guided[:, :guided_channels], v_cond[:, guided_channels:]], dim=1)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DiT:
        """Build a named size: ``"tiny"``, ``"Mini"``, ``"S"``, ``"B"``, ``"L"``, ``"XL"``, ... with an
        optional patch suffix (``"XL/2"``) and optional ``LightningDiT-`` prefix; ``kwargs`` set the
        rest (``input_size``, ``in_channels``, ``num_classes``, ...) and may override the size."""
        key = name.removeprefix("LightningDiT-").removeprefix("DiT-")
        key, _, patch = key.partition("/")
        if key not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT preset {name!r}; choose from {sorted(DIT_CONFIGS)}")
        config: dict[str, Any] = dict(DIT_CONFIGS[key])
        if patch:
            if "patch_size" in kwargs and kwargs["patch_size"] != int(patch):
                raise ValueError(
                    f"preset {name!r} conflicts with patch_size={kwargs['patch_size']}"
                )
            config["patch_size"] = int(patch)
        config.update(kwargs)
        return cls(**config)

    @classmethod
    def from_public_kwargs(cls, public_kwargs: dict[str, Any], **overrides: Any) -> DiT:
        """Build the model that the public ``LightningDiT(**public_kwargs)`` describes.

        Absent keys take the public defaults (input_size 32, patch 2, XL width, ...);
        ``use_checkpoint`` maps to ``grad_checkpointing``; unknown keys are an error.
        ``overrides`` are options of this class (e.g. ``time_embed_scale``) applied on top.
        Note: a public model built with ``class_dropout_prob=0`` has no null row (``num_classes``
        rows instead of ``num_classes + 1``); its label table must be padded by the importer.
        """
        unknown = set(public_kwargs) - set(_PUBLIC_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown LightningDiT argument(s): {sorted(unknown)}")
        kwargs = {**_PUBLIC_DEFAULTS, **public_kwargs}
        kwargs["grad_checkpointing"] = kwargs.pop("use_checkpoint")
        return cls(**{**kwargs, **overrides})
