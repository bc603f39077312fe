"""Feature networks for FID / IS behind one interface.

Every extractor is a frozen, eval-mode :class:`FeatureExtractor`: images (B, C, H, W) in [-1, 1]
-> features (B, D) from ``forward``, and ``features_and_logits`` -> ``(features, logits or
None)`` for the Inception Score. ``identity`` names the network *and its weights* (a hash of the
weights file) and keys the cached real-image statistics (:mod:`dmvae_lightning.metrics.stats`).

* :class:`InceptionFeatures`: torch-fidelity's TF-Inception (``inception-v3-compat``: the network
  of published FID / IS numbers), 2048-d pool features and the 1008 ``logits_unbiased`` that
  torch-fidelity's IS uses. Weights come from a local file (``weights_path``) or the torch hub
  cache; there is no download (a missing file is a FileNotFoundError naming the option).
* :class:`DomainFeatures`: the offline Fashion-MNIST network (a ClassifierModule checkpoint of
  ``configs/fashion_mnist/fid_net.yaml``): pooled embedding and its 10 class logits.
* :class:`FidelityFeatures`: any torch-fidelity ``FeatureExtractorBase`` instance (uint8 input),
  the base of :class:`InceptionFeatures`.

:func:`build_extractor` chooses one from a config: ``{name: inception, weights_path: ...}`` or
``{name: domain, checkpoint: ...}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmvae_lightning.checkpoints import load_classifier
from dmvae_lightning.metrics.fid import FeatureStats, feature_stats

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "DomainFeatures",
    "FeatureExtractor",
    "FidelityFeatures",
    "InceptionFeatures",
    "build_extractor",
    "file_digest",
    "save_random_inception_weights",
    "to_uint8",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""File name of torch-fidelity's TF-Inception weights in ``$TORCH_HOME/hub/checkpoints``."""


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) -> uint8 pixels, rounded to nearest (the same values
    ``torchvision.utils.save_image`` writes to a PNG for ``(images + 1) / 2``)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def file_digest(path: str | Path, length: int = 16) -> str:
    """Leading ``length`` hex digits of the SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


class FeatureExtractor(nn.Module):
    """Base of the feature networks: frozen, always in eval mode, no gradients.

    Subclasses implement :meth:`features_and_logits` and set ``identity`` (a string that changes
    whenever the features would) and ``num_features``."""

    identity: str = "unnamed"
    num_features: int = 0

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) in [-1, 1] -> (features (B, D) fp32, logits (B, K) or None)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def extract(
        self, batches: Iterable[torch.Tensor], logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (N, D) (and logits (N, K) when ``logits``) of image batches in [-1, 1],
        concatenated on the CPU."""
        feats, logs = [], []
        for batch in batches:
            f, lg = self.features_and_logits(batch.to(self.device))
            feats.append(f.float().cpu())
            if logits:
                if lg is None:
                    raise ValueError(f"the {self.identity} extractor has no logits (no IS)")
                logs.append(lg.float().cpu())
        if not feats:
            raise ValueError("no images to extract features from")
        return torch.cat(feats), torch.cat(logs) if logits else None

    @torch.no_grad()
    def stats(
        self, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 500
    ) -> FeatureStats:
        """:class:`FeatureStats` of images (N, C, H, W) in [-1, 1] (or an iterable of batches)."""
        if isinstance(images, torch.Tensor):
            images = images.split(batch_size)
        return feature_stats(self(batch.to(self.device)) for batch in images)


class FidelityFeatures(FeatureExtractor):
    """A torch-fidelity feature extractor behind the [-1, 1] interface.

    Images are rounded to uint8 (:func:`to_uint8`; what torch-fidelity reads from PNG files) and
    grey images repeated to 3 channels; ``feature_layer`` gives the features, ``logits_layer``
    (optional) the logits.

    Args:
        extractor: a ``torch_fidelity.feature_extractor_base.FeatureExtractorBase`` whose
            ``features_list`` holds ``feature_layer`` (and ``logits_layer``).
        identity: cache identity of the network and its weights.
    """

    def __init__(
        self,
        extractor: nn.Module,
        feature_layer: str,
        identity: str,
        logits_layer: str | None = None,
        num_features: int = 0,
    ) -> None:
        super().__init__()
        layers = list(extractor.features_list)
        for layer in (feature_layer, logits_layer):
            if layer is not None and layer not in layers:
                raise ValueError(f"feature layer {layer!r} not among the extractor's {layers}")
        self.net = extractor.requires_grad_(False).eval()
        self.feature_index = layers.index(feature_layer)
        self.logits_index = None if logits_layer is None else layers.index(logits_layer)
        self.identity = identity
        self.num_features = num_features

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
        pixels = to_uint8(images)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        out = self.net(pixels.contiguous())
        logits = None if self.logits_index is None else out[self.logits_index].float()
        return out[self.feature_index].float(), logits


def _inception_weights(weights_path: str | Path | None, option: str) -> Path:
    if weights_path is not None:
        file = Path(weights_path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"{option}: Inception weights file {str(file)!r} does not exist. Point it at "
                f"torch-fidelity's {INCEPTION_WEIGHTS_FILE}."
            )
        return file
    file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{option} is not set and the torch hub cache has no {str(file)!r}; nothing is "
            f"downloaded. Set {option} to a local copy of {INCEPTION_WEIGHTS_FILE} (from "
            "github.com/toshas/torch-fidelity/releases) or place the file in the hub cache."
        )
    return file


class InceptionFeatures(FidelityFeatures):
    """torch-fidelity's TF-Inception-v3 (the FID / IS network): 2048-d pool features and
    ``logits_unbiased`` (B, 1008), on images in [-1, 1] of any size (resized to 299 inside, as
    torch-fidelity does).

    Args:
        weights_path: local weights file; None looks in ``$TORCH_HOME/hub/checkpoints``. The file
            is opened with ``weights_only=True`` first (no code runs from it).
        option: the config option naming ``weights_path``, for the error messages.
        feature_layer: ``"2048"`` (FID), or ``"768"`` / ``"192"`` / ``"64"``.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        option: str = "extractor.weights_path",
        feature_layer: str = "2048",
    ) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        file = _inception_weights(weights_path, option)
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not a plain state dict"
            raise ValueError(
                f"{option}: {str(file)!r} is not a loadable state dict: {err}"
            ) from err
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            [feature_layer, "logits_unbiased"],
            feature_extractor_weights_path=str(file),
        )
        super().__init__(
            net,
            feature_layer,
            identity=f"inception-v3-compat/{feature_layer}/{file_digest(file)}",
            logits_layer="logits_unbiased",
            num_features=int(feature_layer),
        )
        self.weights_path = str(file)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised TF-Inception state dict to ``path``: a stand-in for the real
    weights (which cannot be downloaded here) to test the plumbing and time the network. Numbers
    computed with it mean nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        for layer in net.modules():  # He init keeps activations O(1) through the 94 conv layers
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    empty.unlink()
    torch.save(net.state_dict(), path)
    return path


class DomainFeatures(FeatureExtractor):
    """Pooled features (B, D) and class logits of a trained ClassifierModule checkpoint (the
    offline domain feature network, ``configs/fashion_mnist/fid_net.yaml``), frozen, in eval mode.

    Input images (B, C, H, W) in [-1, 1], as the classifier was trained on. ``option`` names the
    config option giving ``checkpoint`` in error messages."""

    def __init__(self, checkpoint: str | Path, option: str = "fid_net") -> None:
        super().__init__()
        self.net = load_classifier(checkpoint, option=option).requires_grad_(False).eval()
        self.identity = f"domain/{file_digest(checkpoint)}"
        self.num_features = int(self.net.out_dim)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.net.embed(images.float().clamp(-1, 1))
        return features, self.net.head(features)


def build_extractor(
    spec: str | Mapping[str, Any] | FeatureExtractor, option: str = "extractor"
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a config value.

    ``spec``: an extractor (returned as is); ``"inception"`` (weights from the hub cache);
    ``{"name": "inception", "weights_path": PATH}``; ``{"name": "domain", "checkpoint": PATH}``.
    ``option`` prefixes the option names in error messages."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", "inception")
    if name == "inception":
        unknown = set(spec) - {"weights_path", "feature_layer"}
        if not unknown:
            return InceptionFeatures(option=f"{option}.weights_path", **spec)
    elif name == "domain":
        unknown = set(spec) - {"checkpoint"}
        if "checkpoint" not in spec:
            raise ValueError(f"{option}: the domain extractor needs `checkpoint` (fid_net.yaml)")
        if not unknown:
            return DomainFeatures(spec["checkpoint"], option=f"{option}.checkpoint")
    else:
        raise ValueError(f"{option}.name must be 'inception' or 'domain', got {name!r}")
    raise ValueError(f"{option}: unknown keys {sorted(unknown)} for the {name} extractor")
