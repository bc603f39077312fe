"""The shared pieces of every reference source: the :class:`Draw` request, the
:class:`SourceContext` a data module gives, and the :class:`ReferenceSource` base class."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "Draw",
    "OPTION",
    "ReferenceSource",
    "SourceContext",
    "orthogonal_projection",
]

OPTION = "data.init_args.reference"


# --------------------------------------------------------------------------------- requests
def _no_context() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Draw:
    """A request for ``n`` reference samples.

    Attributes:
        n: number of samples.
        generator: the only source of randomness; lives on ``device``.
        labels: (n,) int64 image labels on ``device`` (class-conditional sources need them).
        images: (n, C_img, H_img, W_img) float images in [-1, 1] on ``device`` (feature sources).
        indices: (n,) int64 positions of the images in the training set (feature-cache rows);
            None for images outside it (no caching).
        forward_context: returns the context networks run in (e.g. the trainer's autocast).
    """

    n: int
    generator: torch.Generator
    labels: torch.Tensor | None = None
    images: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    forward_context: Callable[[], contextlib.AbstractContextManager] = _no_context

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal float32 noise of ``shape`` on ``device``."""
        return torch.randn(shape, generator=self.generator, device=self.device)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _noop() -> None:
    return None


@dataclass
class SourceContext:
    """What a source may need from the data module, given once to :meth:`ReferenceSource.prepare`.

    Attributes:
        image_channels: channels of the images (encoders repeat 1 to 3 channels).
        num_classes: image classes; class-conditional sources check against it.
        class_names: names of the image classes (text captions), or None.
        train_set: the training set (items with ``"image"``; feature-cache rows are positions in
            it; PCA fits on its first items); None outside ``fit``.
        dataset_id: a description of the training images (part of the feature-cache key).
        local_zero: this process creates shared files (one process per machine).
        barrier: waits for every process (after shared files are created).
        broadcast: returns rank 0's copy of a tensor (fitted reductions agree across ranks).
    """

    image_channels: int = 3
    num_classes: int = 0
    class_names: list[str] | None = None
    train_set: Dataset | None = None
    dataset_id: str = ""
    local_zero: bool = True
    barrier: Callable[[], None] = _noop
    broadcast: Callable[[torch.Tensor], torch.Tensor] = _identity


# --------------------------------------------------------------------------------- helpers
def _check_shape(shape: Any, option: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"`{option}.shape` must be [C, H, W] with positive sizes, got {shape!r}")
    return dims  # type: ignore[return-value]


def orthogonal_projection(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """A fixed random ``(out_dim, in_dim)`` float32 matrix with orthonormal rows (``out_dim <=
    in_dim``) or orthonormal columns (``out_dim > in_dim``): the Q factor of a seeded Gaussian
    matrix, signs fixed so that R has a positive diagonal. A pure function of its arguments."""
    generator = torch.Generator().manual_seed(seed)
    tall = torch.randn(max(out_dim, in_dim), min(out_dim, in_dim), generator=generator).double()
    q, r = torch.linalg.qr(tall)
    q = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).float()
    return q.T.contiguous() if out_dim <= in_dim else q.contiguous()


def _move(module: nn.Module, device: torch.device) -> nn.Module:
    param = next(module.parameters(), None)
    if param is None:
        param = next(module.buffers(), None)
    if param is not None and param.device != device:
        module.to(device)
    return module


# --------------------------------------------------------------------------------- base class
class ReferenceSource:
    """Base class: ``shape`` ``(C, H, W)``, ``num_classes`` of the labels it returns (0 = none),
    ``uses_images`` (needs ``Draw.images``), ``uses_labels`` (needs ``Draw.labels``), ``name``
    (stored in checkpoints; a resumed run must use a source of the same name).

    Subclasses implement :meth:`draw`; :meth:`prepare` runs once per process before the first
    draw (load networks, open files); :meth:`state_dict` holds fitted state that checkpoints
    must carry (rank-independent). A subclass's ``__init__`` takes ``shape`` (and, optionally,
    ``option``, the setting's name for error messages) plus its own typed arguments, which a
    ``dmvae`` config gives under ``init_args`` (see the module docstring)."""

    name = "source"
    uses_images = False
    uses_labels = False

    def __init__(self, shape: Any, option: str = OPTION) -> None:
        self.shape = _check_shape(shape, option)
        self.option = option
        self.num_classes = 0

    def prepare(self, context: SourceContext) -> None:
        """Called once per process and stage set-up (the data module's ``setup``, or the first
        feed), before any :meth:`draw`: load networks, open files, fit reductions, check
        ``context`` (classes, image channels). Must be idempotent; returns nothing. Default:
        nothing to do."""

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Called once per batch (training and held-out feeds) in the training process.

        Must return ``(z, y)``: ``z`` float32 ``(request.n, *self.shape)`` on
        ``request.device``, ``y`` int64 ``(request.n,)`` labels or None; all randomness from
        ``request.generator`` (so streams are reproducible and resume exactly)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Called when a checkpoint is written (rank 0's copy is saved). Must return the fitted
        state a resumed run needs, the same on every rank (default: ``{}``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Called when a checkpoint is restored, with what :meth:`state_dict` returned
        (default: nothing to restore)."""

    def _labels(self, request: Draw) -> torch.Tensor:
        if request.labels is None:
            raise ValueError(
                f"the {self.name!r} reference source (`{self.option}`) is class-conditional and "
                "needs the batch's 'label'; the batch has none"
            )
        labels = request.labels.to(request.device).long()
        if labels.shape != (request.n,):
            raise ValueError(f"labels must have shape ({request.n},), got {tuple(labels.shape)}")
        return labels
