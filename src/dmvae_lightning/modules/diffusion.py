"""LatentDiffusionModule: a class-conditional flow-matching DiT on latents.

One module serves two stages of the paper: the **reference model** (stage 2: the "real score"
that DMD alignment freezes, trained on samples of the reference distribution) and the
**generator** (stage 5: trained on the normalised latents of the final tokenizer).

Where the latents come from (:meth:`LatentDiffusionModule.get_latents`):

* ``batch[input_key]`` (default ``"reference"``): latents already in the batch, (B, C, H, W),
  e.g. from :class:`~dmvae_lightning.latents.LatentCache` or a reference source;
* with ``tokenizer_ckpt`` set: ``batch["image"]`` (B, C_img, H_img, W_img) in [-1, 1] encoded on
  the fly by the frozen :class:`~dmvae_lightning.nets.tokenizer.Tokenizer` of that DMVAEModule
  checkpoint (read by :func:`~dmvae_lightning.checkpoints.load_tokenizer`; EMA weights, eval
  mode, no gradient). The tokenizer is *held*, not registered as a submodule: it is absent
  from this module's ``state_dict`` / checkpoints, from the optimizer and from DDP, and
  ``.to()`` / ``.train()`` do not reach it (it follows ``self.device`` lazily).
  With a tokenizer, samples can be decoded to images (validation grid, ``predict``).

Conventions: flow matching as in :mod:`dmvae_lightning.flow` (t = 1 data, t = 0 noise,
``x_t = t x + (1 - t) eps``, the DiT predicts ``x - eps``); t, noise and path arithmetic fp32.
The DiT sees *normalised* latents ``x = (z - latent_mean) * latent_scale`` (scalar mean and
``scale = 1 / std``, the public convention; released DMVAE stats 0.0685 / 0.1763). Statistics not
given in the config are measured over the first ``stats_batches`` training batches before the
first step (:meth:`on_train_start`), summed over ranks, and stored as buffers, so checkpoints carry
them and a resumed run does not measure again.

Label index ``num_classes`` is the null class (label dropout ``class_dropout_prob`` trains it, CFG
uses it); with ``num_classes = 0`` the model is unconditional.

Randomness in a training step (t, noise, label dropout) is a function of ``(seed, batch_count,
rank)`` (:func:`~dmvae_lightning.utils.rng.step_rng`); ``batch_count`` is a checkpointed buffer, so
kill-and-resume repeats an uninterrupted run exactly. The EMA (of the DiT only) is swapped in for
validation, test, predict and :meth:`sample`.

Sharding (FSDP2): with ``trainer.strategy: fsdp2`` (:class:`~dmvae_lightning.strategies.
FSDP2Strategy`, or any Lightning ``ModelParallelStrategy`` with tensor-parallel size 1),
:meth:`configure_model` applies ``fully_shard`` to every DiT block and then to the DiT over the
data-parallel mesh: each rank holds ``1 / world_size`` of the DiT's weights, gradients and
optimizer state, and of its EMA (:meth:`~dmvae_lightning.ema.EMA.shard_like`); a block's weights
are gathered for its forward and backward and freed again. Not sharded: the latent statistics
and counters (small buffers, replicated), the frozen tokenizer (held outside the module: every
rank keeps a full copy) and activations (each rank has its own batch, as with DDP). Checkpoints
are full-state files by default, loadable by a single process. With any other strategy (DDP, one
process) :meth:`configure_model` does nothing.

Hooks to override (one piece each): :meth:`configure_models`, :meth:`load_tokenizer`,
:meth:`get_latents`, :meth:`get_labels`, :meth:`normalize`, :meth:`denormalize`,
:meth:`sample_time`, :meth:`training_loss`, :meth:`stats_dataloader`, :meth:`sample`,
:meth:`decode`, :meth:`log_samples`, :meth:`shard_dit`. Each hook's docstring says when it is
called and what it must return; overriding one never requires copying another.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from typing import Any, Literal, TypedDict

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from dmvae_lightning import flow
from dmvae_lightning.checkpoints import load_tokenizer
from dmvae_lightning.distributed import broadcast_tensors
from dmvae_lightning.ema import EMA
from dmvae_lightning.modules.common import (
    EMAInEvaluation,
    build_optimizer,
    build_scheduler,
    drop_callables_from_hparams,
)
from dmvae_lightning.nets.dit import DiT
from dmvae_lightning.nonfinite import NonFiniteGuard, NonFiniteSpec
from dmvae_lightning.utils.compile import compile_module
from dmvae_lightning.utils.rng import step_rng, step_seed

__all__ = ["DiTSpec", "LatentDiffusionModule"]

Sampler = Literal["euler", "heun", "sde"]
_VAL_NOISE_SALT = 0x5EED_0F_7A1  # separates the validation noise stream from training seeds


class DiTSpec(TypedDict, total=False):
    """DiT options (:class:`~dmvae_lightning.nets.dit.DiT`): ``preset`` is a named size
    (``"tiny"``, ``"Mini"``, ``"S"``, ``"B"``, ``"L"``, ``"XL"``, optionally ``"XL/1"``); the other
    keys override it. ``input_size``, ``in_channels``, ``num_classes`` and ``class_dropout_prob``
    come from the module's own arguments."""

    preset: str
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    grad_checkpointing: bool
    use_rope: bool
    use_qknorm: bool
    use_swiglu: bool
    use_rmsnorm: bool
    use_pos_embed: bool
    time_embed_scale: float


class LatentDiffusionModule(EMAInEvaluation, pl.LightningModule):
    """Flow-matching DiT on (normalised) latents, with EMA, CFG sampling and latent statistics.

    Args:
        latent_shape: ``[C, H, W]`` of one raw latent. Left out of a ``dmvae`` config, it is
            taken from ``data.init_args.reference.shape`` (see :mod:`dmvae_lightning.cli`).
        num_classes: real classes (labels in ``[0, num_classes)``); 0 = unconditional. Left out
            of a ``dmvae`` config, it is taken from ``data.init_args.num_classes``.
        dit: :class:`DiTSpec` (default preset ``"tiny"``).
        class_dropout_prob: label-dropout probability in training (trains the null class for CFG).
        input_key: batch key holding latents when no tokenizer encodes images.
        tokenizer_ckpt: DMVAEModule checkpoint of a frozen tokenizer (encode images, decode
            samples). Its weights are never saved in this module's checkpoints.
        encode_images: train on ``encode(batch["image"])`` (True) or on ``batch[input_key]``
            (False); default: True iff ``tokenizer_ckpt`` is set. False with a tokenizer means
            "train on cached latents, decode samples with the tokenizer".
        latent_mean, latent_scale: normalisation ``(z - mean) * scale``; each one left None is
            measured before training (``scale = 1 / sqrt(E[(z - mean)^2])``).
        stats_batches: training batches (per rank) used to measure the statistics.
        time_dist, time_mean, time_std, time_shift: training-time distribution
            (:func:`~dmvae_lightning.flow.sample_t`: uniform or logit-normal, then the shift).
        lr, betas, weight_decay: the default AdamW (paper: 2e-4, (0.9, 0.95), 0).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        ema_decay: EMA decay of the DiT (paper 0.9999); None disables EMA.
        ema_warmup: use the ``min(decay, (1 + n) / (10 + n))`` warm-up of the EMA decay.
        sample_steps, sample_cfg, sampler, sample_shift: defaults of :meth:`sample` (used by
            ``predict``): steps, CFG scale (1 = none), ``"euler"`` | ``"heun"`` | ``"sde"``
            (Euler-Maruyama, last step mean), time shift of the sampling grid.
        num_log_images: samples in the TensorBoard grid at each validation (needs a tokenizer).
        log_sample_steps: Euler steps of that grid.
        seed: seed of the per-step random streams.
        compile: compile the DiT with ``torch.compile``: ``true``, or a mapping of its options
            (:mod:`dmvae_lightning.utils.compile`); in place, so parameter names and checkpoints
            are unchanged. ``compile_backend`` is the backend when the mapping names none.
        fsdp_reshard_after_forward: under FSDP2 (see the module docstring), free each block's
            gathered weights after its forward and gather them again for the backward (True,
            least memory), or keep them until the backward (False: one all-gather per block and
            step fewer, the gathered blocks' memory held in between). Ignored otherwise.
        nonfinite: :class:`~dmvae_lightning.nonfinite.NonFiniteSpec`: a NaN / inf loss or
            gradient stops the run (``mode: stop``, default) or skips the step (``mode: skip``,
            counted, up to ``max_skips``). A checkpoint with non-finite tensors is never written.
        optimizer, scheduler: injected optimizer / learning-rate scheduler of the DiT
            (``lightning.pytorch.cli.OptimizerCallable`` / ``LRSchedulerCallable``, e.g.
            ``{class_path: torch.optim.SGD, init_args: {lr: 0.01}}`` in YAML); None: AdamW with
            ``lr``, ``betas``, ``weight_decay`` (fused on CUDA) and linear warm-up over
            ``warmup_steps``, stepped per optimizer step.
    """

    def __init__(
        self,
        latent_shape: list[int] | None = None,
        num_classes: int | None = None,
        dit: DiTSpec | None = None,
        class_dropout_prob: float = 0.1,
        input_key: str = "reference",
        tokenizer_ckpt: str | None = None,
        encode_images: bool | None = None,
        latent_mean: float | None = None,
        latent_scale: float | None = None,
        stats_batches: int = 20,
        time_dist: Literal["uniform", "logit_normal"] = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float = 1.0,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = False,
        sample_steps: int = 50,
        sample_cfg: float = 1.0,
        sampler: Sampler = "euler",
        sample_shift: float = 1.0,
        num_log_images: int = 16,
        log_sample_steps: int = 25,
        seed: int = 0,
        compile: bool | dict[str, Any] = False,
        compile_backend: str = "inductor",
        fsdp_reshard_after_forward: bool = True,
        nonfinite: NonFiniteSpec | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        drop_callables_from_hparams(self, ("optimizer", "scheduler"))
        self._optimizer_factory, self._scheduler_factory = optimizer, scheduler
        self._check_arguments()
        self.nonfinite_guard = NonFiniteGuard.from_spec(nonfinite)
        self._last_loss: tuple[int, torch.Tensor, dict[str, Any]] | None = None
        self.register_buffer("batch_count", torch.zeros((), dtype=torch.long))
        mean = 0.0 if latent_mean is None else float(latent_mean)
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        scale = 1.0 if latent_scale is None else float(latent_scale)
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))
        ready = latent_mean is not None and latent_scale is not None
        self.register_buffer("stats_ready", torch.tensor(ready))
        self.configure_models()
        compile_module(self.dit, compile, "model.init_args.compile", backend=compile_backend)
        self.ema = EMA(self.dit, decay=ema_decay, warmup=ema_warmup) if ema_decay else None
        self._ema_active = False
        self.encode_images = tokenizer_ckpt is not None if encode_images is None else encode_images
        if self.encode_images and not tokenizer_ckpt:
            raise ValueError(
                "model.init_args.encode_images is true but model.init_args.tokenizer_ckpt is not "
                "set: give the tokenizer checkpoint that encodes batch['image']."
            )
        tokenizer = self.load_tokenizer(tokenizer_ckpt) if tokenizer_ckpt else None
        # Held outside the module tree: not in state_dict, parameters(), DDP or .train()/.to().
        object.__setattr__(self, "_tokenizer", tokenizer)
        if tokenizer is not None:
            channels = getattr(tokenizer, "latent_channels", None)
            if channels is not None and channels != latent_shape[0]:
                raise ValueError(
                    f"model.init_args.latent_shape has {latent_shape[0]} channels but the "
                    f"tokenizer in model.init_args.tokenizer_ckpt makes {channels}-channel latents."
                )

    def _check_arguments(self) -> None:
        hp = self.hparams
        if hp.latent_shape is None:
            raise ValueError(
                "model.init_args.latent_shape is not set: give [C, H, W], or a reference source "
                "with a shape (data.init_args.reference.shape) for the dmvae CLI to link."
            )
        if hp.num_classes is None:
            raise ValueError(
                "model.init_args.num_classes is not set: give it (0 = unconditional), or let the "
                "dmvae CLI link it from data.init_args.num_classes."
            )
        shape = list(hp.latent_shape)
        if len(shape) != 3 or any(int(s) < 1 for s in shape):
            raise ValueError(f"model.init_args.latent_shape must be [C, H, W], got {shape}")
        if hp.num_classes < 0:
            raise ValueError(f"model.init_args.num_classes must be >= 0, got {hp.num_classes}")
        if hp.stats_batches < 1:
            raise ValueError(f"model.init_args.stats_batches must be >= 1, got {hp.stats_batches}")
        if hp.latent_scale is not None and hp.latent_scale <= 0:
            raise ValueError(f"model.init_args.latent_scale must be > 0, got {hp.latent_scale}")
        if hp.sampler not in ("euler", "heun", "sde"):
            raise ValueError(
                f"model.init_args.sampler must be 'euler', 'heun' or 'sde', got {hp.sampler!r}"
            )

    # ------------------------------------------------------------------ hooks: networks
    def configure_models(self) -> None:
        """Called once from ``__init__`` (not Lightning's ``configure_model``, which runs again
        at every ``fit``), before the EMA is built. Must set ``self.dit``: the velocity network
        ``(x, t, y) -> v`` on normalised (B, C, H, W) latents, t (B,) fp32 in [0, 1], y (B,)
        labels (``num_classes`` = null), with ``null_class`` and ``forward_with_cfg(x, t, y,
        cfg)``; returns nothing. Default: :class:`~dmvae_lightning.nets.dit.DiT` from ``dit``."""
        hp = self.hparams
        spec: dict[str, Any] = dict(hp.dit or {})
        preset = spec.pop("preset", "tiny")
        channels, height, width = (int(s) for s in hp.latent_shape)
        try:
            self.dit = DiT.from_preset(
                preset,
                input_size=(height, width),
                in_channels=channels,
                num_classes=hp.num_classes,
                class_dropout_prob=hp.class_dropout_prob,
                **spec,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"model.init_args.dit: {err}") from err

    def configure_model(self) -> None:
        """Lightning calls it in every process before the optimizers are built (again at every
        ``fit`` / ``validate`` / ...). With a device mesh (``ModelParallelStrategy``, e.g.
        ``fsdp2``): rank 0's DiT and EMA are broadcast (all ranks start from the same weights,
        as DDP ensures), :meth:`shard_dit` shards the DiT over the data-parallel mesh and the
        EMA is sharded like it. Without a mesh, or when the DiT is sharded already: nothing."""
        mesh = self.device_mesh
        if mesh is None or self.dit_is_sharded:
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "LatentDiffusionModule has no tensor parallelism: use trainer.strategy fsdp2 "
                "(ModelParallelStrategy with tensor_parallel_size=1)."
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
        self._broadcast_from_first_rank(data_parallel)
        self.shard_dit(data_parallel)
        if self.ema is not None:
            self.ema.shard_like(self.dit)

    def shard_dit(self, mesh: Any) -> None:
        """Called by :meth:`configure_model` under FSDP2 with the data-parallel ``DeviceMesh``.
        Must apply ``fully_shard`` to ``self.dit`` (its parameters become DTensor shards);
        returns nothing. Default: each module of ``self.dit.blocks`` (when present) is one
        shard unit, with ``fsdp_reshard_after_forward``, then the DiT itself (the embedders and
        the final layer: gathered for the whole forward)."""
        from torch.distributed.fsdp import fully_shard

        reshard = self.hparams.fsdp_reshard_after_forward
        for block in getattr(self.dit, "blocks", ()):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(self.dit, mesh=mesh)

    @property
    def dit_is_sharded(self) -> bool:
        """Whether :meth:`shard_dit` has run (the DiT's parameters are DTensor shards)."""
        if not torch.distributed.is_available():
            return False
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.dit, FSDPModule)

    def _broadcast_from_first_rank(self, mesh: Any) -> None:
        """Copy the DiT's tensors and the EMA of the mesh's first rank to the others (each rank
        built its own: different unless seeded alike), through the mesh's device (nccl needs
        GPU tensors)."""
        import torch.distributed as dist

        group = mesh.get_group()
        modules: list[nn.Module] = [self.dit] if self.ema is None else [self.dit, self.ema]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        broadcast_tensors(
            tensors,
            src=dist.get_global_rank(group, 0),
            group=group,
            device=torch.device(mesh.device_type),
        )

    def load_tokenizer(self, path: str) -> nn.Module:
        """Called once from ``__init__`` when ``tokenizer_ckpt`` is set. Must return the frozen
        tokenizer of checkpoint ``path``: a module with ``encode(images) -> raw latents`` and
        ``decode(latents) -> images``, EMA weights in, eval mode, no gradient (it is held
        outside this module's state)."""
        return load_tokenizer(path, option="model.init_args.tokenizer_ckpt")

    @property
    def tokenizer(self) -> nn.Module | None:
        """The frozen tokenizer (None without ``tokenizer_ckpt``), moved to ``self.device``."""
        tok = self.__dict__.get("_tokenizer")
        if tok is not None:
            param = next(tok.parameters(), None)
            if param is not None and param.device != self.device:
                tok.to(self.device)
        return tok

    def _require_tokenizer(self, what: str) -> nn.Module:
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError(
                f"{what} needs a tokenizer: set model.init_args.tokenizer_ckpt to a DMVAEModule "
                "checkpoint."
            )
        return tok

    # ------------------------------------------------------------------ hooks: data
    def get_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Called by every training / validation / test step and by the statistics pass with
        the batch on the module's device. Must return its raw (un-normalised) fp32 latents
        (B, C, H, W) with (C, H, W) = ``latent_shape``. Default: ``encode(batch["image"])``
        when ``encode_images``, else ``batch[input_key]``."""
        if self.encode_images:
            tok = self._require_tokenizer("encode_images")
            with torch.no_grad():
                z = tok.encode(batch["image"])
        else:
            key = self.hparams.input_key
            if key not in batch:
                raise KeyError(
                    f"model.init_args.input_key: the batch has no {key!r} (keys: "
                    f"{sorted(batch)}); set input_key to the key holding latents, or "
                    "model.init_args.tokenizer_ckpt to encode batch['image']."
                )
            z = batch[key]
        z = z.float()
        if tuple(z.shape[1:]) != tuple(self.hparams.latent_shape):
            raise ValueError(
                f"latents of shape {tuple(z.shape[1:])} but model.init_args.latent_shape is "
                f"{list(self.hparams.latent_shape)}; make them equal."
            )
        return z

    def get_labels(self, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Called by every training / evaluation step after :meth:`get_latents` (``n`` = its
        batch size). Must return (n,) int64 labels on the module's device, ``num_classes`` for
        the null class. Default: ``batch["label"]``, or all null when unconditional
        (``num_classes`` 0); a class-conditional model's batches must hold labels."""
        labels = batch.get("label")
        if self.hparams.num_classes == 0:
            return torch.full((n,), self.dit.null_class, dtype=torch.long, device=self.device)
        if labels is None:
            raise ValueError(
                f"model.init_args.num_classes is {self.hparams.num_classes} but the batch has no "
                f"'label' (keys {sorted(batch)}): give the data labels, or set num_classes: 0 "
                "for an unconditional model"
            )
        return labels.long()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Called on the latents of every step (after :meth:`get_latents`). Must return them
        in the DiT's space, fp32, same shape. Default: ``(z - latent_mean) * latent_scale``."""
        return (z.float() - self.latent_mean.float()) * self.latent_scale.float()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Called on the result of every :meth:`sample`. Must return the inverse of
        :meth:`normalize` (fp32, same shape). Default: ``x / latent_scale + latent_mean``."""
        return x.float() / self.latent_scale.float() + self.latent_mean.float()

    # ------------------------------------------------------------------ hooks: the loss
    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        """Called once per training batch by :meth:`training_loss` (``n`` = batch size), under
        the global RNG that ``training_step`` seeds per batch (draw from it, and resumed runs
        repeat the draws). Must return (n,) fp32 times in [0, 1] on ``device`` (t = 1 data,
        t = 0 noise). Default: :func:`flow.sample_t` with the ``time_*`` options
        (``examples/plugin_project`` overrides only this hook for stratified times)."""
        hp = self.hparams
        return flow.sample_t(
            n, device, dist=hp.time_dist, mean=hp.time_mean, std=hp.time_std, shift=hp.time_shift
        )

    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called once per training batch (under the per-batch seeded global RNG) with
        normalised latents ``x`` (B, C, H, W) and labels ``y`` (B,). Must return ``(scalar fp32
        loss, dict of detached logs)``; Lightning back-propagates the loss. Default: the
        flow-matching velocity loss with t from :meth:`sample_time`, noise and label dropout
        (DiT in train mode) from the global RNG."""
        t = self.sample_time(x.shape[0], x.device)
        loss, _ = flow.velocity_loss(self.dit, x, y, t=t)
        return loss, {"train/loss": loss.detach()}

    # ------------------------------------------------------------------ latent statistics
    def stats_dataloader(self) -> Iterable[Any]:
        """Called once at the start of ``fit`` when ``latent_mean`` / ``latent_scale`` are not
        known yet. Must return an iterable of batches (moved to the device as in training, so
        the reference feeder runs). Default: a copy of this ``fit``'s training loader (same
        data set, batch size and a copy of its sampler, so each rank measures its own shard) in
        the main process. Not the loader itself: with persistent workers a second iteration
        restarts the iterator the fit loop is consuming, which silently shortened the first
        epoch by the statistics batches (to nothing when the epoch is that short)."""
        loader = self.trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "measuring latent statistics needs one training DataLoader; override "
                "stats_dataloader() or set model.init_args.latent_mean and latent_scale."
            )
        if loader.batch_size is None:  # a batch sampler of its own
            batching: dict[str, Any] = {"batch_sampler": copy.copy(loader.batch_sampler)}
        else:
            batching = {
                "batch_size": loader.batch_size,
                "sampler": copy.copy(loader.sampler),
                "drop_last": loader.drop_last,
            }
        return DataLoader(loader.dataset, collate_fn=loader.collate_fn, num_workers=0, **batching)

    @torch.no_grad()
    def measure_latent_stats(self, batches: Iterable[Any] | None = None) -> tuple[float, float]:
        """Measure (and store) the statistics over the first ``stats_batches`` batches.

        Sums of count, z and z^2 are fp64 and summed over ranks. Only the statistics not fixed
        by the config are replaced. Returns ``(latent_mean, latent_scale)``."""
        hp = self.hparams
        batches = self.stats_dataloader() if batches is None else batches
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        trainer = self._trainer
        context = (
            trainer.precision_plugin.forward_context()
            if trainer is not None
            else contextlib.nullcontext()
        )
        with context:
            for index, batch in enumerate(batches):
                if index >= hp.stats_batches:
                    break
                z = self.get_latents(self._to_device(batch)).double()
                sums += torch.stack([z.new_tensor(z.numel()), z.sum(), z.square().sum()])
        if trainer is not None:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        count, total, squares = sums.tolist()
        if count == 0:
            raise RuntimeError("the statistics pass saw no batch; is the training loader empty?")
        mean = total / count if hp.latent_mean is None else float(hp.latent_mean)
        if hp.latent_scale is None:
            second = squares / count - 2.0 * mean * total / count + mean * mean
            if second <= 0:
                raise RuntimeError("latents have zero variance; cannot set latent_scale")
            scale = 1.0 / math.sqrt(second)
        else:
            scale = float(hp.latent_scale)
        self.latent_mean.fill_(mean)
        self.latent_scale.fill_(scale)
        self.stats_ready.fill_(True)
        rank_zero_info(
            f"latent statistics over {int(count)} values: latent_mean={mean:.6g}, "
            f"latent_scale={scale:.6g} (std {1.0 / scale:.6g})"
        )
        return mean, scale

    def _to_device(self, batch: Any) -> Any:
        """Move a batch as training does: through the strategy, so the DataModule's and this
        module's batch-transfer hooks run (e.g. the reference feeder adds ``"reference"``)."""
        trainer = self._trainer
        if trainer is None:
            return move_data_to_device(batch, self.device)
        return trainer.strategy.batch_to_device(batch, self.device)

    def on_fit_start(self) -> None:
        """With a tokenizer and training latents read from a latent cache, check that the cache
        was encoded by that tokenizer checkpoint (a stale cache is an error, not a silent
        mismatch between training latents and decoded samples)."""
        ckpt = self.hparams.tokenizer_ckpt
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_set", None)
        while isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
        if ckpt and not self.encode_images and hasattr(dataset, "check_tokenizer"):
            dataset.check_tokenizer(ckpt, option="model.init_args.tokenizer_ckpt")

    def on_train_start(self) -> None:
        """Measure the latent statistics before the first step unless known (config or
        checkpoint)."""
        if not bool(self.stats_ready):
            self.measure_latent_stats()

    # ------------------------------------------------------------------ EMA
    @contextlib.contextmanager
    def ema_scope(self):
        """Swap the DiT's EMA weights in for the block (no-op without EMA or when active)."""
        if self.ema is None or self._ema_active:
            yield
            return
        self._ema_active = True
        try:
            with self.ema.scope(self.dit):
                yield
        finally:
            self._ema_active = False

    # ------------------------------------------------------------------ Lightning: training
    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(
            self._optimizer_factory, self.dit.parameters(), hp.lr, hp.betas, hp.weight_decay
        )
        sched = build_scheduler(self._scheduler_factory, opt, hp.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = int(self.batch_count)
        with step_rng(self.hparams.seed, step, self.global_rank, self.device):
            x = self.normalize(self.get_latents(batch))
            y = self.get_labels(batch, x.shape[0])
            loss, logs = self.training_loss(x, y)
        # checked after the backward (on_before_optimizer_step), when every rank gets there: a
        # skipped step drops the gradients (returning None is refused under DDP)
        self._last_loss = (step, loss.detach(), dict(logs))
        if self.nonfinite_guard.skips:
            logs["train/nonfinite_skips"] = torch.tensor(float(self.nonfinite_guard.skips))
        self.batch_count += 1
        logs["train/lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=x.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite check (``nonfinite``) of the loss logged by the last training step and
        of the gradients: stop, or skip the step (every gradient set to None: AdamW then leaves
        weights and state as they are)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        step, loss, logs = self._last_loss or (int(self.batch_count) - 1, None, None)
        self._last_loss = None
        if not self.nonfinite_guard.check_step(self, step, "DiT", loss, logs, params):
            for p in params:
                p.grad = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint with non-finite tensors (``nonfinite``); keep the count
        of skipped steps."""
        self.nonfinite_guard.check_checkpoint(checkpoint, self._trainer)
        checkpoint["nonfinite_skips"] = self.nonfinite_guard.skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_guard.skips = int(checkpoint.get("nonfinite_skips", 0))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (once per step, also with accumulation)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.dit)

    # ------------------------------------------------------------------ Lightning: evaluation
    def validation_noise(
        self, shape: torch.Size, batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed ``(t, eps)`` for validation batch ``batch_idx``: t on the stratified grid
        ``(i + 0.5) / B``, eps from a generator seeded by ``(seed, batch_idx, rank)``, so the
        validation loss of different epochs is comparable. fp32 on ``self.device``."""
        n = shape[0]
        t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        seed = step_seed(self.hparams.seed ^ _VAL_NOISE_SALT, batch_idx, self.global_rank)
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        return t.to(self.device), eps.to(self.device)

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        x = self.normalize(self.get_latents(batch))
        y = self.get_labels(batch, x.shape[0])
        t, eps = self.validation_noise(x.shape, batch_idx)
        loss, _ = flow.velocity_loss(self.dit, x, y, t=t, eps=eps)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        if batch_idx == 0:
            self.log_samples(stage)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """Samples for the batch's labels with the ``sample_*`` defaults (EMA weights; noise
        seeded by ``(seed, batch_idx, rank)``). Returns ``{"label": (B,), "latent": (B, C, H,
        W) raw}`` plus ``"image"`` (B, C_img, H_img, W_img) in [-1, 1] with a tokenizer."""
        n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        labels = self.get_labels(batch, n)
        gen = torch.Generator().manual_seed(
            step_seed(self.hparams.seed, batch_idx, self.global_rank)
        )
        z = self.sample(labels, generator=gen)
        out = {"label": labels, "latent": z}
        if self.tokenizer is not None:
            out["image"] = self.decode(z).clamp(-1, 1)
        return out

    # ------------------------------------------------------------------ sampling
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Called by :meth:`sample` with ``decode=True`` (``predict``, the sample grid). Must
        return images (B, C_img, H_img, W_img) of raw latents (B, C, H, W). Default: the
        frozen tokenizer's ``decode``."""
        with torch.no_grad():
            return self._require_tokenizer("decode").decode(z)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: Sampler | None = None,
        shift: float | None = None,
        generator: torch.Generator | None = None,
        decode: bool = False,
        noise: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate from noise with the EMA DiT. Called by ``predict_step``, the validation
        sample grid and user code; returns what ``Returns`` says below. With a sharded DiT
        (FSDP2) every rank must call it alike: each forward gathers weights from all ranks.

        Args:
            labels: (B,) int64 classes; ``num_classes`` (the null class) samples unconditionally.
            steps, cfg, sampler, shift: default to ``sample_steps``, ``sample_cfg``,
                ``sampler``, ``sample_shift``. ``cfg`` is the guidance scale (1 = none; cond and
                null in one batched forward otherwise). ``sampler``: ``"euler"`` / ``"heun"``
                ODE or ``"sde"`` (Euler-Maruyama with the sigma diffusion, last step mean).
            generator: source of the initial noise (and of the SDE noise); a CPU generator
                gives the same samples on every device.
            decode: return decoded images instead of latents (needs a tokenizer).
            noise: (B, C, H, W) initial noise in the DiT's (normalised) space, instead of drawing.

        Returns:
            Raw latents (B, C, H, W) fp32, or images (B, C_img, H_img, W_img) when ``decode``.
        """
        hp = self.hparams
        steps = hp.sample_steps if steps is None else steps
        cfg = hp.sample_cfg if cfg is None else cfg
        sampler = hp.sampler if sampler is None else sampler
        shift = hp.sample_shift if shift is None else shift
        labels = torch.as_tensor(labels, device=self.device).long()
        n = labels.shape[0]
        shape = (n, *(int(s) for s in hp.latent_shape))
        if noise is None:
            noise_device = generator.device if generator is not None else self.device
            noise = torch.randn(shape, generator=generator, device=noise_device)
        noise = noise.to(self.device, torch.float32)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.dit.forward_with_cfg(x, t, labels, cfg)

        with self.ema_scope():
            if sampler == "euler":
                x = flow.euler_sample(velocity, noise, steps, shift, progress=progress)
            elif sampler == "heun":
                x = flow.heun_sample(velocity, noise, steps, shift, progress=progress)
            elif sampler == "sde":
                sde_gen = None
                if generator is not None:
                    sde_gen = torch.Generator(self.device).manual_seed(
                        int(
                            torch.randint(1 << 62, (), generator=generator, device=generator.device)
                        )
                    )
                x = flow.euler_maruyama_sample(
                    velocity, noise, steps, shift, generator=sde_gen, progress=progress
                )
            else:
                raise ValueError(f"sampler must be 'euler', 'heun' or 'sde', got {sampler!r}")
        z = self.denormalize(x)
        return self.decode(z) if decode else z

    def log_samples(self, stage: str) -> None:
        """Called on the first batch of every validation and test epoch (``stage`` ``"val"`` /
        ``"test"``, EMA weights in). Returns nothing.
        Default: a grid of ``num_log_images`` decoded samples (labels 0, 1, ...; fixed noise) to
        TensorBoard; rank 0 only (every rank samples when the DiT is sharded: its forward is a
        collective); skipped without tokenizer, statistics or an image logger."""
        n = self.hparams.num_log_images
        logger = self.logger
        if (
            n <= 0
            or (self.global_rank != 0 and not self.dit_is_sharded)
            or self.tokenizer is None
            or not bool(self.stats_ready)
            or logger is None
            or not hasattr(logger.experiment, "add_image")
        ):
            return
        num_classes = self.hparams.num_classes
        labels = torch.arange(n) % num_classes if num_classes else torch.zeros(n, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.hparams.seed)
        images = self.sample(
            labels, steps=self.hparams.log_sample_steps, sampler="euler", generator=gen, decode=True
        )
        if self.global_rank != 0:
            return
        grid = torchvision.utils.make_grid(
            images.clamp(-1, 1).float().cpu(),
            nrow=max(1, int(math.sqrt(n))),
            normalize=True,
            value_range=(-1, 1),
        )
        logger.experiment.add_image(f"{stage}/samples", grid, self.global_step)
