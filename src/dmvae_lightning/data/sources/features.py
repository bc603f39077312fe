"""``timm`` / ``checkpoint``: features of a frozen encoder on the batch images, reduced to
the latent shape, optionally cached on disk (:class:`FeatureCache`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmvae_lightning.checkpoints import file_sha256, load_tokenizer
from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
    SourceContext,
    _move,
    _noop,
    orthogonal_projection,
)
from dmvae_lightning.latents import cache_fingerprint

__all__ = [
    "CheckpointFeatureSource",
    "EncoderFeatureSource",
    "FeatureCache",
    "TimmFeatureSource",
]


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
    """Latents ``encode(images)`` (encoder + bottleneck, EMA weights) of a project DMVAEModule
    checkpoint, loaded by :func:`~dmvae_lightning.checkpoints.load_tokenizer`."""

    name = "checkpoint"

    def __init__(self, shape: Any, checkpoint: str, option: str = OPTION, **kwargs: Any) -> None:
        super().__init__(shape, option=option, **kwargs)
        if not Path(checkpoint).expanduser().is_file():
            raise FileNotFoundError(
                f"`{option}.checkpoint` {checkpoint!r} does not exist; give a DMVAEModule .ckpt"
            )
        self.checkpoint = str(Path(checkpoint).expanduser())

    def build_encoder(self, context: SourceContext) -> nn.Module:
        return load_tokenizer(self.checkpoint, option=f"{self.option}.checkpoint")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)

    def encoder_identity(self) -> dict[str, Any]:
        return {"checkpoint_sha256": file_sha256(self.checkpoint)}


# --------------------------------------------------------------------------------- factory
