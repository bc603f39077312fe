"""Matching losses between encoder latents and a reference distribution, as torchmetrics metrics.

Every loss is a :class:`torchmetrics.Metric` (``is_differentiable=True``,
``higher_is_better=False``, ``full_state_update=False``):

* calling it (``loss(...)``, i.e. ``forward``) returns the **differentiable batch loss**, a scalar
  fp32 tensor, and adds its detached value to the running state;
* ``update(...)`` / ``compute()`` accumulate a **validation value**: the weighted mean of the
  batch values seen since the last ``reset()`` (states ``total`` and ``weight``, fp64 sums,
  ``dist_reduce_fx="sum"``, so ``compute()`` is synced across ranks and must run on every rank).
  Distribution-level losses weigh each batch by 1 (mean of per-batch estimates); per-sample
  losses (Gaussian KL, pointwise alignment) weigh it by its batch size.

Losses:

* :class:`DMDLoss` - distribution-matching distillation (the DMVAE objective, PAPER.md section 2)
  with a frozen real-score and a trained fake-score flow-matching model, and the toy objectives
  the paper compares it with;
* :class:`MMDLoss` - maximum mean discrepancy (RBF / inverse multiquadric / KID polynomial
  kernels; unbiased U-statistic or linear-time estimator);
* :class:`SlicedWassersteinLoss` - ``SW_p^p`` over random 1-D projections;
* :class:`GaussianKLLoss` - the classic per-sample VAE KL to N(0, I);
* :class:`PointwiseAlignmentLoss` - VA-VAE-style marginal cosine and distance-matrix losses
  against frozen foundation-model features.

Distributed training: :class:`MMDLoss` and :class:`SlicedWassersteinLoss` estimate a distance
between *sets* of samples, so per-rank estimates would be noisier and biased differently from
the single-process loss on the global batch. They gather both sets across ranks
(:func:`gather_samples`: an ``all_gather`` of detached tensors whose local slice is then replaced
by the live tensor), so every rank computes the global-batch value and back-propagates into its
own samples only. By default the local gradient is multiplied by the world size W: DDP averages
parameter gradients over ranks, and ``(1 / W) * sum_r W * dL/dx_r * dx_r/dtheta = dL/dtheta``,
the gradient single-process training on the concatenated batch would get. Every rank must call
these losses the same number of times (they issue collectives), also in validation.

Time convention (as :mod:`dmvae_lightning.flow`): t = 1 is data, t = 0 is noise,
``z_t = t z + (1 - t) eps``, velocity target ``z - eps``, data prediction
``x_hat = z_t + (1 - t) v``, score ``(t v - z_t) / (1 - t)``. t, noise and path arithmetic are
fp32 under any autocast; only the score-network calls run under the caller's autocast. The
sample-set losses (MMD, SWD, KL, alignment) compute in fp32 with autocast disabled.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

import dmvae_lightning.flow as flow
from dmvae_lightning.checkpoints import CheckpointError, ScoreModel, file_sha256, load_score_model
from dmvae_lightning.distributed import is_distributed
from dmvae_lightning.utils.compile import compile_module

__all__ = [
    "DMDLoss",
    "GaussianKLLoss",
    "MMDLoss",
    "PointwiseAlignmentLoss",
    "SlicedWassersteinLoss",
    "gather_samples",
]

Objective = Literal["dmd", "loss_difference", "real_only", "fake_only", "score_l2"]
OBJECTIVES: tuple[str, ...] = ("dmd", "loss_difference", "real_only", "fake_only", "score_l2")
Kernel = Literal["rbf", "imq", "poly"]
Estimator = Literal["unbiased", "linear"]
BandwidthUnit = Literal["sqrt_dim", "absolute"]

# 1 - t is clamped below at this value when "score_l2" turns velocities into scores (t -> 1).
SCORE_MIN_SIGMA = 1e-3


# ---------------------------------------------------------------------------------- helpers
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gather_samples(x: Tensor, scale_grad: bool = True, group: Any = None) -> Tensor:
    """Concatenate the (B_r, ...) samples of every rank, in rank order, keeping the local graph.

    The other ranks' samples arrive through ``all_gather`` of detached tensors (ranks may hold
    different B_r: batches are padded to the largest and trimmed); the local slice is the live
    ``x``, so gradients reach this rank's samples only. ``scale_grad`` multiplies the gradient of
    the local slice by the world size (see the module docstring: with DDP's gradient averaging
    this gives the single-process gradient). Returns ``x`` unchanged when not distributed.
    """
    if not is_distributed(group):
        return x
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    largest = max(counts)
    sent = x.detach().contiguous()
    if sent.shape[0] < largest:
        sent = torch.cat([sent, sent.new_zeros((largest - sent.shape[0], *sent.shape[1:]))])
    parts = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(parts, sent, group=group)
    parts = [part[:count] for part, count in zip(parts, counts, strict=True)]
    parts[rank] = _ScaleGrad.apply(x, float(world)) if scale_grad else x
    return torch.cat(parts)


def _shared_seed(device: torch.device, sync: bool, group: Any = None) -> int:
    """A seed drawn from the global torch RNG; with ``sync`` rank 0's draw is broadcast."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if sync and is_distributed(group):
        seed = seed.to(device)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(seed, src=src, group=group)
    return int(seed.item())


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Autocast off for the block (inputs are cast to fp32 by the callers)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


@contextlib.contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Build graphs through ``module`` without edges to its parameters (grads still reach the
    inputs); the trainable flags are restored on exit."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _flat(x: Tensor) -> Tensor:
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"expected samples shaped (B, ...) with B > 0, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).float()


def _sample_mean(x: Tensor) -> Tensor:
    """Mean over all non-batch dims, kept for broadcasting: (B, ...) -> (B, 1, ..., 1)."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


# ---------------------------------------------------------------------------------- base class
class _MatchingMetric(Metric):
    """Shared state: ``total`` (sum of weight * batch value) and ``weight``, fp64, summed over
    ranks; ``compute()`` returns ``total / weight`` as fp32. Subclasses implement ``loss(...)``
    and call :meth:`_accumulate` from ``update``."""

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, value: Tensor, weight: float = 1.0) -> None:
        # Inside forward() this keeps the graph for the returned batch value; torchmetrics then
        # folds the batch state into the running state under no_grad (stored detached).
        self.total = self.total + value.double() * weight
        self.weight = self.weight + weight

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        value = super().forward(*args, **kwargs)
        self._forward_cache = value.detach()  # do not hold the graph between steps
        return value


# ---------------------------------------------------------------------------------- DMD
def _from_diffusion_module(module: nn.Module) -> ScoreModel:
    """The DiT (deep-copied, EMA weights in) and latent statistics of a module holding ``dit``,
    ``ema``, ``latent_mean`` and ``latent_scale`` (a LatentDiffusionModule)."""
    net = copy.deepcopy(module.dit)
    if getattr(module, "ema", None) is not None:
        module.ema.copy_to(net)
    return ScoreModel(net, float(module.latent_mean), float(module.latent_scale))


SHA256_KEY = "real_sha256"  # state-dict entry: the real model file's sha256 as 32 uint8


def _drop_real_weights(module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
    """State-dict post-hook of :class:`DMDLoss`: the frozen real model's tensors are left out;
    the sha256 of its file takes their place (32 uint8, zeros for a model given in Python)."""
    for key in [k for k in state if k.startswith(prefix + "real.")]:
        del state[key]
    state[prefix + SHA256_KEY] = _digest_tensor(module.real_sha256(), module.latent_mean.device)


def _keep_real_weights(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`DMDLoss`: refuse a checkpoint trained with another
    real-model file (sha256), then let the real model keep the weights it was read with (its own
    tensors stand in for the keys the checkpoint does not hold; a checkpoint from before storage
    by reference still holds them, and they load as before)."""
    saved = state.pop(prefix + SHA256_KEY, None)
    if saved is not None:
        module.check_reference(bytes(saved.cpu().tolist()).hex())
    for name, tensor in module.real.state_dict().items():
        state.setdefault(f"{prefix}real.{name}", tensor)


def _digest_tensor(hexdigest: str | None, device: torch.device) -> Tensor:
    raw = bytes.fromhex(hexdigest) if hexdigest else bytes(32)
    return torch.tensor(list(raw), dtype=torch.uint8, device=device)


class DMDLoss(_MatchingMetric):
    """Distribution-matching distillation loss on latents, with a frozen real and a trained fake
    flow-matching velocity model.

    Models: ``real`` is ``real_model`` frozen (``requires_grad_(False)``, always in eval mode);
    ``fake`` is a deep copy of it whose floating-point parameters are trainable (optimise
    :meth:`fake_parameters` with the owning module's fake optimizer, on :meth:`fake_loss`). Both
    stay in eval mode under ``.train()`` (no random label dropout inside the networks; the fake's
    label dropout is done by :meth:`fake_loss`). Both are submodules, so they move with ``.to()``
    and the fake's weights are in checkpoints. The real model is stored **by reference**: a
    checkpoint holds its file's sha256 (state entry ``real_sha256``; the owning module also
    writes path and latent statistics, :meth:`reference`), never its weights; loading such state
    into a DMDLoss built from the path (resume, ``load_from_checkpoint``) checks the sha256 and
    refuses another file.
    Every model is called ``model(x, t, y) -> v``: ``x`` (N, C, H, W) fp32, ``t`` (N,) fp32, ``y`` (N,) int64 labels (or None when there is no
    null class and no labels), ``v`` shaped like ``x``.

    Latent space: every method takes ``z`` (B, C, H, W) in the score models' (normalised) space.
    For a real model from a LatentDiffusionModule, map raw encoder latents with :meth:`normalize` (``(z - latent_mean) * latent_scale``, buffers
    copied from that module; 0 / 1 otherwise) first.

    Per call: ``t ~ U[t_min, t_max(step)]`` (fp32, also under autocast), ``eps ~ N(0, I)`` fp32,
    ``z_t = t z + (1 - t) eps``; each model's velocity with classifier-free guidance
    ``v = v_c + (w - 1) (v_c - v_null)`` (w = ``cfg_scale``; cond and null labels batched into ONE
    forward per model, so 2 forwards in all; a single conditional forward when w = 1 or
    ``labels`` is None); ``x_hat = z_t + (1 - t) v``. Objectives (``objective``), per batch:

    * ``"dmd"`` (DMD/DMD2, the paper's method):
      ``g = nan_to_num((x_hat_fake - x_hat_real) / mean_{C,H,W} |z - x_hat_real|)`` computed
      without gradient (no gradient through either network), loss
      ``0.5 * mse(z, stopgrad(z - g))``. Its value is ``0.5 * mean(g^2)``; its gradient w.r.t.
      ``z`` is ``g / z.numel()`` (numel = B*C*H*W; exact up to the fp32 rounding of
      ``z - (z - g)``), so descending it moves every latent along ``x_hat_real - x_hat_fake``,
      i.e. along ``s_real - s_fake``, since
      ``s_fake(z_t) - s_real(z_t) = t (x_hat_fake - x_hat_real) / (1 - t)^2``. Through
      :meth:`normalize` the gradient w.r.t. raw latents is ``latent_scale * g / numel``.
    * ``"loss_difference"``: ``mean ||v_r(z_t) - (z - eps)||^2 - mean ||v_f(z_t) - (z - eps)||^2``
      (means over all elements) with gradients through ``z_t`` (the networks' Jacobians) and the
      target ``z - eps``; neither network's parameters get gradients.
    * ``"real_only"`` (maximise log p_real, the "flow prior"): the ``"dmd"`` surrogate with
      ``x_hat_fake`` replaced by ``z``: ``g = nan_to_num((z - x_hat_real) / mean |z - x_hat_real|)``,
      moving z along the real x0-prediction (score) direction; no gradient through the network.
    * ``"fake_only"`` (end-to-end fake-score maximisation, collapses): the fake model's
      flow-matching loss ``mean ||v_f(z_t) - (z - eps)||^2`` back-propagated into z through the
      fake network and the target (not into its parameters); descending it maximises the fake
      model's likelihood of its own samples and shrinks their spread.
    * ``"score_l2"``: ``mean ||s_f(z_t) - s_r(z_t)||^2`` with ``s = (t v - z_t) / max(1 - t, 1e-3)``
      and gradients through both networks into z (not into their parameters).

    Annealing: ``t_max(step) = t_max + (anneal_t_max - t_max) * min(1, step / anneal_steps)``
    (likewise ``t_min`` with ``anneal_t_min``; in this convention the low-noise end is t -> 1).
    ``step`` is the argument of the call, else the ``num_steps`` buffer, the number of
    ``forward`` calls so far (checkpointed). Pass your own VAE-step counter as ``step`` when the
    loss is not called exactly once per step.

    Randomness (t, eps, label dropout) comes from the global torch RNG (seed it per step, e.g.
    with :func:`~dmvae_lightning.utils.rng.step_rng`). The validation value (``update`` /
    ``compute``) is the objective's value (for ``"dmd"``: ``0.5 * mean(g^2)``), averaged over
    batches. ``last_info`` holds detached ``t`` (B,), ``t_min`` and ``t_max`` of the latest call.

    Args:
        real_model: velocity model ``(x, t, y) -> v`` (frozen in place), a
            :class:`~dmvae_lightning.checkpoints.ScoreModel`, a module with ``dit``, ``ema``
            and latent statistics such as a LatentDiffusionModule (its DiT, deep-copied, with
            the EMA weights), or the path of a LatentDiffusionModule checkpoint (read by
            :func:`~dmvae_lightning.checkpoints.load_score_model`: EMA weights, no tokenizer).
        cfg_scale: guidance scale w for both models (paper: 5; 1 = no guidance).
        t_min, t_max: noise-level range at step 0, ``0 <= t_min < t_max <= 1``.
        anneal_steps: steps over which the range moves linearly to its annealed end (0: never).
        anneal_t_max, anneal_t_min: the annealed end points (None: unchanged).
        objective: one of ``"dmd"``, ``"loss_difference"``, ``"real_only"``, ``"fake_only"``,
            ``"score_l2"`` (see above).
        null_class: label of the unconditional class; default ``real_model.null_class`` or
            ``real_model.num_classes``. Needed for ``cfg_scale != 1`` and label dropout.
        fake_label_dropout: probability that :meth:`fake_loss` replaces a label by the null class.
        compile: compile both score models (real and fake) with ``torch.compile``: ``true``, or
            a mapping of its options (:mod:`dmvae_lightning.utils.compile`), e.g.
            ``{dynamic: false}`` (one graph for the 2B-row CFG batch, one for the B-row fake
            step). In place and lazy (at the first call), so the state-dict keys are those of
            the eager models.
        latent_mean, latent_scale: statistics of the real model's latent space (see
            :meth:`normalize`); None: those of the checkpoint or LatentDiffusionModule, else
            0 / 1. Give them with a plain velocity network of your own.
        **kwargs: :class:`torchmetrics.Metric` options (``sync_on_compute``, ...).
    """

    def __init__(
        self,
        real_model: nn.Module | str,
        cfg_scale: float = 1.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        anneal_steps: int = 0,
        anneal_t_max: float | None = None,
        objective: Objective = "dmd",
        null_class: int | None = None,
        fake_label_dropout: float = 0.1,
        anneal_t_min: float | None = None,
        compile: bool | dict[str, Any] = False,
        latent_mean: float | None = None,
        latent_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"DMDLoss.objective must be one of {OBJECTIVES}, got {objective!r}")
        if anneal_steps < 0:
            raise ValueError(f"DMDLoss.anneal_steps must be >= 0, got {anneal_steps}")
        if not 0.0 <= fake_label_dropout <= 1.0:
            raise ValueError(
                f"DMDLoss.fake_label_dropout must be in [0, 1], got {fake_label_dropout}"
            )
        end_min = t_min if anneal_t_min is None else anneal_t_min
        end_max = t_max if anneal_t_max is None else anneal_t_max
        for name, lo, hi in (("t_min, t_max", t_min, t_max), ("annealed range", end_min, end_max)):
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(
                    f"DMDLoss: {name} must satisfy 0 <= min < max <= 1, got {lo}, {hi}"
                )
        self.cfg_scale = float(cfg_scale)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.anneal_steps = int(anneal_steps)
        self.anneal_t_min, self.anneal_t_max = float(end_min), float(end_max)
        self.objective: str = objective
        self.fake_label_dropout = float(fake_label_dropout)

        real = self.build_real(real_model)
        net = real.net
        mean = real.latent_mean if latent_mean is None else float(latent_mean)
        scale = real.latent_scale if latent_scale is None else float(latent_scale)
        self.null_class = self._resolve_null_class(net, null_class)
        if self.cfg_scale != 1.0 and self.null_class is None:
            raise ValueError(
                "DMDLoss: cfg_scale != 1 needs a null class; set DMDLoss.null_class (the real "
                "model has no `null_class` or `num_classes` attribute)"
            )
        self.real = net.requires_grad_(False).eval()
        self.fake = copy.deepcopy(self.real)
        for param in self.fake.parameters():
            if param.is_floating_point():
                param.requires_grad_(True)
        for net in (self.real, self.fake):  # after the copy: a copy of a compiled net is eager
            compile_module(net, compile, "DMDLoss.compile")
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.last_info: dict[str, Tensor] = {}
        # The frozen real model is stored by reference, not by value (see the class docstring).
        self._real_path, self._real_sha256 = real.path, real.sha256
        self.register_state_dict_post_hook(_drop_real_weights)
        self.register_load_state_dict_pre_hook(_keep_real_weights)

    # ------------------------------------------------------------------ construction hooks
    def build_real(self, spec: nn.Module | str | os.PathLike) -> ScoreModel:
        """The frozen real velocity network and its latent statistics from the ``real_model``
        argument (a path is read by :func:`dmvae_lightning.checkpoints.load_score_model`)."""
        if isinstance(spec, (str, os.PathLike)):
            model = load_score_model(spec, option="DMDLoss.real_model", sha256=False)
            if not model.stats_ready:
                warnings.warn(
                    f"DMDLoss.real_model: {str(spec)!r} holds no measured latent statistics; "
                    "normalize() uses latent_mean=0, latent_scale=1",
                    stacklevel=3,
                )
            return model
        if isinstance(spec, ScoreModel):
            return spec
        if not isinstance(spec, nn.Module):
            raise TypeError(
                "DMDLoss.real_model must be an nn.Module or the path of a LatentDiffusionModule "
                f"checkpoint, got {type(spec).__name__}"
            )
        if isinstance(getattr(spec, "dit", None), nn.Module) and hasattr(spec, "latent_scale"):
            return _from_diffusion_module(spec)  # a LatentDiffusionModule
        return ScoreModel(spec)

    # ------------------------------------------------------------------ checkpoint by reference
    def real_sha256(self) -> str | None:
        """sha256 of the real model's checkpoint file (None when it was given as a module)."""
        if self._real_sha256 is None and self._real_path is not None:
            self._real_sha256 = file_sha256(self._real_path)
        return self._real_sha256

    def reference(self) -> dict[str, Any]:
        """What identifies the frozen real model: ``path`` and ``sha256`` of its checkpoint
        file (None for a module given in Python) and the latent statistics. Owning modules
        write it into their checkpoints (DMVAEModule: ``checkpoint["dmd_real_model"]``); the
        state dict carries the sha256 (``real_sha256``), never the weights."""
        return {
            "path": self._real_path,
            "sha256": self.real_sha256(),
            "latent_mean": float(self.latent_mean),
            "latent_scale": float(self.latent_scale),
        }

    def check_reference(self, sha256: str | None, recorded_path: str | None = None) -> None:
        """Raise :class:`~dmvae_lightning.checkpoints.CheckpointError` when state trained with
        the real-model file of hex digest ``sha256`` is loaded into this loss, whose real model
        was read from a file with other bytes (no check when either side has no digest: a
        model given in Python, or state written before storage by reference)."""
        if not sha256 or sha256 == "0" * 64 or self._real_path is None:
            return
        current = self.real_sha256()
        if current != sha256:
            where = f" of {recorded_path!r}" if recorded_path else ""
            raise CheckpointError(
                "DMDLoss.real_model",
                self._real_path,
                f"is not the reference model this checkpoint was trained with (sha256 "
                f"{current[:12]}..., expected {sha256[:12]}...{where}).",
            )

    @staticmethod
    def _resolve_null_class(net: nn.Module, null_class: int | None) -> int | None:
        if null_class is not None:
            return int(null_class)
        for name in ("null_class", "num_classes"):
            value = getattr(net, name, None)
            if isinstance(value, int):
                return value
        return None

    def train(self, mode: bool = True) -> DMDLoss:
        """Usual ``train``, except that both score models stay in eval mode."""
        super().train(mode)
        self.real.eval()
        self.fake.eval()
        return self

    def fake_parameters(self) -> Iterator[nn.Parameter]:
        """The fake model's parameters (what the fake optimizer trains)."""
        return self.fake.parameters()

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents -> score-model space ``(z - latent_mean) * latent_scale`` (fp32)."""
        return (z.float() - self.latent_mean) * self.latent_scale

    # ------------------------------------------------------------------ pieces
    def t_range(self, step: int | None = None) -> tuple[float, float]:
        """``(t_min, t_max)`` at ``step`` (default: the ``num_steps`` buffer)."""
        if self.anneal_steps <= 0:
            return self.t_min, self.t_max
        s = int(self.num_steps) if step is None else int(step)
        frac = min(1.0, max(0, s) / self.anneal_steps)
        lo = self.t_min + (self.anneal_t_min - self.t_min) * frac
        hi = self.t_max + (self.anneal_t_max - self.t_max) * frac
        return lo, hi

    def _labels(self, labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        if labels is None:
            if self.null_class is None:
                return None
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        return labels.to(device=device, dtype=torch.long)

    def guided_velocity(
        self, model: nn.Module, x_t: Tensor, t: Tensor, labels: Tensor | None
    ) -> Tensor:
        """fp32 velocity (N, C, H, W) of ``model`` at ``(x_t, t)`` with CFG ``cfg_scale``:
        ``v_c + (w - 1)(v_c - v_null)`` from one batched forward of size 2N (``labels`` (N,)
        int64); a single forward when ``cfg_scale == 1`` or ``labels`` is None."""
        n = x_t.shape[0]
        if labels is None or self.cfg_scale == 1.0:
            return model(x_t, t, self._labels(labels, n, x_t.device)).float()
        labels = self._labels(labels, n, x_t.device)
        return flow.cfg_velocity(model, x_t, t, labels, self.cfg_scale, self.null_class)

    def _draw(
        self, z: Tensor, step: int | None, t: Tensor | float | None, eps: Tensor | None
    ) -> tuple[Tensor, Tensor, float, float]:
        n = z.shape[0]
        lo, hi = self.t_range(step)
        if t is None:
            t = flow.sample_t(n, z.device, t_min=lo, t_max=hi)
        t = torch.as_tensor(t, device=z.device).float()
        t = t.expand(n) if t.ndim == 0 else t
        if t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(t.shape)}")
        if eps is None:
            eps = torch.randn(z.shape, device=z.device, dtype=torch.float32)
        elif eps.shape != z.shape:
            raise ValueError(f"eps {tuple(eps.shape)} must have the shape of z {tuple(z.shape)}")
        return t, eps.float(), lo, hi

    @staticmethod
    def _surrogate(z: Tensor, grad: Tensor) -> Tensor:
        """``0.5 * mse(z, stopgrad(z - grad))``: value ``0.5 mean(grad^2)``, d/dz = grad / numel."""
        return 0.5 * F.mse_loss(z, (z - grad).detach())

    @staticmethod
    def _normalised(diff: Tensor, residual: Tensor) -> Tensor:
        """``nan_to_num(diff / mean_{C,H,W} |residual|)`` per sample."""
        return torch.nan_to_num(diff / _sample_mean(residual.abs()))

    # ------------------------------------------------------------------ the losses
    def loss(
        self,
        z: Tensor,
        labels: Tensor | None = None,
        step: int | None = None,
        t: Tensor | float | None = None,
        eps: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on latents ``z`` (B, C, H, W) (score-model space) with ``labels`` (B,).

        ``t`` (scalar or (B,)) and ``eps`` (shaped like z) override the random draws. Returns
        ``(scalar fp32 loss, detached info {"t", "t_min", "t_max"})``. Touches no metric state.
        """
        if z.ndim < 2:
            raise ValueError(f"DMDLoss expects latents (B, C, ...), got {tuple(z.shape)}")
        t, eps, lo, hi = self._draw(z, step, t, eps)
        labels = None if labels is None else self._labels(labels, z.shape[0], z.device)
        z32 = z.float()
        objective = self.objective
        if objective in ("dmd", "real_only"):
            with torch.no_grad():
                z_t = flow.interpolate(z32.detach(), eps, t)
                x_real = flow.velocity_to_x1(
                    z_t, t, self.guided_velocity(self.real, z_t, t, labels)
                )
                residual = z32.detach() - x_real
                if objective == "dmd":
                    x_fake = flow.velocity_to_x1(
                        z_t, t, self.guided_velocity(self.fake, z_t, t, labels)
                    )
                    grad = self._normalised(x_fake - x_real, residual)
                else:
                    grad = self._normalised(residual, residual)
            value = self._surrogate(z32, grad)
        else:
            z_t = flow.interpolate(z32, eps, t)
            target = z32 - eps
            with _no_param_grads(self.fake):
                v_fake = self.guided_velocity(self.fake, z_t, t, labels)
            if objective == "fake_only":
                value = (v_fake - target).square().mean()
            else:
                v_real = self.guided_velocity(self.real, z_t, t, labels)
                if objective == "loss_difference":
                    value = (v_real - target).square().mean() - (v_fake - target).square().mean()
                else:  # score_l2
                    s_fake = flow.velocity_to_score(z_t, t, v_fake, min_sigma=SCORE_MIN_SIGMA)
                    s_real = flow.velocity_to_score(z_t, t, v_real, min_sigma=SCORE_MIN_SIGMA)
                    value = (s_fake - s_real).square().mean()
        info = {
            "t": t.detach(),
            "t_min": torch.tensor(lo, device=z.device),
            "t_max": torch.tensor(hi, device=z.device),
        }
        return value, info

    def update(self, z: Tensor, labels: Tensor | None = None, step: int | None = None) -> None:
        """Add the objective's value on this batch (see :meth:`loss`) to the running state."""
        value, self.last_info = self.loss(z, labels, step)
        self._accumulate(value)

    def forward(self, z: Tensor, labels: Tensor | None = None, step: int | None = None) -> Tensor:
        """Differentiable batch loss (scalar fp32); accumulates its value; ``num_steps += 1``."""
        value = super().forward(z, labels, step)
        self.num_steps += 1
        return value

    def fake_loss(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Flow-matching loss of the fake model on ``stopgrad(z)`` (B, C, H, W), score-model space.

        ``t ~ U[0, 1]``, ``eps ~ N(0, I)`` (fp32), loss ``mean((v_f(z_t, t, y) - (z - eps))^2)``
        with each label replaced by the null class with probability ``fake_label_dropout`` (this
        trains the null class that CFG needs). Scalar fp32; gradients reach the fake's parameters
        only. Not part of the metric state.
        """
        x1 = z.detach().float()
        n = x1.shape[0]
        if labels is not None:
            labels = self._labels(labels, n, x1.device)
            if self.fake_label_dropout > 0:
                if self.null_class is None:
                    raise ValueError(
                        "DMDLoss.fake_label_dropout > 0 with labels needs a null class; set "
                        "DMDLoss.null_class or fake_label_dropout=0"
                    )
                drop = torch.rand(n, device=x1.device) < self.fake_label_dropout
                labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        else:
            labels = self._labels(None, n, x1.device)
        value, _ = flow.velocity_loss(self.fake, x1, labels)
        return value


# ---------------------------------------------------------------------------------- MMD
class MMDLoss(_MatchingMetric):
    """Squared maximum mean discrepancy ``MMD^2(P_x, P_y)`` between two sets of samples.

    Inputs ``x`` (B, ...) and ``y`` (M, ...), flattened to (B, D) and (M, D), fp32 (autocast
    off); with ``gather`` they are first gathered across ranks (:func:`gather_samples`).

    Kernels (``s_k`` = bandwidths, each times ``sqrt(D)`` when ``bandwidth_unit="sqrt_dim"``,
    so that for unit-variance coordinates ``||a - b||^2 / s_k^2`` stays O(1) whatever D):

    * ``"rbf"``: ``k(a, b) = mean_k exp(-||a - b||^2 / (2 s_k^2))``;
    * ``"imq"``: ``k(a, b) = mean_k (1 + ||a - b||^2 / s_k^2)^(-1/2)`` (inverse multiquadric,
      heavier tails than the RBF: gradients do not vanish for far-apart sets);
    * ``"poly"``: ``k(a, b) = (a.b / D + coef)^degree`` (KID's cubic kernel with the defaults;
      ``bandwidths`` unused).

    Estimators:

    * ``"unbiased"`` (U-statistic, O((B + M)^2 D)):
      ``sum_{i!=j} k(x_i, x_j) / (B(B-1)) + sum_{i!=j} k(y_i, y_j) / (M(M-1))
      - 2 sum_{i,j} k(x_i, y_j) / (BM)``; unbiased, so it can be slightly negative. B, M >= 2.
    * ``"linear"`` (Gretton et al. 2012, O(n D)): with ``n = min(B, M) // 2`` pairs,
      ``mean_i [k(x_{2i}, x_{2i+1}) + k(y_{2i}, y_{2i+1}) - k(x_{2i}, y_{2i+1})
      - k(x_{2i+1}, y_{2i})]``; unbiased with higher variance; samples beyond 2n are unused.

    Returns the MMD^2 estimate (scalar fp32); the validation value is its mean over batches.
    """

    def __init__(
        self,
        kernel: Kernel = "rbf",
        bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        bandwidth_unit: BandwidthUnit = "sqrt_dim",
        estimator: Estimator = "unbiased",
        degree: int = 3,
        coef: float = 1.0,
        gather: bool = True,
        scale_grad_by_world: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kernel not in ("rbf", "imq", "poly"):
            raise ValueError(f"MMDLoss.kernel must be 'rbf', 'imq' or 'poly', got {kernel!r}")
        if estimator not in ("unbiased", "linear"):
            raise ValueError(f"MMDLoss.estimator must be 'unbiased' or 'linear', got {estimator!r}")
        if bandwidth_unit not in ("sqrt_dim", "absolute"):
            raise ValueError(
                f"MMDLoss.bandwidth_unit must be 'sqrt_dim' or 'absolute', got {bandwidth_unit!r}"
            )
        bandwidths = tuple(float(b) for b in bandwidths)
        if kernel != "poly" and (not bandwidths or min(bandwidths) <= 0):
            raise ValueError(f"MMDLoss.bandwidths must be non-empty and > 0, got {bandwidths}")
        if degree < 1:
            raise ValueError(f"MMDLoss.degree must be >= 1, got {degree}")
        self.kernel, self.estimator, self.bandwidth_unit = kernel, estimator, bandwidth_unit
        self.bandwidths, self.degree, self.coef = bandwidths, int(degree), float(coef)
        self.gather, self.scale_grad_by_world = gather, scale_grad_by_world

    def _inv_sq_bandwidths(self, dim: int) -> list[float]:
        unit = dim if self.bandwidth_unit == "sqrt_dim" else 1.0
        return [1.0 / (b * b * unit) for b in self.bandwidths]

    def _from_sq_dist(self, d2: Tensor, inv: list[float]) -> Tensor:
        """Kernel values from squared distances (any shape), averaged over bandwidths."""
        total: Tensor | None = None
        for c in inv:
            if self.kernel == "rbf":
                k = torch.exp(d2 * (-0.5 * c))
            else:
                k = torch.rsqrt(1.0 + d2 * c)
            total = k if total is None else total + k
        assert total is not None
        return total / len(inv)

    def _kernel_matrix(
        self, a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor, inv: list[float]
    ) -> Tensor:
        """(len(a), len(b)) kernel matrix; ``a_sq``, ``b_sq`` are the rows' squared norms."""
        dim = a.shape[1]
        if self.kernel == "poly":
            k = torch.addmm(a.new_tensor(self.coef), a, b.T, alpha=1.0 / dim)
            k = k.pow(self.degree)
        else:
            d2 = torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.T, alpha=-2.0).clamp_min(0.0)
            k = self._from_sq_dist(d2, inv)
        return k

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """MMD^2 estimate between ``x`` (B, ...) and ``y`` (M, ...) (gathered); scalar fp32."""
        x, y = _flat(x), _flat(y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
        if self.gather:
            group = self.process_group
            x = gather_samples(x, self.scale_grad_by_world, group)
            y = gather_samples(y, self.scale_grad_by_world, group)
        with _fp32(x.device):
            return self._linear(x, y) if self.estimator == "linear" else self._unbiased(x, y)

    def _unbiased(self, x: Tensor, y: Tensor) -> Tensor:
        m, n = x.shape[0], y.shape[0]
        if m < 2 or n < 2:
            raise ValueError(f"the unbiased MMD needs >= 2 samples per set, got {m} and {n}")
        inv = self._inv_sq_bandwidths(x.shape[1])
        x_sq, y_sq = x.square().sum(1), y.square().sum(1)
        k_xx = self._kernel_matrix(x, x, x_sq, x_sq, inv)
        k_yy = self._kernel_matrix(y, y, y_sq, y_sq, inv)
        k_xy = self._kernel_matrix(x, y, x_sq, y_sq, inv)
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        return xx + yy - 2.0 * k_xy.mean()

    def _pair_kernel(self, a: Tensor, b: Tensor, inv: list[float]) -> Tensor:
        if self.kernel == "poly":
            return ((a * b).sum(1) / a.shape[1] + self.coef).pow(self.degree)
        return self._from_sq_dist((a - b).square().sum(1), inv)

    def _linear(self, x: Tensor, y: Tensor) -> Tensor:
        pairs = min(x.shape[0], y.shape[0]) // 2
        if pairs < 1:
            raise ValueError("the linear MMD needs >= 2 samples per set")
        inv = self._inv_sq_bandwidths(x.shape[1])
        x1, x2 = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        y1, y2 = y[0 : 2 * pairs : 2], y[1 : 2 * pairs : 2]
        h = (
            self._pair_kernel(x1, x2, inv)
            + self._pair_kernel(y1, y2, inv)
            - self._pair_kernel(x1, y2, inv)
            - self._pair_kernel(x2, y1, inv)
        )
        return h.mean()

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add this batch's MMD^2 estimate to the running state (weight 1 per batch)."""
        self._accumulate(self.loss(x, y))


# ---------------------------------------------------------------------------------- SWD
class SlicedWassersteinLoss(_MatchingMetric):
    """Sliced Wasserstein distance to the power p, ``SW_p^p(P_x, P_y)``, between equal-size sets.

    ``x`` and ``y`` (N, ...) are flattened to (N, D) (fp32, autocast off) and, with ``gather``,
    gathered across ranks; the two sets must then hold the same number of samples N (each is an
    empirical measure with weights 1/N, for which sorting gives the exact 1-D optimal transport).
    With ``num_projections`` = P directions ``theta_k`` drawn uniformly on the unit sphere,

        SW_p^p = (1 / P) sum_k (1 / N) sum_i |sort(x theta_k)_i - sort(y theta_k)_i|^p

    i.e. the mean over directions of the exact ``W_p^p`` between the projected samples. The
    value is the p-th power (not its p-th root) everywhere, also in ``compute()``: it is an
    unbiased Monte-Carlo estimate over directions and smooth at 0 for p = 2. For
    N(0, I) vs N(m, I) in D dimensions ``SW_2^2 -> |m|^2 / D``.

    Directions are redrawn at every call from a seed taken from the global torch RNG (rank 0's
    seed is broadcast when gathering, so all ranks project identically); ``projections``
    (D, P) passes fixed ones. Returns a scalar fp32; the validation value is the mean over
    batches.
    """

    def __init__(
        self,
        num_projections: int = 128,
        p: float = 2.0,
        gather: bool = True,
        scale_grad_by_world: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_projections < 1:
            raise ValueError(
                f"SlicedWassersteinLoss.num_projections must be >= 1, got {num_projections}"
            )
        if p < 1:
            raise ValueError(f"SlicedWassersteinLoss.p must be >= 1, got {p}")
        self.num_projections, self.p = int(num_projections), float(p)
        self.gather, self.scale_grad_by_world = gather, scale_grad_by_world

    def projections(self, dim: int, device: torch.device) -> Tensor:
        """(dim, num_projections) fp32 unit columns from a (rank-0-shared) global-RNG seed."""
        seed = _shared_seed(device, self.gather, self.process_group)
        gen = torch.Generator(device=device).manual_seed(seed)
        theta = torch.randn(dim, self.num_projections, generator=gen, device=device)
        return theta / theta.norm(dim=0, keepdim=True)

    def loss(self, x: Tensor, y: Tensor, projections: Tensor | None = None) -> Tensor:
        """``SW_p^p`` between ``x`` and ``y`` (gathered); scalar fp32."""
        x, y = _flat(x), _flat(y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
        if self.gather:
            x = gather_samples(x, self.scale_grad_by_world, self.process_group)
            y = gather_samples(y, self.scale_grad_by_world, self.process_group)
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                "SlicedWassersteinLoss needs equal sample counts (after gathering), got "
                f"{x.shape[0]} and {y.shape[0]}"
            )
        if projections is None:
            projections = self.projections(x.shape[1], x.device)
        elif projections.shape[0] != x.shape[1]:
            raise ValueError(
                f"projections must be ({x.shape[1]}, P), got {tuple(projections.shape)}"
            )
        with _fp32(x.device):
            theta = projections.float()
            px = torch.sort(theta.T @ x.T, dim=1).values  # (P, N), sorted per direction
            py = torch.sort(theta.T @ y.T, dim=1).values
            diff = px - py
            if self.p == 2.0:
                return diff.square().mean()
            return diff.abs().pow(self.p).mean()

    def update(self, x: Tensor, y: Tensor, projections: Tensor | None = None) -> None:
        """Add this batch's ``SW_p^p`` to the running state (weight 1 per batch)."""
        self._accumulate(self.loss(x, y, projections))


# ---------------------------------------------------------------------------------- per sample
class GaussianKLLoss(_MatchingMetric):
    """Per-sample KL of a diagonal Gaussian posterior to N(0, I), the classic VAE term.

    ``forward(mean, logvar)`` with both (B, C, H, W) (any (B, ...)):
    ``KL_b = 0.5 * sum_{C,H,W} (mean^2 + exp(logvar) - 1 - logvar)``; returns ``mean_b KL_b``
    (scalar fp32, autocast off). The validation value is the mean of ``KL_b`` over all samples.
    """

    def loss(self, mean: Tensor, logvar: Tensor) -> Tensor:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        with _fp32(mean.device):
            mean, logvar = _flat(mean), _flat(logvar)
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(1)
            return kl.mean()

    def update(self, mean: Tensor, logvar: Tensor) -> None:
        self._accumulate(self.loss(mean, logvar), float(mean.shape[0]))


class PointwiseAlignmentLoss(_MatchingMetric):
    """VA-VAE-style alignment of latents with frozen foundation-model features, per position.

    ``forward(z, features)``: latents ``z`` (B, C, h, w) are mapped by ``proj`` (a per-position
    linear map C -> D, trainable: give its parameters to the VAE optimizer) when set, else C must
    equal D; ``features`` (B, D, h, w) are detached (frozen). With z'_i, f_i the D-vectors at
    position i of one image (N = h*w positions) and cos the cosine similarity:

    * marginal cosine loss ``mean_{b,i} relu(1 - margin_cos - cos(z'_i, f_i))``: a position
      whose latent already has cosine >= ``1 - margin_cos`` with its feature costs nothing;
    * marginal distance-matrix loss
      ``mean_{b,i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - margin_dist)``: the latents'
      self-similarity matrix should reproduce the features' one; differences up to
      ``margin_dist`` are tolerated.

    Returns ``weight_cos * cos_loss + weight_dist * dist_loss`` (scalar fp32, autocast off); the
    validation value is its mean over samples.

    Args:
        margin_cos, margin_dist: the margins m1, m2 above (VA-VAE: 0.5 and 0.25).
        proj: ``(latent_channels, feature_channels)`` of the projection, or None.
        weight_cos, weight_dist: weights of the two terms.
    """

    def __init__(
        self,
        margin_cos: float = 0.5,
        margin_dist: float = 0.25,
        proj: Sequence[int] | None = None,
        weight_cos: float = 1.0,
        weight_dist: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= margin_cos <= 2.0 or not 0.0 <= margin_dist <= 2.0:
            raise ValueError(
                "PointwiseAlignmentLoss.margin_cos and margin_dist must be in [0, 2], got "
                f"{margin_cos}, {margin_dist}"
            )
        self.margin_cos, self.margin_dist = float(margin_cos), float(margin_dist)
        self.weight_cos, self.weight_dist = float(weight_cos), float(weight_dist)
        if proj is not None:
            if len(proj) != 2 or min(proj) < 1:
                raise ValueError(
                    "PointwiseAlignmentLoss.proj must be [latent_channels, feature_channels], "
                    f"got {proj}"
                )
            self.proj: nn.Linear | None = nn.Linear(int(proj[0]), int(proj[1]))
        else:
            self.proj = None

    def loss(self, z: Tensor, features: Tensor) -> Tensor:
        if z.ndim != 4 or features.ndim != 4:
            raise ValueError(
                f"expected z (B, C, h, w) and features (B, D, h, w), got {tuple(z.shape)} "
                f"and {tuple(features.shape)}"
            )
        with _fp32(z.device):
            tokens = z.float().flatten(2).transpose(1, 2)  # (B, N, C)
            if self.proj is not None:
                tokens = F.linear(tokens, self.proj.weight.float(), self.proj.bias.float())
            feats = features.detach().float().flatten(2).transpose(1, 2)  # (B, N, D)
            if tokens.shape != feats.shape:
                raise ValueError(
                    f"latents give tokens {tuple(tokens.shape)} but features {tuple(feats.shape)}"
                    " (B, h*w, D); set PointwiseAlignmentLoss.proj or match the grids"
                )
            zn, fn = F.normalize(tokens, dim=-1), F.normalize(feats, dim=-1)
            cos = (zn * fn).sum(-1)
            cos_loss = F.relu(1.0 - self.margin_cos - cos).mean()
            gap = (zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs()
            dist_loss = F.relu(gap - self.margin_dist).mean()
            return self.weight_cos * cos_loss + self.weight_dist * dist_loss

    def update(self, z: Tensor, features: Tensor) -> None:
        self._accumulate(self.loss(z, features), float(z.shape[0]))
