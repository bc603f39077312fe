"""Image encoders (a small LDM-style conv net, or any timm backbone) and the MLP bottleneck.

Every encoder maps images (B, C_in, H, W) in [-1, 1] to a feature map (B, out_dim, H/f, W/f)
with f = `downsample_factor`; `MLPBottleneck` then maps features to latent channels per
position. Feature grids are row-major when flattened to tokens (token = row * w + col).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import AttnBlock, Downsample, ResnetBlock, group_norm

__all__ = ["ClassifierEncoder", "ConvEncoder", "MLPBottleneck", "TimmEncoder", "build_encoder"]


class ConvEncoder(nn.Module):
    """LDM-style conv encoder: conv_in, per level `num_res_blocks` ResnetBlocks (GroupNorm with
    gcd(32, C) groups, SiLU) and a stride-2 conv between levels, mid (ResnetBlock, optional
    attention, ResnetBlock), then GroupNorm, SiLU, conv_out.

    Input (B, in_channels, H, W) in [-1, 1] -> (B, out_dim, ceil(H/f), ceil(W/f)) with
    f = `downsample_factor` = 2 ** (len(ch_mult) - 1). `out_dim` defaults to ch * ch_mult[-1].
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 64,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        out_dim: int | None = None,
        mid_attention: bool = False,
    ) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        if not ch_mult or ch <= 0 or num_res_blocks < 0:
            raise ValueError(
                "model.init_args.encoder: ConvEncoder needs ch > 0, a non-empty ch_mult and "
                "num_res_blocks >= 0"
            )
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        block_in = ch * ch_mult[0]
        self.out_dim = ch * ch_mult[-1] if out_dim is None else int(out_dim)

        self.conv_in = nn.Conv2d(in_channels, block_in, 3, padding=1)
        levels = []
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            level.block = nn.ModuleList(blocks)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in)
        self.mid.attn_1 = AttnBlock(block_in) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, self.out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TimmEncoder(nn.Module):
    """Any timm backbone as a feature-map encoder (the paper uses DINOv2 at patch 16, 256 px).

    Input (B, in_channels, H, W) in [-1, 1] is mapped to [0, 1], repeated to 3 channels when
    `in_channels == 1` and the backbone wants 3, and normalised with the backbone's
    `pretrained_cfg` mean/std (non-persistent buffers `mean`, `std`, shape (1, C, 1, 1)).
    Output (B, out_dim, H/f, W/f), f = `downsample_factor`:
      * ViTs: `forward_features` tokens (after the final norm), the `num_prefix_tokens` prefix
        tokens dropped, patch tokens reshaped row-major (token = row * w + col) to NCHW;
      * CNNs: `forward_features` as returned (NHWC outputs are permuted to NCHW).

    Args:
        model_name: a timm model name, e.g. "vit_large_patch14_dinov2.lvd142m".
        pretrained: load weights from `weights_path` (a local .pth / .safetensors in the model's
            own key format) through `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`,
            so timm's adaptation (patch / position embedding resampling) applies. Never downloads.
            The model is built with its default head so the load is strict when `num_classes`
            matches the file; the head is then removed (`reset_classifier(0)`).
        weights_path: path of that file; required when `pretrained=True`.
        frozen: `requires_grad_(False)` and the backbone stays in eval mode under `.train()`.
        img_size, patch_size: passed to `timm.create_model` when given.
        in_channels: channels of the images fed to this module (1 or the backbone's own).
        **timm_kwargs: any further `timm.create_model` keyword (e.g. `depth`, `embed_dim`).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
        frozen: bool = True,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
        import timm

        kwargs = dict(timm_kwargs)
        if img_size is not None:
            kwargs["img_size"] = img_size
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if weights_path is not None and not pretrained:
            warnings.warn(
                f"model.init_args.encoder.weights_path is set ({str(weights_path)!r}) but "
                f"pretrained is false: {model_name!r} starts from random weights and the file "
                "is not read; set model.init_args.encoder.pretrained: true to load it",
                stacklevel=2,
            )
        if pretrained:
            path = None if weights_path is None else Path(weights_path).expanduser()
            if path is None or not path.is_file():
                raise FileNotFoundError(
                    f"pretrained=True needs a local weights file for {model_name!r}, but "
                    f"encoder.weights_path is {weights_path!r}, which does not exist; set "
                    "model.init_args.encoder.weights_path to the file (or pretrained: false)"
                )
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        try:
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except TypeError as err:  # unknown keyword for this architecture
            raise TypeError(
                f"model.init_args.encoder: timm model {model_name!r} rejected its arguments "
                f"{sorted(kwargs)}: {err}"
            ) from err
        except RuntimeError as err:  # e.g. missing/unexpected keys in the weights file
            if not pretrained:
                raise
            raise RuntimeError(
                f"could not load encoder.weights_path={str(weights_path)!r} into {model_name!r} "
                f"(check model.init_args.encoder): {err}"
            ) from err
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.model = model
        self.model_name = model_name

        model_in = int(kwargs.get("in_chans", 3))
        if in_channels not in (model_in, 1):
            raise ValueError(
                f"model.init_args.encoder.in_channels={in_channels} does not fit {model_name!r}, "
                f"which takes {model_in} channels (1-channel inputs are repeated)"
            )
        self.in_channels = in_channels
        self.repeat = model_in if in_channels != model_in else 1
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        if mean.numel() != model_in:  # e.g. a 3-channel cfg on an in_chans=1 backbone
            mean, std = mean.mean().repeat(model_in), std.mean().repeat(model_in)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

        self.out_dim: int = int(model.num_features)
        self.num_prefix_tokens: int = int(getattr(model, "num_prefix_tokens", 0))
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "patch_size"):
            ps = patch_embed.patch_size
            self.patch_hw: tuple[int, int] | None = (
                (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
            )
            self.downsample_factor: int = self.patch_hw[0]
        else:
            self.patch_hw = None
            info = getattr(model, "feature_info", None)
            if not info:
                raise ValueError(
                    f"model.init_args.encoder: cannot tell the downsample factor of {model_name!r}"
                )
            self.downsample_factor = int(info[-1]["reduction"])

        self.set_frozen(frozen)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no grads, eval mode kept) or unfreeze (grads on, follows `.train()`)."""
        self.frozen = frozen
        self.model.requires_grad_(not frozen)
        self.model.train(self.training and not frozen)

    def train(self, mode: bool = True) -> TimmEncoder:
        """Usual `train`, except that a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TimmEncoder expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}"
            )
        if self.repeat > 1:
            x = x.expand(-1, self.repeat, -1, -1)
        x = ((x + 1.0) * 0.5 - self.mean) / self.std
        feats = self.model.forward_features(x)
        if feats.ndim == 4:
            return feats.permute(0, 3, 1, 2) if self.nhwc else feats
        if feats.ndim != 3:
            raise ValueError(f"unsupported forward_features output shape {tuple(feats.shape)}")
        tokens = feats[:, self.num_prefix_tokens :]
        b, n, d = tokens.shape
        if self.patch_hw is not None:
            h, w = x.shape[-2] // self.patch_hw[0], x.shape[-1] // self.patch_hw[1]
        else:
            h = w = math.isqrt(n)
        if h * w != n:
            raise ValueError(f"{n} patch tokens do not form the expected {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(b, d, h, w)


class MLPBottleneck(nn.Module):
    """Per-position MLP `mlp = Sequential(Linear(in, hidden), SiLU, Linear(hidden, out))`.

    Keys `mlp.0.*`, `mlp.2.*` match the public checkpoints' `bottle_neck.mlp.{0,2}`.
    Input (B, in_dim, h, w) -> (B, out_dim, h, w), or tokens (B, N, in_dim) -> (B, N, out_dim).

    With `gaussian=True` the last layer has 2 * out_dim outputs, split along the channel dim
    into the posterior mean (first out_dim) and log-variance (last out_dim, clamped to
    [-30, 20]) of a diagonal Gaussian, as returned by `forward_stats`. `forward` then returns
    the mean in eval mode and a reparameterised sample `mean + exp(logvar / 2) * N(0, I)` in
    train mode (noise from the global RNG).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, gaussian: bool = False) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.gaussian = in_dim, out_dim, gaussian
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, 2 * out_dim if gaussian else out_dim),
        )

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return self.mlp(x)
        if x.ndim == 4:
            # a contiguous NCHW result: the permuted view would carry channels-last strides into
            # the decoder, where every convolution keeps them and GroupNorm runs ~10x slower on CPU
            return self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        raise ValueError(f"MLPBottleneck expects (B, D, h, w) or (B, N, D), got {tuple(x.shape)}")

    def forward_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, logvar)`, each shaped like the deterministic output; needs `gaussian=True`."""
        if not self.gaussian:
            raise RuntimeError("MLPBottleneck.forward_stats needs gaussian=True")
        mean, logvar = self._mlp(x).chunk(2, dim=1 if x.ndim == 4 else -1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gaussian:
            return self._mlp(x)
        mean, logvar = self.forward_stats(x)
        if not self.training:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


class ClassifierEncoder(nn.Module):
    """The feature map of a trained :class:`~dmvae_lightning.nets.classifier.ConvClassifier`
    as an encoder: the CPU-scale stand-in for a frozen foundation model. A config names the
    ClassifierModule checkpoint (``encoder: {name: classifier, weights_path: ...}``), which
    :func:`dmvae_lightning.checkpoints.build_encoder` reads into ``net``.

    Input (B, in_channels, H, W) in [-1, 1] -> (B, out_dim, H/f, W/f). ``frozen``:
    ``requires_grad_(False)`` (the paper's stage 1); set ``frozen: false`` to train it (the
    alignment stage trains the whole VAE).
    """

    def __init__(self, net: nn.Module, frozen: bool = True, in_channels: int = 1) -> None:
        super().__init__()
        if net.in_channels != in_channels:
            raise ValueError(
                f"model.init_args.encoder.weights_path: the classifier takes {net.in_channels} "
                f"channels but the images have {in_channels} (model.init_args.image_channels)"
            )
        self.net = net
        self.in_channels = in_channels
        self.out_dim: int = net.out_dim
        self.downsample_factor: int = net.downsample_factor
        self.frozen = frozen
        self.net.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> ClassifierEncoder:
        """Usual ``train``, except that a frozen network stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


_ENCODERS: dict[str, type[nn.Module]] = {
    "conv": ConvEncoder,
    "timm": TimmEncoder,
    "classifier": ClassifierEncoder,
}


def build_encoder(spec: Mapping[str, Any]) -> nn.Module:
    """Build an encoder from `{"name": "conv" | "timm" | "classifier", **constructor_kwargs}`
    ("classifier" takes a built ``net``; :func:`dmvae_lightning.checkpoints.build_encoder` reads
    a config's ``weights_path`` into it).

    Unknown names raise ValueError; unknown keys raise TypeError (for "timm", keys that are not
    TimmEncoder arguments go to `timm.create_model`, which rejects those it does not know).
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"model.init_args.encoder must be a mapping with a 'name' key "
            f"(one of {sorted(_ENCODERS)}), got {spec!r}"
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in _ENCODERS:
        raise ValueError(
            f"model.init_args.encoder.name={name!r} is unknown; valid names: {sorted(_ENCODERS)}"
        )
    cls = _ENCODERS[name]
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown and not takes_any:
        valid = sorted(set(params) - {"self"})
        raise TypeError(
            f"model.init_args.encoder: unknown key(s) {unknown} for name={name!r}; valid keys: {valid}"
        )
    return cls(**kwargs)
