"""The DMD (distribution-matching distillation) loss of DMVAE: a frozen real-score and a trained
fake-score flow-matching model (PAPER.md section 2), and the toy objectives the paper compares it
with. Conventions (time, fp32 arithmetic, the metric interface) are those of
:mod:`dmvae_lightning.losses.matching`, which re-exports :class:`DMDLoss`."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dmvae_lightning.flow as flow
from dmvae_lightning.checkpoints import CheckpointError, ScoreModel, file_sha256, load_score_model
from dmvae_lightning.losses.base import (
    SCORE_MIN_SIGMA,
    _MatchingMetric,
    _no_param_grads,
    _sample_mean,
)
from dmvae_lightning.utils.compile import compile_module

__all__ = ["OBJECTIVES", "DMDLoss", "Objective"]

Objective = Literal["dmd", "loss_difference", "real_only", "fake_only", "score_l2"]
OBJECTIVES: tuple[str, ...] = ("dmd", "loss_difference", "real_only", "fake_only", "score_l2")


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
        self._labels_checked = False
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
            # hashed now, while the loaded weights are the file's: a file replaced before the
            # first checkpoint must not be vouched for
            model = load_score_model(spec, option="DMDLoss.real_model", sha256=True)
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
        """sha256 of the real model's checkpoint file, taken when it was read (None when it was
        given as a module)."""
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
        if not self._labels_checked and self.null_class is not None and n > 0:
            # once (a device sync): an unconditional real model given labels fails deep in its
            # embedding otherwise (a device-side assert on GPUs)
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > self.null_class:
                raise ValueError(
                    f"DMDLoss: labels {lo}..{hi} are outside the real model's classes "
                    f"0..{self.null_class} (its null class is {self.null_class}; "
                    "DMDLoss.real_model has fewer classes than the data): use a reference model "
                    "trained on these classes, or set model.init_args.matching_labels: false"
                )
            self._labels_checked = True
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
