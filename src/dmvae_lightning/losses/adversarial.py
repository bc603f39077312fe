"""Adversarial (GAN) losses for tokenizer training: hinge loss, adaptive weight, DiffAugment, bCR.

Conventions: images are (B, C, H, W) in [-1, 1]; a discriminator maps images to logits of any
shape (B, ...) (PatchGAN maps, or (B,) / (B, 1)), higher meaning "real". Every loss is a mean over
all logits, so patch and global discriminators are treated alike.

* :func:`hinge_d_loss`, :func:`generator_adv_loss`: the hinge GAN objectives.
* :func:`adaptive_weight`: the VQGAN balance between reconstruction and adversarial gradients at
  the decoder's last layer (Esser et al. 2021).
* :class:`DiffAugment`: differentiable augmentation (Zhao et al. 2020, "Differentiable
  Augmentation for Data-Efficient GAN Training"), vectorised over the batch and reproducible
  from a ``torch.Generator``.
* :func:`consistency_loss`: balanced consistency regularisation, bCR (Zhao et al. 2020,
  "Improved Consistency Regularization for GANs").
* :class:`AdversarialLoss`: the pieces bundled for a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dmvae_lightning.distributed import is_distributed

__all__ = [
    "AdversarialLoss",
    "DiffAugment",
    "adaptive_weight",
    "consistency_loss",
    "generator_adv_loss",
    "hinge_d_loss",
]

Discriminator = Callable[[Tensor], Tensor]


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss ``-mean(logits_fake)``."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
    sync: bool = True,
    g_loss_grad: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """VQGAN adaptive weight ``||d rec/d W|| / (||d g/d W|| + eps)`` clamped to [0, max_weight].

    ``W = last_layer`` is usually the weight of the decoder's output conv. Both gradients are
    taken with ``torch.autograd.grad(..., retain_graph=True)`` so the graph remains usable for the
    backward pass; nothing is accumulated into ``.grad``. Returns a detached fp32 scalar.

    ``g_loss_grad = (out, d g_loss / d out)``, with ``out`` a tensor on the path from ``W`` to
    ``g_loss`` (the decoder's output) and the gradient already computed: ``d g / d W`` is then
    the backward of ``out`` with that gradient, which does not go through the layers between
    ``out`` and ``g_loss`` (the discriminator) again.

    With ``sync`` and an initialised ``torch.distributed`` group of several ranks, both gradients
    are first averaged over the ranks (one all-reduce of 2 x ``W.numel()`` values; every rank must
    call this together). The weight is then the one of the global batch, the same on every rank
    and equal to single-process training on the concatenated batch; per-rank norms (the public
    code under DDP) give each rank its own weight.
    """
    if not (rec_loss.requires_grad and g_loss.requires_grad):
        raise RuntimeError(
            "adaptive_weight needs rec_loss and g_loss attached to the graph of last_layer "
            "(called under torch.no_grad(), or last_layer frozen?)."
        )
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    if g_loss_grad is None:
        (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    else:
        out, out_grad = g_loss_grad
        (g_grad,) = torch.autograd.grad(out, last_layer, out_grad, retain_graph=True)
    rec_grad, g_grad = rec_grad.float(), g_grad.float()
    if sync and is_distributed():
        both = torch.stack([rec_grad, g_grad])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        rec_grad, g_grad = both / dist.get_world_size()
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


_POLICIES = ("color", "translation", "cutout")


class DiffAugment(nn.Module):
    """Differentiable augmentation with independent random parameters for every sample.

    ``forward(x, generator=None)`` maps (B, C, H, W) to the same shape; gradients flow to ``x``.
    ``policy`` is a comma-separated list applied in the order given:

    * ``color``: brightness ``x + (u - 0.5)``, then saturation (scale deviations from the channel
      mean by ``2u``), then contrast (scale deviations from the image mean by ``u + 0.5``);
      u ~ U[0, 1) drawn per sample for each of the three.
    * ``translation``: integer shift per sample, each axis uniform in [-s, s] with
      ``s = int(size * translation_ratio + 0.5)``; vacated pixels are 0.
    * ``cutout``: zero a box of ``int(size * cutout_ratio + 0.5)`` pixels per side whose centre
      row is uniform in [0, H - (size_h % 2)] (columns likewise, as in the reference
      implementation); the part of the box outside the image is clipped, so at most
      ``size_h * size_w`` pixels are zeroed.

    ``policy=""`` is the identity. Random numbers are drawn on ``x.device`` from ``generator``
    (global RNG when None; a given generator must live on ``x.device``) in a fixed order, so the
    same generator state reproduces the same augmentation exactly.
    """

    def __init__(
        self,
        policy: str = "color,translation,cutout",
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.policy = tuple(p.strip() for p in policy.split(",") if p.strip())
        unknown = [p for p in self.policy if p not in _POLICIES]
        if unknown:
            raise ValueError(f"unknown DiffAugment policy {unknown}; choose from {_POLICIES}.")
        if not 0 <= translation_ratio < 1 or not 0 <= cutout_ratio <= 1:
            raise ValueError("translation_ratio must be in [0, 1) and cutout_ratio in [0, 1].")
        self.translation_ratio = float(translation_ratio)
        self.cutout_ratio = float(cutout_ratio)

    def extra_repr(self) -> str:
        return (
            f"policy={','.join(self.policy)!r}, translation_ratio={self.translation_ratio}, "
            f"cutout_ratio={self.cutout_ratio}"
        )

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``x`` (B, C, H, W); see the class docstring."""
        for name in self.policy:
            x = getattr(self, f"_{name}")(x, generator)
        return x

    @staticmethod
    def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator)

    def _color(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        x = x + (self._uniform(x, generator) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2.0 * self._uniform(x, generator)) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (self._uniform(x, generator) + 0.5) + mean

    def _translation(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, _, h, w = x.shape
        sh, sw = int(h * self.translation_ratio + 0.5), int(w * self.translation_ratio + 0.5)
        if sh == 0 and sw == 0:
            return x
        dev = x.device
        dy = torch.randint(-sh, sh + 1, (b, 1), device=dev, generator=generator)
        dx = torch.randint(-sw, sw + 1, (b, 1), device=dev, generator=generator)
        # Output pixel (i, j) reads input (i - dy, j - dx); the zero border serves out-of-range.
        padded = F.pad(x, (sw, sw, sh, sh))
        rows = torch.arange(h, device=dev).unsqueeze(0) - dy + sh  # (B, H)
        cols = torch.arange(w, device=dev).unsqueeze(0) - dx + sw  # (B, W)
        batch = torch.arange(b, device=dev).view(b, 1, 1)
        out = padded[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)

    def _cutout(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, _, h, w = x.shape
        ch, cw = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
        if ch == 0 or cw == 0:
            return x
        dev = x.device
        cy = torch.randint(0, h + (1 - ch % 2), (b, 1), device=dev, generator=generator)
        cx = torch.randint(0, w + (1 - cw % 2), (b, 1), device=dev, generator=generator)
        top, left = cy - ch // 2, cx - cw // 2
        rows = torch.arange(h, device=dev).unsqueeze(0)  # (1, H)
        cols = torch.arange(w, device=dev).unsqueeze(0)
        in_rows = (rows >= top) & (rows < top + ch)  # (B, H)
        in_cols = (cols >= left) & (cols < left + cw)  # (B, W)
        keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))  # (B, H, W)
        return x * keep.unsqueeze(1).to(x.dtype)


def consistency_loss(disc: Discriminator, x: Tensor, augment: Callable[[Tensor], Tensor]) -> Tensor:
    """bCR term ``mse(disc(x), disc(augment(x)))`` (gradient flows through both branches)."""
    return F.mse_loss(disc(augment(x)).float(), disc(x).float())


class AdversarialLoss(nn.Module):
    """Hinge GAN losses with DiffAugment, adaptive weighting and optional bCR.

    The discriminator itself lives in the owner (so it gets its own optimiser); this module only
    holds the loss configuration and the augmentation, and has no parameters or state. During
    the generator step the owner keeps the discriminator's parameters out of the update (e.g.
    Lightning's ``toggled_optimizer``); gradients still flow through it to ``x_rec``.

    * ``active(step)``: whether the adversarial terms are on (``step >= start_step``).
    * ``generator_loss(disc, x_rec, rec_loss, last_layer)``:
      ``disc_weight * w * (-mean D(aug(x_rec)))`` with ``w = adaptive_weight(rec_loss, g_adv,
      last_layer)`` when ``adaptive`` (else 1; under ``torch.distributed`` the weight is that of
      the global batch unless ``sync_adaptive_weight=False``). When gradients are disabled (validation) the
      adaptive weight cannot be computed and is reported as 0, so the adversarial term drops out
      of no-grad totals while ``g_adv`` still logs its raw value.
    * ``discriminator_loss(disc, x, x_rec)``: ``hinge(D(aug(x)), D(aug(sg(x_rec))))``
      ``+ consistency_weight * (bCR(x) + bCR(sg(x_rec)))``, where bCR compares D on the raw
      image with the logits of the augmented one already computed for the hinge term (one extra
      discriminator pass per image set). With ``diffaug_policy=""`` bCR is identically 0.

    Both methods return ``(loss, logs)`` with detached scalar logs and accept an optional
    ``generator`` for the augmentation's random numbers (see :class:`DiffAugment`). Real and fake
    images go through the discriminator in separate calls, so batch-norm discriminators never mix
    their statistics.
    """

    def __init__(
        self,
        disc_weight: float = 0.5,
        start_step: int = 0,
        diffaug_policy: str = "color,translation,cutout",
        consistency_weight: float = 0.0,
        adaptive: bool = True,
        max_adaptive_weight: float = 1e4,
        sync_adaptive_weight: bool = True,
    ) -> None:
        super().__init__()
        if disc_weight < 0 or consistency_weight < 0:
            raise ValueError("disc_weight and consistency_weight must be >= 0.")
        self.disc_weight = float(disc_weight)
        self.start_step = int(start_step)
        self.consistency_weight = float(consistency_weight)
        self.adaptive = bool(adaptive)
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.sync_adaptive_weight = bool(sync_adaptive_weight)
        self.augment = DiffAugment(diffaug_policy)

    def active(self, step: int) -> bool:
        """True once ``step >= start_step`` (count VAE steps with the owner's own counter)."""
        return step >= self.start_step

    def generator_loss(
        self,
        disc: Discriminator,
        x_rec: Tensor,
        rec_loss: Tensor,
        last_layer: Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted adversarial term for the autoencoder; logs ``g_adv``, ``adaptive_weight``.

        With the adaptive weight, a discriminator whose parameters take no gradient (the
        generator step) and ``x_rec`` on the graph, the discriminator is back-propagated once:
        ``G = d g_adv / d x_rec`` is taken first, the weight's ``d g_adv / d W`` continues from it
        (:func:`adaptive_weight`'s ``g_loss_grad``), and the returned loss carries the value of
        ``g_adv`` with the gradient ``G`` at ``x_rec`` (``g_adv + <x_rec, G> - <x_rec, G>``,
        the last product detached), so the training backward reaches the decoder without a
        second pass through the discriminator. Same values; gradients equal up to rounding.
        """
        g_adv = generator_adv_loss(disc(self.augment(x_rec, generator)).float())
        g_term = g_adv
        if not self.adaptive or last_layer is None:
            weight = g_adv.new_ones(())
        elif torch.is_grad_enabled() and g_adv.requires_grad and rec_loss.requires_grad:
            at = None
            params = disc.parameters() if isinstance(disc, nn.Module) else ()
            if x_rec.requires_grad and not any(p.requires_grad for p in params):
                (x_grad,) = torch.autograd.grad(g_adv, x_rec)  # the discriminator's only backward
                at = (x_rec, x_grad)
                link = (x_rec * x_grad).sum(dtype=torch.float32)
                g_term = g_adv.detach() + (link - link.detach())
            weight = adaptive_weight(
                rec_loss,
                g_adv,
                last_layer,
                max_weight=self.max_adaptive_weight,
                sync=self.sync_adaptive_weight,
                g_loss_grad=at,
            )
        else:
            weight = g_adv.new_zeros(())
        loss = self.disc_weight * weight * g_term
        return loss, {"g_adv": g_adv.detach(), "adaptive_weight": weight.detach()}

    def discriminator_loss(
        self,
        disc: Discriminator,
        x: Tensor,
        x_rec: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge + bCR loss for the discriminator; ``x_rec`` is detached here."""
        x_rec = x_rec.detach()
        logits_real = disc(self.augment(x, generator)).float()
        logits_fake = disc(self.augment(x_rec, generator)).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        loss = d_loss
        if self.consistency_weight > 0:
            bcr = F.mse_loss(logits_real, disc(x).float()) + F.mse_loss(
                logits_fake, disc(x_rec).float()
            )
            loss = loss + self.consistency_weight * bcr
            logs["bcr"] = bcr.detach()
        return loss, logs
