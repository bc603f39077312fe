"""Pixel and perceptual reconstruction losses for image tokenizers.

Images everywhere in this module are float tensors of shape (B, C, H, W) with values in [-1, 1],
C in {1, 3}.

:class:`LPIPS` is the VGG16 variant of the learned perceptual metric of Zhang et al. (2018),
computed here from two local weight files (no download):

* ``vgg_weights_path``: a torchvision ``vgg16`` state dict (keys ``features.*``; a full state dict
  is fine, the classifier keys are ignored; a bare ``features`` state dict with keys ``0.weight``,
  ... is accepted too);
* ``lin_weights_path``: the five linear heads of the ``lpips`` package's ``vgg.pth`` (keys
  ``lin0.model.1.weight`` ... ``lin4.model.1.weight``, shapes (1, C_k, 1, 1)).

LPIPS is a fixed evaluation network: it never trains and contributes nothing to ``state_dict()``
(see :class:`LPIPS` for how), so tokenizer checkpoints stay small and load without it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LPIPS", "ReconstructionLoss"]

# Indices (in torchvision's vgg16().features) of the ReLUs whose outputs LPIPS compares:
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_TAPS = (3, 8, 15, 22, 29)
_VGG_CHANNELS = (64, 128, 256, 512, 512)
# ImageNet statistics expressed for inputs in [-1, 1] (the ``lpips`` package's ScalingLayer).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _load_weights(path: str, option: str) -> dict[str, Tensor]:
    """Read a state dict with ``weights_only=True``; a missing file names the config option."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights file not found: {path!r}. Set `{option}` (e.g. "
            f"`model.init_args.{option}` in the YAML config) to an existing local file."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{option}: {path!r} does not hold a state dict (got {type(state)}).")
    return state


def _vgg_features_state(state: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """The ``features`` part of a torchvision vgg16 state dict, with the prefix removed."""
    if any(k.startswith("features.") for k in state):
        return {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if "0.weight" in state:  # already a bare `features` state dict
        return dict(state)
    raise KeyError(
        f"lpips.vgg_weights_path: {path!r} has no `features.*` keys; expected a torchvision vgg16 "
        f"state dict (first keys found: {sorted(state)[:5]})."
    )


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance between two image batches.

    ``forward(x, y)`` takes images (B, C, H, W) in [-1, 1] with C = 1 (repeated to 3) or 3 and
    returns the per-sample distance (B,) in fp32, >= 0 and exactly 0 for identical inputs. Images down to
    16x16 work (relu5_3 is then 1x1; 32x32 gives 2x2).

    The network is frozen: its parameters have ``requires_grad=False`` and it always stays in eval
    mode (``train()`` is a no-op), yet the output is differentiable w.r.t. both inputs.

    Not in checkpoints: a ``state_dict`` post-hook removes this module's entries from any enclosing
    ``state_dict()``, and a ``load_state_dict`` pre-hook supplies the current tensors for keys that
    are absent, so ``owner.load_state_dict(owner.state_dict(), strict=True)`` works. The module is
    still an ordinary submodule, so ``.to(device)`` / ``.to(dtype)`` move it with its owner.

    Args:
        vgg_weights_path: torchvision vgg16 state dict file (config option
            ``lpips.vgg_weights_path``).
        lin_weights_path: ``lpips`` package ``vgg.pth`` linear heads (``lpips.lin_weights_path``).
    """

    def __init__(self, vgg_weights_path: str, lin_weights_path: str) -> None:
        super().__init__()
        from torchvision.models import vgg16

        vgg_state = _vgg_features_state(
            _load_weights(vgg_weights_path, "lpips.vgg_weights_path"), vgg_weights_path
        )
        lin_state = _load_weights(lin_weights_path, "lpips.lin_weights_path")

        # Build on the meta device: the unused 100M-parameter classifier is never allocated.
        with torch.device("meta"):
            features = vgg16(weights=None).features[: _VGG_TAPS[-1] + 1]
        self.features = features.to_empty(device="cpu")
        vgg_state = {k: v for k, v in vgg_state.items() if k in self.features.state_dict()}
        self.features.load_state_dict(vgg_state, strict=True)

        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _VGG_CHANNELS)
        for k, (lin, c) in enumerate(zip(self.lins, _VGG_CHANNELS, strict=True)):
            key = f"lin{k}.model.1.weight"
            if key not in lin_state:
                raise KeyError(
                    f"lpips.lin_weights_path: {lin_weights_path!r} lacks key {key!r} (expected the "
                    "`lpips` package's vgg.pth with keys lin0.model.1.weight .. lin4.model.1.weight)."
                )
            weight = lin_state[key]
            if tuple(weight.shape) != (1, c, 1, 1):
                raise ValueError(
                    f"lpips.lin_weights_path: {key} has shape {tuple(weight.shape)}, "
                    f"expected {(1, c, 1, 1)}."
                )
            with torch.no_grad():
                lin.weight.copy_(weight)

        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self.register_state_dict_post_hook(_drop_own_entries)
        self.register_load_state_dict_pre_hook(_supply_own_entries)

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (a fixed evaluation network)."""
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        """VGG activations at relu1_2 .. relu5_3 for scaled inputs."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample LPIPS distance (B,) between ``x`` and ``y`` (both (B, C, H, W) in [-1, 1])."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"LPIPS expects two (B, 1|3, H, W) tensors of equal shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        batch = x.shape[0]
        # One VGG pass for both images, in the net's dtype (autocast may still lower it).
        both = torch.cat([x, y], dim=0).to(self.lins[0].weight.dtype)
        if both.shape[1] == 1:
            both = both.expand(-1, 3, -1, -1)
        both = (both - self.shift.to(both.dtype)) / self.scale.to(both.dtype)
        total = x.new_zeros(batch, dtype=torch.float32)
        for feat, lin in zip(self._taps(both), self.lins, strict=True):
            feat = feat.float()
            feat = feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (feat[:batch] - feat[batch:]).square()
            total = total + F.conv2d(diff, lin.weight.float()).mean(dim=(1, 2, 3))
        return total


def _drop_own_entries(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: remove every entry of ``module`` (its children were saved already)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _supply_own_entries(
    module: nn.Module, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
) -> None:
    """load_state_dict pre-hook: fill in absent entries with the module's current tensors.

    ``state_dict`` is torch's private per-module copy, so the caller's dict is not modified. LPIPS
    has parameters only (its two buffers are non-persistent).
    """
    for name, param in module.named_parameters():
        state_dict.setdefault(prefix + name, param.detach())


class ReconstructionLoss(nn.Module):
    """Weighted sum of L1, L2 (MSE) and LPIPS between images and their reconstructions.

    ``forward(x, x_rec) -> (loss, components)``: ``x``, ``x_rec`` are (B, C, H, W) in [-1, 1];
    ``loss`` is a scalar ``l1_weight * l1 + l2_weight * l2 + lpips_weight * lpips`` where l1 and
    l2 are means over all elements and lpips the batch mean of :class:`LPIPS`. ``components`` holds
    detached scalars ``"l1"`` and ``"l2"`` (always, they are cheap to monitor) and ``"lpips"``
    (when ``lpips_weight > 0``).

    Args:
        l1_weight, l2_weight, lpips_weight: non-negative weights.
        lpips: keyword arguments of :class:`LPIPS` (``vgg_weights_path``, ``lin_weights_path``);
            required when ``lpips_weight > 0``. The LPIPS net is kept out of ``state_dict()``.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, w in (("l1_weight", l1_weight), ("l2_weight", l2_weight)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}.")
        if lpips_weight < 0:
            raise ValueError(f"lpips_weight must be >= 0, got {lpips_weight}.")
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)
        self.lpips_weight = float(lpips_weight)
        self.lpips_net: LPIPS | None = None
        if self.lpips_weight > 0:
            if lpips is None:
                raise ValueError(
                    "lpips_weight > 0 needs `lpips` (e.g. `lpips: {vgg_weights_path: ..., "
                    "lin_weights_path: ...}`) to build the LPIPS network."
                )
            self.lpips_net = LPIPS(**lpips)

    def forward(self, x: Tensor, x_rec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss and detached components; see the class docstring."""
        if x.shape != x_rec.shape:
            raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_rec {tuple(x_rec.shape)}.")
        diff = x_rec.float() - x.float()
        l1 = diff.abs().mean()
        l2 = diff.square().mean()
        loss = self.l1_weight * l1 + self.l2_weight * l2
        logs = {"l1": l1.detach(), "l2": l2.detach()}
        if self.lpips_net is not None:
            lp = self.lpips_net(x_rec, x).mean()
            loss = loss + self.lpips_weight * lp
            logs["lpips"] = lp.detach()
        return loss, logs
