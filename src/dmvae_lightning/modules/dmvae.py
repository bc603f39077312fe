"""DMVAEModule: the tokenizer of a Distribution-Matching VAE as a LightningModule.

Stages (``stage=``):

* ``"pretrain"`` (paper stage 1): encoder (frozen or trainable) -> MLP bottleneck -> latent ->
  conv decoder, trained with L1 (+ L2, LPIPS) + PatchGAN hinge with the adaptive weight.
* ``"align"`` (paper stage 3, the DMVAE proper): starts from ``init_from`` (a stage-1 checkpoint);
  the generator loss adds ``matching_weight`` x ``matching_loss`` (any loss of
  :mod:`dmvae_lightning.losses.matching`; the paper's is :class:`~dmvae_lightning.losses.matching.DMDLoss`
  with a frozen real-score model and a trained fake copy). Two time scales: the fake score model
  steps on every batch, on stop-gradient latents; the VAE (and discriminator) step on every
  ``vae_every``-th batch (default 5 with a DMD loss, else 1), counted by the module's own
  ``batch_count``. Batches where the VAE does not step only encode (no decode, no
  discriminator).
* ``"finetune"`` (paper stage 4): starts from ``init_from``; encoder and bottleneck frozen, only the
  decoder (and discriminator) train.

Batches are dicts from :class:`~dmvae_lightning.data.reference.ReferenceDistribution`:
``batch["image"]`` (B, C, H, W) float in [-1, 1], ``batch["label"]`` (B,) int64, and, for the
sample-set matching losses (MMD, SWD, pointwise alignment), ``batch["reference"]`` (B, C, h, w)
reference samples shaped like the latents (``data.init_args.reference``).

Optimisation is manual: generator, discriminator and, with a DMD matching loss, the fake
score model (optimizers in that order). Every random draw inside a training step
(DiffAug, dropout) is seeded from ``(seed, batch_count, rank)`` so kill-and-resume is exact; the
batch counter is a buffer, saved with the weights. The discriminator and the generator step
only after ``disc_start`` batches; before that the generator sees reconstruction losses only.

Subclass and override one hook to change one part: :meth:`build_encoder`,
:meth:`build_bottleneck`, :meth:`build_decoder`, :meth:`build_discriminator`,
:meth:`configure_losses`, :meth:`configure_metrics`, :meth:`encode`, :meth:`decode`,
:meth:`generator_loss`, :meth:`matching_term`, :meth:`fake_loss`, :meth:`discriminator_loss`,
:meth:`is_vae_step`, :meth:`log_images` (and :meth:`configure_models`, :meth:`ema_target`). Each
hook's docstring says when it is called and what it must return; overriding one never requires
copying another (``examples/plugin_project`` overrides only :meth:`build_encoder`).

Distributed training: run ``strategy: ddp_explicit``
(:class:`~dmvae_lightning.distributed.ExplicitDDPStrategy`). Each ``manual_backward`` runs inside
the optimizer's ``toggled_optimizer``, so it reaches only that optimizer's parameters: the
generator step leaves the discriminator and the fake score model without gradients, the
discriminator and fake steps leave the tokenizer without them. The explicit strategy averages
exactly those gradients after each backward; no DDP wrapper, hence no unused parameter, ever
sees the module. Frozen networks (the real score model, a frozen encoder) have
``requires_grad=False`` and are never communicated; EMA averages, counters and fixed tables are
equal on all ranks by construction and are not broadcast. A plain ``ddp`` wrapper cannot work
(with ``find_unused_parameters=False`` it waits for the gradients of the other optimizers and
fails at the next batch) and is refused at ``setup`` with this hint;
``ddp_find_unused_parameters_true`` works too, but all-reduces the whole module at each of the
2-3 backwards. ``tests/test_distributed.py`` checks that 2 ranks stay bit-identical and equal one
process on the doubled batch, under both strategies.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Literal, TypedDict

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from dmvae_lightning.checkpoints import (
    CheckpointError,
    build_decoder,
    build_encoder,
    load_tokenizer_state,
)
from dmvae_lightning.distributed import ExplicitDDPStrategy
from dmvae_lightning.ema import EMA
from dmvae_lightning.losses.adversarial import AdversarialLoss
from dmvae_lightning.losses.matching import DMDLoss, GaussianKLLoss
from dmvae_lightning.losses.reconstruction import ReconstructionLoss
from dmvae_lightning.modules.common import (
    EMAInEvaluation,
    build_optimizer,
    build_scheduler,
    drop_callables_from_hparams,
)
from dmvae_lightning.nets.discriminator import PatchDiscriminator
from dmvae_lightning.nets.encoders import ClassifierEncoder, MLPBottleneck
from dmvae_lightning.nets.tokenizer import Tokenizer
from dmvae_lightning.nonfinite import NonFiniteGuard, NonFiniteSpec, batchnorm_stats
from dmvae_lightning.utils.compile import compile_module
from dmvae_lightning.utils.rng import step_rng

_FACTORIES = (
    "optimizer",
    "scheduler",
    "disc_optimizer",
    "disc_scheduler",
    "fake_optimizer",
    "fake_scheduler",
)
_INJECTED = ("matching_loss", *_FACTORIES)


class EncoderSpec(TypedDict, total=False):
    """Encoder options. ``name: conv`` -> :class:`~dmvae_lightning.nets.encoders.ConvEncoder`
    (keys ch, ch_mult, num_res_blocks, mid_attention); ``name: timm`` ->
    :class:`~dmvae_lightning.nets.encoders.TimmEncoder` (keys model_name, pretrained,
    weights_path, frozen, img_size, patch_size, and ``timm_kwargs`` for any other
    ``timm.create_model`` argument, e.g. ``{depth: 12, drop_path_rate: 0.1}``); ``name:
    classifier`` -> :class:`~dmvae_lightning.nets.encoders.ClassifierEncoder` (keys weights_path,
    the ClassifierModule checkpoint, and frozen)."""

    name: Literal["conv", "timm", "classifier"]
    ch: int
    ch_mult: list[int]
    num_res_blocks: int
    mid_attention: bool
    model_name: str
    pretrained: bool
    weights_path: str | None
    frozen: bool
    img_size: int
    patch_size: int
    timm_kwargs: dict[str, Any]


class DecoderSpec(TypedDict, total=False):
    """Decoder options (:class:`~dmvae_lightning.nets.decoder.Decoder`)."""

    ch: int
    ch_mult: list[int]
    num_res_blocks: int
    mid_attention: bool
    input_upsample: bool


class DiscriminatorSpec(TypedDict, total=False):
    """PatchGAN options (:class:`~dmvae_lightning.nets.discriminator.PatchDiscriminator`)."""

    ch: int
    n_layers: int
    norm: Literal["batch", "group", "none"]


class LPIPSSpec(TypedDict, total=False):
    """Local LPIPS weight files (no download): torchvision VGG16 state dict and LPIPS heads."""

    vgg_weights_path: str
    lin_weights_path: str


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1] floats (clamped) for PSNR / SSIM."""
    return ((x.float() + 1) / 2).clamp(0, 1)


class DMVAEModule(EMAInEvaluation, pl.LightningModule):
    """Tokenizer with reconstruction, adversarial and matching losses.

    Args:
        stage: ``"pretrain"``, ``"align"`` or ``"finetune"`` (see module docstring).
        image_channels: channels of the images (1 for Fashion-MNIST, 3 for RGB).
        latent_channels: C of the latent (B, C, h, w).
        encoder: :class:`EncoderSpec`; the spatial reduction f of the encoder sets h = H / f.
        bottleneck_hidden: hidden width of the per-position MLP bottleneck.
        bottleneck_gaussian: the bottleneck outputs a diagonal Gaussian posterior (mean,
            log-variance) and samples from it in training (for :class:`GaussianKLLoss`).
        decoder: :class:`DecoderSpec`; its upsampling must undo the encoder's reduction.
        discriminator: :class:`DiscriminatorSpec`.
        l1_weight, l2_weight, lpips_weight: reconstruction loss weights.
        lpips: :class:`LPIPSSpec`, required when ``lpips_weight > 0``.
        disc_weight: weight of the adversarial generator loss (times the adaptive weight).
        disc_start: batch from which discriminator and adversarial loss are on.
        adaptive_disc_weight: scale the GAN loss by ||grad rec|| / ||grad GAN|| at the last layer
            (gradients averaged over the ranks in distributed training: the global batch's).
        diffaug: DiffAugment policy for the discriminator inputs ("" disables).
        consistency_weight: bCR consistency-regularisation weight for the discriminator.
        lr, disc_lr: AdamW learning rates (``disc_lr`` defaults to ``lr``) of the default
            optimizers (see ``optimizer`` below).
        betas, weight_decay, disc_weight_decay: AdamW settings (paper: (0.9, 0.95), 5e-3, 5e-4).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        grad_clip: gradient-norm clip for both optimizers (0 disables).
        ema_decay: EMA decay of the trained tokenizer parts; ``None`` disables EMA.
        ema_warmup: use the ``min(decay, (1+n)/(10+n))`` warm-up of the EMA decay.
        init_from: DMVAEModule checkpoint whose tokenizer (+ discriminator, EMA) weights start
            this run (required for ``align`` and ``finetune``).
        matching_loss: a matching loss of :mod:`dmvae_lightning.losses.matching` (or any
            ``torchmetrics.Metric`` called as ``loss(z, reference)``), by ``class_path`` in YAML;
            see :meth:`matching_term` for what each is given. ``None``: no matching term.
        matching_weight: its weight in the generator loss (paper: 10 for data-derived
            references, 1 otherwise). ``0`` is the ablation: the term is neither computed nor
            trained (no fake-model steps), everything else unchanged.
        vae_every: the VAE and discriminator step on every ``vae_every``-th batch (batches
            ``vae_every - 1``, ``2 vae_every - 1``, ... counted from 0 by ``batch_count``);
            ``None``: 5 for ``align`` with a DMD loss of non-zero weight, 1 otherwise (no fake
            model to train in between). The fake score model steps on every batch.
        fake_lr, fake_weight_decay: AdamW of the DMD fake score model (``fake_lr`` defaults to
            ``lr``; same betas, warm-up and clipping as the VAE).
        matching_labels: give the batch labels to a class-conditional DMD loss (CFG needs them).
        seed: seed of the per-step random streams (see :mod:`dmvae_lightning.utils.rng`).
        num_log_images: images in the reconstruction grid logged at each validation.
        nonfinite: :class:`~dmvae_lightning.nonfinite.NonFiniteSpec`, what a NaN / inf loss or
            gradient does to the generator, discriminator or fake-model step: ``mode: stop``
            (default: the run stops, naming the batch, the terms and the last checkpoint) or
            ``mode: skip`` (the step is skipped and counted, up to ``max_skips``). A checkpoint
            with non-finite tensors is never written.
        compile: compile the tokenizer's encoder and decoder with ``torch.compile``: ``true``,
            or a mapping of its options (:mod:`dmvae_lightning.utils.compile`); in place, so
            parameter names and checkpoints are those of the eager module.
        channels_last: store the decoder's and the discriminator's weights in the
            ``channels_last`` memory format (NHWC convolutions; often faster on GPUs with
            tensor cores, measure with ``benchmarks/bench_train_step.py``). Values and
            checkpoints are unchanged.
        optimizer, disc_optimizer, fake_optimizer: injected optimizers of the generator
            (tokenizer), the discriminator and the DMD fake score model
            (``lightning.pytorch.cli.OptimizerCallable``; in YAML ``{class_path:
            torch.optim.SGD, init_args: {lr: 0.01}}``). None: AdamW with ``lr`` / ``disc_lr`` /
            ``fake_lr``, ``betas`` and the weight decays above (fused on CUDA).
        scheduler, disc_scheduler, fake_scheduler: injected learning-rate schedulers
            (``LRSchedulerCallable``), stepped with their optimizer. None: linear warm-up over
            ``warmup_steps``.
    """

    def __init__(
        self,
        stage: Literal["pretrain", "align", "finetune"] = "pretrain",
        image_channels: int = 3,
        latent_channels: int = 32,
        encoder: EncoderSpec | None = None,
        bottleneck_hidden: int = 256,
        bottleneck_gaussian: bool = False,
        decoder: DecoderSpec | None = None,
        discriminator: DiscriminatorSpec | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips: LPIPSSpec | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 5000,
        adaptive_disc_weight: bool = True,
        diffaug: str = "color,translation,cutout",
        consistency_weight: float = 0.0,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 5e-3,
        disc_weight_decay: float = 5e-4,
        warmup_steps: int = 1000,
        grad_clip: float = 1.0,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = False,
        init_from: str | None = None,
        seed: int = 0,
        num_log_images: int = 16,
        matching_loss: Metric | None = None,
        matching_weight: float = 1.0,
        vae_every: int | None = None,
        fake_lr: float | None = None,
        fake_weight_decay: float = 0.0,
        matching_labels: bool = True,
        nonfinite: NonFiniteSpec | None = None,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        disc_optimizer: OptimizerCallable | None = None,
        disc_scheduler: LRSchedulerCallable | None = None,
        fake_optimizer: OptimizerCallable | None = None,
        fake_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # A loss built in Python is an nn.Module; it is dropped from the hparams just below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        # Built in Python (not from a config): keep the loss module (its weights are in the
        # state dict) and optimizer factories out of the checkpoint's hyperparameters; pass
        # them again when loading.
        drop_callables_from_hparams(self, _INJECTED)
        self._factories = dict(
            optimizer=optimizer,
            scheduler=scheduler,
            disc_optimizer=disc_optimizer,
            disc_scheduler=disc_scheduler,
            fake_optimizer=fake_optimizer,
            fake_scheduler=fake_scheduler,
        )
        self.automatic_optimization = False
        if stage not in ("pretrain", "align", "finetune"):
            raise ValueError(
                f"model.init_args.stage: unknown stage {stage!r}; expected 'pretrain', 'align' "
                "or 'finetune'."
            )
        if stage in ("align", "finetune") and not init_from:
            raise ValueError(
                f"model.init_args.init_from: stage {stage!r} starts from a tokenizer checkpoint; "
                "set `init_from` to the previous stage's .ckpt."
            )
        if stage == "finetune" and matching_loss is not None and matching_weight != 0:
            raise ValueError(
                "model.init_args.matching_loss has no effect with stage: finetune (encoder and "
                "bottleneck are frozen, so the latents cannot move): set it to null or "
                "matching_weight: 0"
            )
        if matching_loss is not None and not isinstance(matching_loss, Metric):
            raise TypeError(
                "model.init_args.matching_loss must be a torchmetrics.Metric (a loss of "
                f"dmvae_lightning.losses.matching), got {type(matching_loss).__name__}"
            )
        self.register_buffer("batch_count", torch.zeros((), dtype=torch.long))
        self.nonfinite_guard = NonFiniteGuard.from_spec(nonfinite)
        self.configure_models()
        if (
            isinstance(matching_loss, GaussianKLLoss)
            and matching_weight != 0
            and not bottleneck_gaussian
        ):  # refused here, not at the first VAE step (batch vae_every - 1 of an alignment)
            raise ValueError(
                "GaussianKLLoss needs a Gaussian posterior: set "
                "model.init_args.bottleneck_gaussian: true"
            )
        self.matching_loss = matching_loss
        # the DMD fake model's steps fill the batches between VAE steps; without one (another
        # matching loss, or weight 0 left at the default) every batch is a VAE step
        default_every = 5 if stage == "align" and self.trains_fake else 1
        self.vae_every = default_every if vae_every is None else int(vae_every)
        if self.vae_every < 1:
            raise ValueError(f"model.init_args.vae_every must be >= 1, got {vae_every}")
        # (features, latents) of the last training-mode bottleneck call with gradients: the
        # Gaussian KL reuses those features instead of running the encoder a second time (only
        # recorded for that loss; consumed by it and dropped after every training step, so no
        # graph outlives its step)
        self._bottleneck_io: tuple[torch.Tensor, torch.Tensor] | None = None
        if bottleneck_gaussian and isinstance(matching_loss, GaussianKLLoss):
            self.tokenizer.bottleneck.register_forward_hook(self._remember_bottleneck_io)
        self.configure_losses()
        self.configure_metrics()
        if init_from:
            self.load_tokenizer_weights(init_from)
        self._set_trainable()
        if channels_last:
            self.tokenizer.decoder.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        for part in (self.tokenizer.encoder, self.tokenizer.decoder):
            compile_module(part, compile, "model.init_args.compile")
        self._ema_parts = tuple(
            name
            for name in ("encoder", "bottleneck", "decoder")
            if any(p.requires_grad for p in getattr(self.tokenizer, name).parameters())
        )
        self.ema = EMA(self.ema_target(), decay=ema_decay, warmup=ema_warmup) if ema_decay else None

    # ------------------------------------------------------------------ hooks: networks
    def configure_models(self) -> None:
        """Called once from ``__init__``, before the losses and metrics are built. Must set
        ``self.tokenizer`` (a :class:`~dmvae_lightning.nets.tokenizer.Tokenizer` of the
        ``build_encoder`` / ``build_bottleneck`` / ``build_decoder`` parts) and
        ``self.discriminator`` (from ``build_discriminator``); returns nothing. Override one
        ``build_*`` hook to swap one part, this one only to change how they are assembled."""
        encoder = self.build_encoder()
        in_dim = getattr(encoder, "out_dim", None)
        if in_dim is None:
            raise ValueError(
                "build_encoder() must return a module with an `out_dim` attribute (feature channels)."
            )
        self.tokenizer = Tokenizer(encoder, self.build_bottleneck(in_dim), self.build_decoder())
        self.discriminator = self.build_discriminator()

    def build_encoder(self) -> nn.Module:
        """Called once by :meth:`configure_models` (in ``__init__``). Must return the encoder: an
        ``nn.Module`` mapping images (B, C_img, H, W) in [-1, 1] to features (B, D, h, w), with
        an ``out_dim`` attribute (D, which sizes the bottleneck). Default: from the ``encoder``
        spec (:func:`dmvae_lightning.checkpoints.build_encoder`). Override to plug in another
        backbone; ``self.hparams`` (e.g. ``self.hparams.encoder``) is available.

        A classifier encoder's architecture is added to the spec as ``arch`` (saved with the
        hyperparameters), so that the checkpoint loads without the classifier's file."""
        encoder = build_encoder(self.hparams.encoder, self.hparams.image_channels)
        if isinstance(encoder, ClassifierEncoder):
            self.hparams.encoder = {**self.hparams.encoder, "arch": dict(encoder.net.config)}
        return encoder

    def build_bottleneck(self, in_dim: int) -> nn.Module:
        """Called once by :meth:`configure_models` with ``in_dim`` = the encoder's ``out_dim``.
        Must return the ``nn.Module`` mapping features (B, D, h, w) to raw latents
        (B, latent_channels, h, w); with ``bottleneck_gaussian`` it must also offer
        ``forward_stats(features) -> (mean, logvar)``. Default: the per-position MLP."""
        hp = self.hparams
        return MLPBottleneck(
            in_dim, hp.latent_channels, hp.bottleneck_hidden, gaussian=hp.bottleneck_gaussian
        )

    def build_decoder(self) -> nn.Module:
        """Called once by :meth:`configure_models`. Must return the decoder: an ``nn.Module``
        mapping raw latents (B, C, h, w) to images (B, C_img, H, W) (roughly [-1, 1],
        unclamped), with ``get_last_layer()`` returning the last layer's weight (for the adaptive
        GAN weight). Default: :class:`~dmvae_lightning.nets.decoder.Decoder` from ``decoder``."""
        hp = self.hparams
        return build_decoder(hp.decoder, hp.latent_channels, hp.image_channels)

    def build_discriminator(self) -> nn.Module:
        """Called once by :meth:`configure_models`. Must return the discriminator: an
        ``nn.Module`` mapping images (B, C_img, H, W) to real/fake logits (any shape, e.g. a
        patch map). Default: :class:`~dmvae_lightning.nets.discriminator.PatchDiscriminator`."""
        spec = dict(self.hparams.discriminator or {})
        return PatchDiscriminator(in_channels=self.hparams.image_channels, **spec)

    # ------------------------------------------------------------------ hooks: losses, metrics
    def configure_losses(self) -> None:
        """Called once from ``__init__``, after :meth:`configure_models` and after
        ``self.matching_loss`` is set. Must set ``self.reconstruction`` (called as
        ``(x, x_rec) -> (loss, logs)``) and ``self.adversarial`` (an
        :class:`~dmvae_lightning.losses.adversarial.AdversarialLoss`); returns nothing."""
        hp = self.hparams
        self.reconstruction = ReconstructionLoss(
            l1_weight=hp.l1_weight,
            l2_weight=hp.l2_weight,
            lpips_weight=hp.lpips_weight,
            lpips=dict(hp.lpips) if hp.lpips else None,
        )
        self.adversarial = AdversarialLoss(
            disc_weight=hp.disc_weight,
            start_step=hp.disc_start,
            diffaug_policy=hp.diffaug,
            consistency_weight=hp.consistency_weight,
            adaptive=hp.adaptive_disc_weight,
        )

    def configure_metrics(self) -> None:
        """Called once from ``__init__``, after :meth:`configure_losses`. Must set
        ``self.val_metrics`` and ``self.test_metrics``: metric collections updated with
        ``(reconstruction, image)`` in [0, 1] at every validation / test step and logged per
        epoch; returns nothing. Default: PSNR and SSIM."""
        self.val_metrics = MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            },
            prefix="val/",
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    # ------------------------------------------------------------------ public API
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, W) in [-1, 1] -> raw latents (B, C, h, w). Called on every
        training batch (with gradient on VAE steps), by evaluation and ``predict`` (EMA weights
        in) and by anything using the module as a tokenizer (latent caches, diffusion
        training). Must return the latents the decoder and the matching loss see."""
        return self.tokenizer.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> images (B, C_img, H, W), roughly [-1, 1], unclamped.
        Called on VAE steps of training, by evaluation and ``predict``, and to decode samples
        of a diffusion model. Must return the reconstruction (never clamped here)."""
        return self.tokenizer.decode(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct images (B, C_img, H, W) in [-1, 1]."""
        return self.decode(self.encode(x))

    def ema_target(self) -> nn.ModuleDict:
        """Called when the EMA is built (``__init__``), updated (after each VAE step) and
        swapped in (evaluation, :meth:`ema_scope`). Must return the same module tree every
        time: the tokenizer parts that train in this stage (the only ones EMA covers),
        ``encoder`` (when trainable), ``bottleneck``, ``decoder``."""
        return nn.ModuleDict({name: getattr(self.tokenizer, name) for name in self._ema_parts})

    @contextlib.contextmanager
    def ema_scope(self):
        """Swap the EMA weights in for the duration of the block (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with self.ema.scope(self.ema_target()):
            yield

    def load_tokenizer_weights(self, path: str) -> None:
        """Load tokenizer (and, when present and compatible, discriminator) weights from a
        DMVAEModule checkpoint (:func:`dmvae_lightning.checkpoints.load_tokenizer_state`); the
        EMA weights, when saved, replace the raw ones. A tokenizer that does not fit is a
        :class:`~dmvae_lightning.checkpoints.CheckpointError` naming ``init_from``; a
        discriminator that does not fit is a warning, and this run's starts from scratch."""
        option = "model.init_args.init_from"
        saved = load_tokenizer_state(path, option)
        try:
            self.tokenizer.load_state_dict(saved.tokenizer, strict=True)
        except RuntimeError as err:
            detail = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            raise CheckpointError(
                option,
                saved.file,
                "does not fit this model (another encoder, decoder or latent size?):\n  "
                + (detail[1] if len(detail) > 1 else detail[0])[:300],
            ) from err
        # The previous stage's EMA (buffers named like the parameters, '.' -> '__') is the
        # better starting point: it replaces the raw weights where present.
        with torch.no_grad():
            for name, param in self.tokenizer.named_parameters():
                ema = saved.ema.get(name.replace(".", "__"))
                if ema is not None:
                    param.copy_(ema)
        if saved.discriminator:
            try:
                self.discriminator.load_state_dict(saved.discriminator, strict=True)
            except RuntimeError as err:
                first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), "")
                warnings.warn(
                    f"{option}: the discriminator of {str(saved.file)!r} does not fit "
                    f"model.init_args.discriminator ({first[:200]}); this run's discriminator "
                    "starts from scratch",
                    stacklevel=2,
                )
        self._check_reference(saved.real_model)

    def _check_reference(self, recorded: dict[str, Any] | None) -> None:
        """``init_from`` an alignment checkpoint whose DMD real model was read from the path this
        run reads it from: the file must be the one it was trained with (same sha256)."""
        loss = self.matching_loss
        if not recorded or not isinstance(loss, DMDLoss) or not recorded.get("sha256"):
            return
        path = getattr(loss, "_real_path", None)
        if path is None or str(recorded.get("path")) != str(path):
            return  # another reference model, chosen on purpose for this run
        if loss.real_sha256() != recorded["sha256"]:
            raise CheckpointError(
                "DMDLoss.real_model",
                path,
                "changed since the init_from checkpoint was trained with it (sha256 differs); "
                "restore that file or point real_model at it.",
            )

    def _set_trainable(self) -> None:
        if self.hparams.stage == "finetune":
            self.tokenizer.encoder.requires_grad_(False)
            self.tokenizer.bottleneck.requires_grad_(False)

    # ------------------------------------------------------------------ losses as hooks
    def generator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called on every VAE step (:meth:`is_vae_step`) with images ``x``, their
        reconstructions ``x_rec`` and latents ``z``, inside the generator's
        ``toggled_optimizer`` block (the discriminator's parameters take no gradient from it).
        Must return ``(scalar loss, dict of detached logs)``; ``matching_weight`` x
        :meth:`matching_term` is added to the loss afterwards. Default: reconstruction, plus the
        adaptive-weight GAN loss once ``disc_start`` is reached."""
        rec, logs = self.reconstruction(x, x_rec)
        logs = {f"train/{k}": v for k, v in logs.items()}
        loss = rec
        if self.adversarial.active(int(self.batch_count)):
            adv, adv_logs = self.adversarial.generator_loss(
                self.discriminator, x_rec, rec, self.tokenizer.decoder.get_last_layer()
            )
            loss = loss + adv
            logs.update({f"train/{k}": v for k, v in adv_logs.items()})
        logs["train/g_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called on VAE steps once ``disc_start`` is reached, after the generator stepped,
        inside the discriminator's ``toggled_optimizer`` block, with real images ``x`` and the
        reconstructions ``x_rec``. Must return ``(scalar loss, dict of detached logs)``; detach
        ``x_rec`` (the default does: hinge loss, DiffAugment, bCR)."""
        loss, logs = self.adversarial.discriminator_loss(self.discriminator, x, x_rec.detach())
        return loss, {f"train/{k}": v for k, v in logs.items()}

    def _remember_bottleneck_io(
        self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> None:
        if module.training and torch.is_grad_enabled() and args:
            self._bottleneck_io = (args[0], output)

    def posterior_features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The encoder features (B, D, h, w) whose bottleneck posterior produced latents ``z``:
        those of the bottleneck's last training call when ``z`` is that call's output (the
        usual case: ``z`` came from :meth:`encode` on this batch), else ``encoder(x)`` again.
        Saves the Gaussian KL a second encoder forward and backward per VAE step."""
        io, self._bottleneck_io = self._bottleneck_io, None
        if io is not None and io[1] is z:
            return io[0]
        return self.tokenizer.encoder(x)

    def matching_term(
        self, x: torch.Tensor, z: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called on every VAE step when a ``matching_loss`` is set and ``matching_weight`` is
        not 0, with the images ``x``, their raw latents ``z`` (B, C, h, w, with gradient) and the
        batch. Must return the unweighted ``(scalar loss, dict of detached logs)``; the module
        adds ``matching_weight`` times it to :meth:`generator_loss`. What each loss is given:

        * :class:`DMDLoss`: ``loss.normalize(z)`` (the real model's latent space) and, with
          ``matching_labels``, ``batch["label"]``;
        * :class:`GaussianKLLoss`: the bottleneck's posterior ``(mean, logvar)`` on the encoder
          features of ``x`` (needs ``bottleneck_gaussian: true``);
        * any other metric (MMD, SWD, pointwise alignment, your own): ``(z, batch["reference"])``.
        """
        loss_fn = self.matching_loss
        if isinstance(loss_fn, DMDLoss):
            labels = batch.get("label") if self.hparams.matching_labels else None
            value = loss_fn(loss_fn.normalize(z), labels)
            info = loss_fn.last_info
            logs = {"train/dmd_t_max": info["t_max"]} if "t_max" in info else {}
        elif isinstance(loss_fn, GaussianKLLoss):  # bottleneck_gaussian: checked in __init__
            mean, logvar = self.tokenizer.bottleneck.forward_stats(self.posterior_features(x, z))
            value, logs = loss_fn(mean, logvar), {}
        else:
            ref = batch.get("reference")
            if ref is None:
                raise ValueError(
                    f"{type(loss_fn).__name__} compares latents with reference samples, but the "
                    "batch has no 'reference'; set data.init_args.reference (a source whose "
                    "shape equals the latent shape)."
                )
            proj = getattr(loss_fn, "proj", None)  # PointwiseAlignmentLoss: C -> D per position
            want = z.shape[1:] if proj is None else (proj.out_features, *z.shape[2:])
            if ref.shape[1:] != want:
                raise ValueError(
                    f"reference samples {tuple(ref.shape[1:])} do not match the latent shape "
                    f"{tuple(z.shape[1:])}"
                    + ("" if proj is None else f" projected to {proj.out_features} channels")
                    + "; fix data.init_args.reference.shape"
                    + ("" if proj is None else " or matching_loss.init_args.proj")
                )
            value, logs = loss_fn(z, ref), {}
        logs["train/matching"] = value.detach()
        return value, logs

    def is_vae_step(self, batch_count: int) -> bool:
        """Called at the start of every training batch with the module's own batch counter
        (from 0; not ``global_step``). Must return whether the VAE (and discriminator) step on
        this batch; on other batches the module only encodes (for the DMD fake model). Default:
        every ``vae_every``-th batch, i.e. ``(batch_count + 1) % vae_every == 0``."""
        return (batch_count + 1) % self.vae_every == 0

    @property
    def trains_fake(self) -> bool:
        """Whether a DMD fake score model is trained (a DMD loss with non-zero weight)."""
        return isinstance(self.matching_loss, DMDLoss) and self.hparams.matching_weight != 0

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        """Called by Lightning on every process before ``fit``; refuses a DDP wrapper without
        ``find_unused_parameters`` (see the module docstring)."""
        trainer = self._trainer
        if stage != "fit" or trainer is None or trainer.world_size < 2:
            return
        strategy = trainer.strategy
        if (
            isinstance(strategy, DDPStrategy)
            and not isinstance(strategy, ExplicitDDPStrategy)
            and not strategy._ddp_kwargs.get("find_unused_parameters", False)
        ):
            raise ValueError(
                "DMVAEModule steps 2-3 optimizers per batch and each backward reaches only one "
                "optimizer's parameters, which a DDP wrapper without find_unused_parameters "
                "cannot all-reduce: set `trainer.strategy: ddp_explicit` (explicit gradient "
                "sync, dmvae_lightning.distributed.ExplicitDDPStrategy) or "
                "`ddp_find_unused_parameters_true`."
            )

    def configure_optimizers(self):
        """Generator, discriminator and (with a DMD loss) fake score model optimizers, in that
        order, each with its step-interval scheduler: the injected ``optimizer`` /
        ``scheduler`` arguments, else AdamW + linear warm-up
        (:func:`~dmvae_lightning.modules.common.build_optimizer`)."""
        hp, make = self.hparams, self._factories
        gen_params = [p for p in self.tokenizer.parameters() if p.requires_grad]
        if not gen_params:
            raise ValueError("Nothing to train: every tokenizer parameter is frozen.")
        # a matching loss's own trainable parameters (PointwiseAlignmentLoss.proj) train with
        # the VAE; the DMD fake model has an optimizer of its own
        loss = self.matching_loss
        if loss is not None and not isinstance(loss, DMDLoss) and hp.matching_weight != 0:
            gen_params += [p for p in loss.parameters() if p.requires_grad]
        optimizers = [
            build_optimizer(make["optimizer"], gen_params, hp.lr, hp.betas, hp.weight_decay),
            build_optimizer(
                make["disc_optimizer"],
                self.discriminator.parameters(),
                hp.disc_lr if hp.disc_lr is not None else hp.lr,
                hp.betas,
                hp.disc_weight_decay,
            ),
        ]
        scheduler_factories = [make["scheduler"], make["disc_scheduler"]]
        if self.trains_fake:
            optimizers.append(
                build_optimizer(
                    make["fake_optimizer"],
                    self.matching_loss.fake_parameters(),
                    hp.fake_lr if hp.fake_lr is not None else hp.lr,
                    hp.betas,
                    hp.fake_weight_decay,
                )
            )
            scheduler_factories.append(make["fake_scheduler"])
        schedulers = [
            {"scheduler": build_scheduler(factory, opt, hp.warmup_steps), "interval": "step"}
            for factory, opt in zip(scheduler_factories, optimizers, strict=True)
        ]
        return optimizers, schedulers

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Usual ``load_state_dict``; a module built without a matching loss (e.g. to use an
        alignment checkpoint as a tokenizer) ignores the checkpoint's ``matching_loss.*``."""
        if self.matching_loss is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("matching_loss.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.hparams.image_channels:
            raise ValueError(
                f"Batch images have shape {tuple(x.shape)} but model.init_args.image_channels is "
                f"{self.hparams.image_channels}; make it equal the data's channels "
                "(data.init_args.channels)."
            )

    def _optimizer_step(self, opt, compute_loss, what: str) -> dict[str, torch.Tensor]:
        """Run ``compute_loss()`` with only ``opt``'s parameters trainable, then backward, clip,
        step and zero. A non-finite loss term or gradient stops the run or, in skip mode, skips
        the step and restores the BatchNorm statistics (``nonfinite``; ``what`` names the step
        in the message). Returns the logs of ``compute_loss``."""
        guard = self.nonfinite_guard
        stats = batchnorm_stats(self) if guard.mode == "skip" else []
        saved = [b.clone() for b in stats]
        with self.toggled_optimizer(opt):
            loss, logs = compute_loss()
            self.manual_backward(loss)
            if self.hparams.grad_clip and self.hparams.grad_clip > 0:
                self.clip_gradients(
                    opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
                )
            params = [p for group in opt.param_groups for p in group["params"]]
            if guard.check_step(self, int(self.batch_count), what, loss, logs, params):
                opt.step()
            else:
                with torch.no_grad():
                    for buf, old in zip(stats, saved, strict=True):
                        buf.copy_(old)
            opt.zero_grad(set_to_none=True)
        return logs

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint with non-finite tensors (see ``nonfinite``); keep the
        count of skipped steps. With a DMD loss, record its frozen real model by reference
        (``checkpoint["dmd_real_model"]``: path, sha256, latent statistics); the weights are not
        stored (see :class:`~dmvae_lightning.losses.matching.DMDLoss`)."""
        self.nonfinite_guard.check_checkpoint(checkpoint, self._trainer)
        checkpoint["nonfinite_skips"] = self.nonfinite_guard.skips
        if isinstance(self.matching_loss, DMDLoss):
            checkpoint["dmd_real_model"] = self.matching_loss.reference()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_guard.skips = int(checkpoint.get("nonfinite_skips", 0))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """One batch: on VAE steps (:meth:`is_vae_step`) encode, decode, step the generator on
        :meth:`generator_loss` (+ ``matching_weight`` x :meth:`matching_term`) and the
        discriminator; on other batches only encode (no gradient). Then, with a DMD loss, step
        the fake score model on the stop-gradient latents. Counted by ``batch_count``."""
        x = batch["image"]
        self._check_batch(x)
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        opt_g, opt_d = optimizers[0], optimizers[1]
        step = int(self.batch_count)
        vae_step = self.is_vae_step(step)
        weight = float(self.hparams.matching_weight)
        use_matching = self.matching_loss is not None and weight != 0
        out: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}

        def gen_loss():
            z = self.encode(x)
            out["z"], out["x_rec"] = z, self.decode(z)
            loss, gen_logs = self.generator_loss(x, out["x_rec"], z)
            if use_matching:
                term, match_logs = self.matching_term(x, z, batch)
                loss = loss + weight * term
                gen_logs.update(match_logs)
                gen_logs["train/g_loss"] = loss.detach()
            # the progress bar's "loss", also for a generator_loss override that logs other keys
            gen_logs.setdefault("train/g_loss", loss.detach())
            return loss, gen_logs

        with step_rng(self.hparams.seed, step, self.global_rank, x.device):
            if vae_step:
                logs.update(self._optimizer_step(opt_g, gen_loss, "generator"))
                schedulers[0].step()
                if self.adversarial.active(step):
                    logs.update(
                        self._optimizer_step(
                            opt_d, lambda: self.discriminator_loss(x, out["x_rec"]), "discriminator"
                        )
                    )
                    schedulers[1].step()
            if self.trains_fake:
                if "z" in out:
                    z = out["z"].detach()
                else:
                    with torch.no_grad():
                        z = self.encode(x)
                logs.update(
                    self._optimizer_step(
                        optimizers[2], lambda: self.fake_loss(z, batch), "fake score model"
                    )
                )
                schedulers[2].step()
        self._bottleneck_io = None
        if vae_step and self.ema is not None:
            self.ema.update(self.ema_target())
        self.batch_count += 1
        if not self._writes_step_logs():
            return  # on-step values of this batch would never reach the logger
        if self.nonfinite_guard.skips:
            logs["train/nonfinite_skips"] = torch.tensor(float(self.nonfinite_guard.skips))
        if vae_step:
            logs["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
            if "train/g_loss" in logs:  # absent when the step was skipped as non-finite
                self.log("loss", logs["train/g_loss"], prog_bar=True, batch_size=x.shape[0])
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])

    def _writes_step_logs(self) -> bool:
        """Whether Lightning writes on-step logs after this batch (every ``log_every_n_steps``
        batches). ``self.log`` costs ~1.5 ms a value on CPU, so batches whose values would be
        dropped skip it. Falls back to True when the trainer does not say."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def fake_loss(
        self, z: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called on every training batch when a DMD fake score model trains
        (:attr:`trains_fake`), after the VAE step if any, inside the fake model's
        ``toggled_optimizer`` block, with stop-gradient raw latents ``z`` (B, C, h, w) and the
        batch. Must return ``(scalar loss, dict of detached logs)``. Default: the fake model's
        flow-matching loss on ``z`` mapped to the real model's space (labels for CFG)."""
        loss_fn = self.matching_loss
        labels = batch.get("label") if self.hparams.matching_labels else None
        value = loss_fn.fake_loss(loss_fn.normalize(z.detach()), labels)
        return value, {"train/fake_loss": value.detach()}

    # EMA weights are swapped in for every evaluation loop (EMAInEvaluation).
    def on_validation_epoch_start(self) -> None:
        # Fresh states under this loop's grad mode: states left by a `trainer.validate` (inference
        # mode) cannot be updated in place under the no-grad validation inside `fit`.
        self.val_metrics.reset()
        super().on_validation_epoch_start()

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        super().on_test_epoch_start()

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        x = batch["image"]
        self._check_batch(x)
        x_rec = self(x)
        rec, _ = self.reconstruction(x, x_rec)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(_to_unit(x_rec), _to_unit(x))
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self.log(f"{stage}/rec_loss", rec, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        if batch_idx == 0:
            self.log_images(x, x_rec, stage)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"latent": (B, C, h, w), "reconstruction": (B, C_img, H, W)}`` (EMA weights)."""
        z = self.encode(batch["image"])
        return {"latent": z, "reconstruction": self.decode(z).clamp(-1, 1)}

    def log_images(self, x: torch.Tensor, x_rec: torch.Tensor, prefix: str) -> None:
        """Called on the first batch of every validation and test epoch (EMA weights in), with
        images ``x``, reconstructions ``x_rec`` and ``prefix`` ``"val"`` / ``"test"``. Returns
        nothing. Default: a grid (top rows originals, bottom rows reconstructions) to
        TensorBoard when the logger has ``add_image``."""
        n = min(self.hparams.num_log_images, x.shape[0])
        if n == 0 or self.logger is None or not hasattr(self.logger.experiment, "add_image"):
            return
        nrow = max(1, int(math.sqrt(n)))
        grid = torchvision.utils.make_grid(
            torch.cat([x[:n], x_rec[:n].clamp(-1, 1)]).float().cpu(),
            nrow=nrow * 2 if n >= 4 else n,
            normalize=True,
            value_range=(-1, 1),
        )
        self.logger.experiment.add_image(f"{prefix}/reconstructions", grid, self.global_step)
