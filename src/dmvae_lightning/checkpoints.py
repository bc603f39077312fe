"""Checkpoint files -> plain ``nn.Module``s: the one place where the project reads checkpoints.

Every stage reads the previous stage's checkpoint by path; this module turns such a file into the
network it holds, with no LightningModule involved, so nets, losses, sources and metrics stay
usable without Lightning (they take the modules returned here):

* :func:`load_tokenizer` - a DMVAEModule checkpoint -> frozen
  :class:`~dmvae_lightning.nets.tokenizer.Tokenizer` (EMA weights, eval mode);
* :func:`load_tokenizer_state` - the tokenizer / discriminator / EMA tensors of a DMVAEModule
  checkpoint (what ``init_from`` starts a stage from);
* :func:`load_score_model` - a LatentDiffusionModule checkpoint -> :class:`ScoreModel`: the
  frozen DiT velocity network (EMA weights) with its latent statistics and the file's sha256;
* :func:`load_classifier` - a ClassifierModule checkpoint -> frozen
  :class:`~dmvae_lightning.nets.classifier.ConvClassifier`;
* :func:`build_encoder` - an encoder spec (``model.init_args.encoder``) -> encoder, reading the
  classifier file of ``name: classifier``.

Files are read with ``torch.load(..., weights_only=True)``. Every failure is a
:class:`CheckpointError` (a ``ValueError``; :class:`CheckpointNotFoundError` is also a
``FileNotFoundError``) whose message names the option that gave the path, the file and the
problem: missing, truncated or corrupt, the wrong kind of checkpoint, or weights that do not fit.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmvae_lightning.nets.classifier import ConvClassifier
from dmvae_lightning.nets.decoder import Decoder
from dmvae_lightning.nets.dit import DiT
from dmvae_lightning.nets.encoders import ClassifierEncoder, MLPBottleneck
from dmvae_lightning.nets.encoders import build_encoder as build_net_encoder
from dmvae_lightning.nets.tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ScoreModel",
    "build_decoder",
    "build_encoder",
    "build_tokenizer",
    "file_sha256",
    "load_classifier",
    "load_score_model",
    "load_tokenizer",
    "load_tokenizer_state",
    "read_checkpoint",
    "state_dict_sha256",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: ``"<option>: <file>: <problem>"`` (one or two lines).

    Attributes: ``option`` (the setting that gave the path, e.g.
    ``model.init_args.init_from``), ``file`` and ``problem``."""

    def __init__(self, option: str, file: str | os.PathLike, problem: str) -> None:
        self.option, self.file, self.problem = option, str(file), problem
        super().__init__(f"{option}: {str(file)!r} {problem}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


# ---------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hex sha256 over a module's state dict: sorted names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- reading
def read_checkpoint(
    path: str | os.PathLike,
    option: str,
    hint: str = "fix the path",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` as a dict, or a :class:`CheckpointError` naming
    ``option``: the file is missing (``hint`` says what to do), truncated or corrupt, or not a
    weights-only checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointNotFoundError(option, file, f"does not exist; {hint}.")
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():
            problem = "holds Python objects a weights-only load refuses (not a checkpoint of this project)"
        else:
            problem = "is truncated or corrupt (not a readable torch checkpoint)"
        raise CheckpointError(option, file, problem) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(option, file, f"is truncated or corrupt ({first[:160]})") from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(option, file, f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    return dict(ckpt)


def _state(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    return ckpt.get("state_dict", ckpt)


def _prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _hparams(ckpt: Mapping[str, Any], accepted: set[str]) -> dict[str, Any]:
    return {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k in accepted}


def _load_weights(
    module: nn.Module, weights: Mapping[str, torch.Tensor], option: str, file: Path, what: str
) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            option, file, f"does not fit the {what} its hyperparameters describe:\n  {detail[:300]}"
        ) from err


def _apply_ema(module: nn.Module, state: Mapping[str, Any], prefix: str = "ema.") -> None:
    """Copy the EMA buffers (``<prefix><param name, '.' -> '__'>``) over the parameters."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            ema = state.get(prefix + name.replace(".", "__"))
            if ema is not None:
                param.copy_(ema)


def _freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------- classifier
# ConvClassifier's constructor arguments (the names its `config` records), read from the
# ClassifierModule's hyperparameters
_CLASSIFIER_ARGS = set(inspect.signature(ConvClassifier).parameters)


def load_classifier(path: str | os.PathLike, option: str = "weights_path") -> ConvClassifier:
    """The :class:`ConvClassifier` of a ClassifierModule checkpoint (its ``net.*`` weights), in
    eval mode, on CPU. ``option`` names the setting that gave ``path``."""
    file = Path(path).expanduser()
    hint = (
        "train it with `dmvae fit --config configs/fashion_mnist/classifier.yaml` or fix the path"
    )
    ckpt = read_checkpoint(file, option, hint)
    weights = _prefixed(_state(ckpt), "net.")
    if not weights:
        raise CheckpointError(
            option, file, "holds no `net.*` weights: not a ClassifierModule checkpoint"
        )
    net = ConvClassifier(**_hparams(ckpt, _CLASSIFIER_ARGS))
    _load_weights(net, weights, option, file, "classifier")
    return net.eval()


# ---------------------------------------------------------------------------------- tokenizer
_TOKENIZER_ARGS = {
    "image_channels",
    "latent_channels",
    "encoder",
    "bottleneck_hidden",
    "bottleneck_gaussian",
    "decoder",
}


def build_encoder(
    spec: Mapping[str, Any] | None,
    image_channels: int,
    option: str = "model.init_args.encoder",
) -> nn.Module:
    """The encoder of a DMVAEModule ``encoder`` spec (``name`` defaults to ``"conv"``,
    ``in_channels`` to ``image_channels``, ``timm_kwargs`` are merged in). ``name: classifier``
    reads the ClassifierModule checkpoint ``weights_path`` (:func:`load_classifier`). A spec
    saved in a DMVAEModule checkpoint also holds ``arch``, that classifier's
    :attr:`~dmvae_lightning.nets.classifier.ConvClassifier.config`: when ``weights_path`` no
    longer exists, the network is built from ``arch`` with untrained weights, for the caller
    that loads the checkpoint's own copy of them (:func:`load_tokenizer`,
    ``DMVAEModule.load_from_checkpoint``), so a tokenizer checkpoint loads without its
    classifier file."""
    kwargs: dict[str, Any] = {"name": "conv", **(spec or {})}
    kwargs.update(kwargs.pop("timm_kwargs", None) or {})
    if kwargs["name"] == "classifier":
        kwargs.pop("name")
        path = kwargs.pop("weights_path", None)
        arch = kwargs.pop("arch", None)
        if arch is not None and not (path and Path(path).expanduser().is_file()):
            try:
                net = ConvClassifier(**arch).eval()  # as load_classifier returns it
            except (TypeError, ValueError) as err:
                raise TypeError(f"{option}.arch: {err}") from err
        elif not path:
            raise CheckpointNotFoundError(
                f"{option}.weights_path", "<not set>", "is needed by the classifier encoder."
            )
        else:
            net = load_classifier(path, option=f"{option}.weights_path")
        kwargs.setdefault("in_channels", image_channels)
        try:
            return ClassifierEncoder(net, **kwargs)
        except TypeError as err:
            raise TypeError(f"{option}: {err}") from err
    kwargs.setdefault("in_channels", image_channels)
    return build_net_encoder(kwargs)


def build_decoder(
    spec: Mapping[str, Any] | None,
    latent_channels: int,
    image_channels: int,
    option: str = "model.init_args.decoder",
) -> Decoder:
    """The :class:`~dmvae_lightning.nets.decoder.Decoder` of a DMVAEModule ``decoder`` spec."""
    try:
        return Decoder(z_channels=latent_channels, out_channels=image_channels, **dict(spec or {}))
    except TypeError as err:
        raise TypeError(f"{option}: {err}") from err


def build_tokenizer(
    image_channels: int = 3,
    latent_channels: int = 32,
    encoder: Mapping[str, Any] | None = None,
    bottleneck_hidden: int = 256,
    bottleneck_gaussian: bool = False,
    decoder: Mapping[str, Any] | None = None,
) -> Tokenizer:
    """The :class:`Tokenizer` a DMVAEModule with these arguments builds by default."""
    enc = build_encoder(encoder, image_channels)
    bottleneck = MLPBottleneck(
        enc.out_dim, latent_channels, bottleneck_hidden, gaussian=bottleneck_gaussian
    )
    tokenizer = Tokenizer(enc, bottleneck, build_decoder(decoder, latent_channels, image_channels))
    tokenizer.latent_channels = int(latent_channels)
    return tokenizer


@dataclass
class TokenizerState:
    """Tensors of a DMVAEModule checkpoint: ``tokenizer`` (``encoder.*``, ``bottleneck.*``,
    ``decoder.*``), ``discriminator`` (may be empty), ``ema`` (EMA buffers by the tokenizer's
    parameter names, ``'.' -> '__'``; may be empty), the saved ``hparams`` and, for an
    alignment checkpoint, the reference record of its DMD real model (``path``, ``sha256``,
    latent statistics; else None)."""

    tokenizer: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    file: Path
    real_model: dict[str, Any] | None = None


def load_tokenizer_state(
    path: str | os.PathLike, option: str = "model.init_args.init_from"
) -> TokenizerState:
    """The tokenizer, discriminator and EMA tensors of a DMVAEModule checkpoint (a
    :class:`CheckpointError` naming ``option`` when there are none)."""
    file = Path(path).expanduser()
    hint = (
        "train the previous stage first (dmvae fit --config configs/<data>/tokenizer.yaml) "
        "or fix the path"
    )
    ckpt = read_checkpoint(file, option, hint)
    state = _state(ckpt)
    tokenizer = _prefixed(state, "tokenizer.")
    if not tokenizer:
        raise CheckpointError(
            option, file, "holds no `tokenizer.*` weights: not a DMVAEModule checkpoint"
        )
    return TokenizerState(
        tokenizer=tokenizer,
        discriminator=_prefixed(state, "discriminator."),
        ema=_prefixed(state, "ema."),
        hparams=dict(ckpt.get("hyper_parameters") or {}),
        file=file,
        real_model=ckpt.get("dmd_real_model"),
    )


def load_tokenizer(
    path: str | os.PathLike,
    option: str = "tokenizer_ckpt",
    map_location: str | torch.device = "cpu",
) -> Tokenizer:
    """The frozen :class:`Tokenizer` of a DMVAEModule checkpoint: rebuilt from the saved
    hyperparameters (a pretrained-encoder flag is ignored: the weights are in the file), its
    EMA weights in place of the raw ones, eval mode, every parameter frozen, ``latent_channels``
    set. ``encode(images) -> raw latents`` and ``decode(latents) -> images`` as the module's.

    A module subclass that builds other networks (``build_encoder`` overridden) needs its own
    loader: this one builds the default parts."""
    state = load_tokenizer_state(path, option)
    hparams = {k: v for k, v in state.hparams.items() if k in _TOKENIZER_ARGS}
    encoder = dict(hparams.get("encoder") or {})
    if encoder.get("pretrained"):  # the weights are in this file: no other file is read
        encoder["pretrained"] = False
        encoder.pop("weights_path", None)
    hparams["encoder"] = encoder
    try:
        tokenizer = build_tokenizer(**hparams)
    except CheckpointNotFoundError as err:  # a classifier encoder's file, read to rebuild it
        raise CheckpointNotFoundError(
            option,
            state.file,
            f"rebuilds its classifier encoder from {err.file!r} (its encoder.weights_path when "
            "it was trained), which does not exist: put that checkpoint back at that path",
        ) from err
    except (TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            option, state.file, f"has hyperparameters the default tokenizer cannot build: {err}"
        ) from err
    _load_weights(tokenizer, state.tokenizer, option, state.file, "tokenizer")
    _apply_ema(tokenizer, state.ema, prefix="")
    return _freeze(tokenizer).to(map_location)


# ---------------------------------------------------------------------------------- score model
@dataclass
class ScoreModel:
    """A frozen velocity network ``(x, t, y) -> v`` with the latent statistics it was trained
    with (``x = (z - latent_mean) * latent_scale``), ``stats_ready`` (False: no measured
    statistics, 0 / 1 are defaults), and where it came from (``path``, ``sha256``)."""

    net: nn.Module
    latent_mean: float = 0.0
    latent_scale: float = 1.0
    stats_ready: bool = True
    path: str | None = None
    sha256: str | None = None


_DIFFUSION_ARGS = {"latent_shape", "num_classes", "dit", "class_dropout_prob"}


def load_score_model(
    path: str | os.PathLike, option: str = "DMDLoss.real_model", sha256: bool = True
) -> ScoreModel:
    """The DiT of a LatentDiffusionModule checkpoint, EMA weights in, frozen, in eval mode, with
    its ``latent_mean`` / ``latent_scale`` / ``stats_ready`` buffers and (``sha256``) the
    file's hash."""
    file = Path(path).expanduser()
    hint = (
        "train the reference model first (a LatentDiffusionModule on reference samples, "
        "configs/<data>/reference.yaml) or fix the path"
    )
    ckpt = read_checkpoint(file, option, hint)
    state = _state(ckpt)
    weights = _prefixed(state, "dit.")
    hparams = _hparams(ckpt, _DIFFUSION_ARGS)
    if not weights or "latent_shape" not in hparams:
        raise CheckpointError(
            option, file, "holds no `dit.*` weights: not a LatentDiffusionModule checkpoint"
        )
    spec = dict(hparams.get("dit") or {})
    preset = spec.pop("preset", "tiny")
    spec.pop("compile", None)
    channels, height, width = (int(s) for s in hparams["latent_shape"])
    accepted = set(inspect.signature(DiT.__init__).parameters)
    try:
        net = DiT.from_preset(
            preset,
            input_size=(height, width),
            in_channels=channels,
            num_classes=int(hparams.get("num_classes") or 0),
            class_dropout_prob=float(hparams.get("class_dropout_prob", 0.1)),
            **{k: v for k, v in spec.items() if k in accepted},
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(option, file, f"has a DiT spec that cannot be built: {err}") from err
    _load_weights(net, weights, option, file, "DiT")
    _apply_ema(net, state)

    def scalar(key: str, default: Any) -> Any:
        value = state.get(key)
        return default if value is None else value.item()

    return ScoreModel(
        net=_freeze(net),
        latent_mean=float(scalar("latent_mean", 0.0)),
        latent_scale=float(scalar("latent_scale", 1.0)),
        stats_ready=bool(scalar("stats_ready", False)),
        path=str(file),
        sha256=file_sha256(file) if sha256 else None,
    )
