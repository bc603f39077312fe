"""Import released public DMVAE checkpoints (tokenizer VAE, LightningDiT) as Lightning checkpoints.

Two converters, each returning a Lightning-style checkpoint dict (``state_dict``,
``hyper_parameters``, ``pytorch-lightning_version`` plus an ``dmvae_import`` record of what was
done) that ``<Module>.load_from_checkpoint(path)`` loads strictly and that the ``dmvae`` CLI uses
as ``model.init_args.tokenizer_ckpt`` / ``init_from`` (tokenizer) or ``--ckpt_path`` (DiT):

* :func:`convert_public_tokenizer`: a public VAE state dict (``vae_ema`` / ``vae_wo_ddp`` of a
  tokenizer checkpoint) -> :class:`~dmvae_lightning.modules.dmvae.DMVAEModule` checkpoint.
  ``encoder.model.*`` -> ``tokenizer.encoder.model.*`` (timm's DINOv2 inside
  :class:`~dmvae_lightning.nets.encoders.TimmEncoder`), ``bottle_neck.*`` ->
  ``tokenizer.bottleneck.*``, ``decoder.*`` -> ``tokenizer.decoder.*``. The input-normalisation
  buffers ``encoder.de_scale.*`` / ``encoder.scale.*`` are not weights: they are checked to equal
  what ``TimmEncoder`` computes ([-1, 1] -> [0, 1], then the backbone's mean / std) and dropped.
* :func:`convert_public_dit`: a public ``train_diffusion`` checkpoint (``model``, ``ema``,
  ``args``) -> :class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` checkpoint with
  ``dit.*``, ``ema.*``, the latent statistics and a ``dit`` spec that rebuilds the public
  architecture. The fixed ``pos_embed`` / ``feat_rope.*`` tables are recomputed by our DiT; the
  stored ones are only compared with them.

Every source tensor is cast to fp32. A key that is neither mapped nor knowingly ignored is a
``ValueError`` naming it; so is a missing or misshapen weight. Nothing is downloaded.

Command line (routed from ``dmvae import_public``)::

    dmvae import_public tokenizer --src dmvae_vae.pt --out tokenizer.ckpt
    dmvae import_public dit --src dit_xl.pt --out generator.ckpt
"""

from __future__ import annotations

import argparse
import contextvars
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch

__all__ = [
    "convert_public_dit",
    "convert_public_tokenizer",
    "load_public_checkpoint",
    "main",
]

#: Public VAE input-normalisation buffers: checked against TimmEncoder, never imported.
VAE_NORMALISATION_KEYS = (
    "encoder.de_scale.mean",
    "encoder.de_scale.std",
    "encoder.scale.mean",
    "encoder.scale.std",
)
#: Public LightningDiT fixed tables: recomputed by our DiT, checked, never imported.
DIT_FIXED_TABLES = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
#: DINOv2 width -> public ``model_size`` (the VAE's ``DINOEncoder``).
DINOV2_SIZES = {768: "base", 1024: "large"}
DINOV2_DEPTHS = {"base": 12, "large": 24}
#: LightningDiT presets of the public code: (depth, hidden, heads); patch from the name suffix.
_PUBLIC_DIT_SIZES = {
    "Mini": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}


# ------------------------------------------------------------------------------------ helpers
def _names(keys: Sequence[str] | set[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _check_keys(
    given: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    optional: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Raise ValueError on unknown, missing (unless ``optional``) or misshapen keys. Names are
    those of the public file (``source`` says which dict)."""
    unknown = set(given) - set(expected)
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) are neither mapped nor knowingly ignored: "
            f"{_names(unknown)}. Is this a public DMVAE checkpoint of the supported version?"
        )
    missing = set(expected) - set(given) - set(optional)
    if missing:
        raise ValueError(f"{source}: {len(missing)} weight(s) missing: {_names(missing)}")
    wrong = [
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k])}"
        for k in sorted(given)
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    if wrong:
        raise ValueError(f"{source}: shapes do not fit the inferred architecture: {wrong[:10]}")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Detached fp32 copy of a floating tensor (public fixtures store fp16 weights)."""
    return t.detach().to(torch.float32).clone() if t.is_floating_point() else t.detach().clone()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().reshape(-1) - b.detach().float().reshape(-1)).abs().max())


def _require(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: required key {key!r} is missing; not a public DMVAE state?")
    return state[key]


def _block_indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _lightning_checkpoint(
    state_dict: dict[str, torch.Tensor], hparams: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint dict. ``hparams`` hold only what defines the network and its weights, plus
    ``_class_path`` as LightningCLI writes it: ``dmvae predict --ckpt_path`` merges a checkpoint's
    hyperparameters over the config, so the config keeps its say over everything else (sampler,
    steps, ``tokenizer_ckpt``, training settings); ``load_from_checkpoint`` uses the defaults."""
    return {
        "state_dict": state_dict,
        "hyper_parameters": hparams,
        "pytorch-lightning_version": lightning.__version__,
        "dmvae_import": info,
    }


def _build_isolated(cls: type, hparams: dict[str, Any], seed: int = 0):
    """Instantiate ``cls(**hparams)`` with its own ``save_hyperparameters`` record (no outer
    LightningCLI context) and a fixed seed, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return contextvars.Context().run(lambda: cls(**hparams))


# ---------------------------------------------------------------------------------- tokenizer
def _select_vae_state(
    state: Mapping[str, Any], use_ema: bool
) -> tuple[Mapping[str, torch.Tensor], str]:
    """(state dict, entry name) from a public tokenizer checkpoint or a bare state dict."""
    if "vae_ema" in state or "vae_wo_ddp" in state:
        if use_ema and "vae_ema" in state:
            return state["vae_ema"], "vae_ema"
        if "vae_wo_ddp" in state:
            return state["vae_wo_ddp"], "vae_wo_ddp"
        raise ValueError(
            "use_ema=False (--no_ema) asks for the raw weights, but the checkpoint has no "
            "'vae_wo_ddp' entry (only 'vae_ema')"
        )
    return state, "state dict"


def _decoder_spec(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, Any], int]:
    """Decoder options and latent channels inferred from ``decoder.*`` key names and shapes."""
    if "decoder.conv_in.0.conv.weight" in state:
        input_upsample, z_key = True, "decoder.conv_in.0.conv.weight"
    else:
        input_upsample, z_key = False, "decoder.conv_in.weight"
    z_channels = int(_require(state, z_key, source).shape[1])
    levels = _block_indices(state, "decoder.up.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{source}: cannot read the decoder levels 'decoder.up.<i>' ({levels})")
    widths = [
        int(_require(state, f"decoder.up.{i}.block.0.conv1.weight", source).shape[0])
        for i in levels
    ]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"{source}: decoder level widths {widths} are not multiples of {ch}")
    spec = {
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": len(_block_indices(state, "decoder.up.0.block.")) - 1,
        "mid_attention": "decoder.mid.attn_1.q.weight" in state,
        "input_upsample": input_upsample,
    }
    return spec, z_channels


def _encoder_layout(
    enc: Mapping[str, torch.Tensor],
    image_size: int | None,
    patch_size: int | None,
    source: str,
) -> tuple[int, int, int]:
    """(image_size, patch_size, depth) of the DINOv2 weights under ``encoder.model.*``."""
    patch = int(_require(enc, "patch_embed.proj.weight", f"{source} encoder.model").shape[-1])
    tokens = int(_require(enc, "pos_embed", f"{source} encoder.model").shape[1]) - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{source}: encoder.model.pos_embed has {tokens} patch positions")
    size = side * patch
    for name, given, found in (("patch_size", patch_size, patch), ("image_size", image_size, size)):
        if given is not None and given != found:
            raise ValueError(
                f"{name}={given} (--{name}) disagrees with the encoder weights, which were made "
                f"for {name} {found}"
            )
    return size, patch, len(_block_indices(enc, "blocks."))


def convert_public_tokenizer(
    state: Mapping[str, Any],
    *,
    use_ema: bool = True,
    model_size: str | None = None,
    encoder_weights: str | Path | None = None,
    encoder_timm_kwargs: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
    encoder_frozen: bool = True,
    ema_decay: float = 0.9999,
) -> dict[str, Any]:
    """Convert a public DMVAE VAE state dict into a ``DMVAEModule`` checkpoint dict.

    Args:
        state: a public VAE state dict (keys ``encoder.*``, ``decoder.*``, ``bottle_neck.*``) or a
            whole public tokenizer checkpoint ``{"vae_wo_ddp": ..., "vae_ema": ...}``; other
            top-level entries of such a checkpoint (optimiser, discriminator, args) are not read.
        use_ema: take ``vae_ema`` when the checkpoint has it (else ``vae_wo_ddp``).
        model_size: "base" | "large" (DINOv2-B / -L); inferred from the bottleneck's input width,
            an explicit value must agree.
        encoder_weights: DINOv2 weights file (timm key format, e.g. the ``.safetensors`` of
            ``vit_large_patch14_dinov2.lvd142m``) used when ``state`` has no ``encoder.*``
            weights (a decoder + bottleneck state). timm resamples it to ``patch_size`` /
            ``image_size`` as the public code's ``create_model(pretrained=True, ...)`` does, and
            the resulting encoder weights are written into the checkpoint, which therefore
            loads without the file. Exact only for a tokenizer whose encoder stayed frozen
            (stage 1); after DMD alignment the encoder is trained and must come from ``state``.
        encoder_timm_kwargs: further ``timm.create_model`` arguments of the encoder (e.g.
            ``{"depth": 1}`` for a truncated test model); a depth other than the standard one is
            inferred from ``encoder.model.blocks.*`` when the encoder is in ``state``.
        image_size, patch_size: encoder input size and patch (public 256 / 16); inferred from
            the encoder weights when present.
        encoder_frozen: ``encoder.frozen`` of the hyperparameters (the EMA of the module then
            covers bottleneck + decoder only).
        ema_decay: EMA decay recorded in the hyperparameters.

    Returns:
        ``{"state_dict", "hyper_parameters", "pytorch-lightning_version", "dmvae_import"}``.
        ``tokenizer.*`` hold the selected weights (EMA ones by default, encoder included);
        ``ema.*`` (the trainable parts) hold the same values, so EMA-swapping loaders
        (``tokenizer_ckpt``, ``init_from``, validation) see them too. ``discriminator.*`` is a
        fresh seeded initialisation (the public discriminator is not imported).

    Raises:
        ValueError: unknown / missing / misshapen keys, normalisation buffers that differ from
            what ``TimmEncoder`` computes, inconsistent options, or no encoder weights at all.
        FileNotFoundError: ``encoder_weights`` does not exist.
    """
    from dmvae_lightning.ema import EMA
    from dmvae_lightning.modules.dmvae import DMVAEModule

    sd, entry = _select_vae_state(state, use_ema)
    source = f"public VAE {entry}"
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"{source}: expected a non-empty state dict, got {type(sd).__name__}")
    known_prefixes = ("encoder.model.", "bottle_neck.", "decoder.")
    stray = [k for k in sd if not k.startswith(known_prefixes) and k not in VAE_NORMALISATION_KEYS]
    if stray:
        raise ValueError(
            f"{source}: {len(stray)} key(s) are neither mapped nor knowingly ignored: "
            f"{_names(stray)}"
        )
    decoder, z_channels = _decoder_spec(sd, source)
    w0 = _require(sd, "bottle_neck.mlp.0.weight", source)
    w2 = _require(sd, "bottle_neck.mlp.2.weight", source)
    in_dim, hidden = int(w0.shape[1]), int(w0.shape[0])
    if int(w2.shape[0]) != z_channels:
        raise ValueError(
            f"{source}: bottleneck makes {int(w2.shape[0])} channels, decoder takes {z_channels}"
        )
    if in_dim not in DINOV2_SIZES:
        raise ValueError(f"{source}: bottleneck input width {in_dim} is not a DINOv2-B/L width")
    inferred_size = DINOV2_SIZES[in_dim]
    if model_size is not None and model_size != inferred_size:
        raise ValueError(
            f"model_size={model_size!r} (--model_size) disagrees with the weights: the bottleneck "
            f"takes {in_dim}-d features, i.e. model_size={inferred_size!r}"
        )
    model_size = inferred_size
    model_name = f"vit_{model_size}_patch14_dinov2.lvd142m"

    enc = {k[len("encoder.model.") :]: v for k, v in sd.items() if k.startswith("encoder.model.")}
    timm_kwargs = dict(encoder_timm_kwargs or {})
    weights_file: Path | None = None
    if enc:
        image_size, patch_size, depth = _encoder_layout(enc, image_size, patch_size, source)
        if depth != DINOV2_DEPTHS[model_size]:
            timm_kwargs.setdefault("depth", depth)
        encoder_source = f"{entry} (encoder.model.*)"
    else:
        if encoder_weights is None:
            raise ValueError(
                f"{source} holds no encoder.* weights (a decoder + bottleneck state): pass "
                "encoder_weights (--encoder_weights) = the DINOv2 weights file the public "
                f"tokenizer started from ({model_name}, timm key format)"
            )
        weights_file = Path(encoder_weights).expanduser()
        if not weights_file.is_file():
            raise FileNotFoundError(
                f"--encoder_weights: DINOv2 weights file {str(weights_file)!r} does not exist"
            )
        image_size = 256 if image_size is None else image_size
        patch_size = 16 if patch_size is None else patch_size
        encoder_source = f"file {str(weights_file)!r} (resampled by timm)"

    encoder_spec: dict[str, Any] = {
        "name": "timm",
        "model_name": model_name,
        "pretrained": weights_file is not None,
        "weights_path": None if weights_file is None else str(weights_file),
        "frozen": encoder_frozen,
        "img_size": image_size,
        "patch_size": patch_size,
    }
    if timm_kwargs:
        encoder_spec["timm_kwargs"] = timm_kwargs
    hparams = {
        "stage": "pretrain",
        "image_channels": int(_require(sd, "decoder.conv_out.weight", source).shape[0]),
        "latent_channels": z_channels,
        "encoder": encoder_spec,
        "bottleneck_hidden": hidden,
        "decoder": decoder,
        "ema_decay": ema_decay,
    }
    module = _build_isolated(DMVAEModule, hparams)
    tokenizer = module.tokenizer

    # Public names -> tokenizer names, then strict checks against the built tokenizer.
    mapped = {
        ("bottleneck." + k[len("bottle_neck.") :] if k.startswith("bottle_neck.") else k): v
        for k, v in sd.items()
        if k not in VAE_NORMALISATION_KEYS
    }
    target = {k: tuple(v.shape) for k, v in tokenizer.state_dict().items()}
    optional = {k for k in target if k.startswith("encoder.")} if weights_file else set()
    _check_keys(mapped, target, source, optional=optional)
    weights = dict(tokenizer.state_dict())
    weights.update({k: _fp32(v) for k, v in mapped.items()})
    tokenizer.load_state_dict(weights, strict=True)

    # The normalisation buffers are knowingly dropped only when TimmEncoder computes the same.
    encoder = tokenizer.encoder
    expected = {
        "encoder.de_scale.mean": torch.full((3,), 0.5),
        "encoder.de_scale.std": torch.full((3,), 0.5),
        "encoder.scale.mean": encoder.mean.reshape(-1).float(),
        "encoder.scale.std": encoder.std.reshape(-1).float(),
    }
    norm_diff = {}
    for key, ours in expected.items():
        if key in sd:
            theirs = sd[key].detach().float().reshape(-1)
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=0, atol=1e-6):
                raise ValueError(
                    f"{source}: {key} = {theirs.tolist()} differs from what TimmEncoder computes "
                    f"({ours.tolist()}: [-1, 1] -> [0, 1], then the {model_name} mean / std); "
                    "the encoder input normalisation would not match"
                )
            norm_diff[key] = _max_abs_diff(theirs, ours)

    module.ema = EMA(module.ema_target(), decay=ema_decay) if ema_decay else None
    saved = {"_class_path": f"{DMVAEModule.__module__}.{DMVAEModule.__qualname__}", **hparams}
    # the weights are in the file now: rebuilt without reading any other file
    saved["encoder"] = {**encoder_spec, "pretrained": False, "weights_path": None}
    info = {
        "kind": "tokenizer",
        "source_entry": entry,
        "encoder_weights": encoder_source,
        "ignored": sorted(k for k in VAE_NORMALISATION_KEYS if k in sd),
        "normalisation_max_abs_diff": norm_diff,
        "discriminator": "fresh initialisation (seed 0); not part of the public VAE state",
    }
    return _lightning_checkpoint(module.state_dict(), saved, info)


# ---------------------------------------------------------------------------------------- DiT
def _public_dit_name(args: Mapping[str, Any]) -> tuple[str, int] | None:
    """(size, patch) of ``args["model"]`` like "LightningDiT-XL/1", or None."""
    name = args.get("model")
    if not isinstance(name, str):
        return None
    match = re.fullmatch(r"(?:LightningDiT-)?([\w.]+)/(\d+)", name)
    if not match or match.group(1) not in _PUBLIC_DIT_SIZES:
        raise ValueError(f"public args.model={name!r} is not a known LightningDiT size")
    return match.group(1), int(match.group(2))


def _dit_spec(
    sd: Mapping[str, torch.Tensor], args: Mapping[str, Any], source: str
) -> tuple[dict[str, Any], int, int]:
    """(dit spec, in_channels, grid side of ``pos_embed``) inferred from a LightningDiT state."""
    w = _require(sd, "x_embedder.proj.weight", source)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = len(_block_indices(sd, "blocks."))
    if depth == 0:
        raise ValueError(f"{source}: no 'blocks.<i>.*' keys")
    use_rope = "feat_rope.freqs_cos" in sd
    if "blocks.0.attn.q_norm.weight" in sd:
        head_dim = int(sd["blocks.0.attn.q_norm.weight"].numel())
    elif use_rope:
        head_dim = int(sd["feat_rope.freqs_cos"].shape[1])
    else:
        head_dim = None
    named = _public_dit_name(args)
    if named is not None:
        n_depth, n_hidden, n_heads = _PUBLIC_DIT_SIZES[named[0]]
        if head_dim is None:
            head_dim = hidden // n_heads
        heads = hidden // head_dim
        if (n_depth, n_hidden, n_heads, named[1]) != (depth, hidden, heads, patch):
            raise ValueError(
                f"public args.model={args['model']!r} means depth {n_depth}, width {n_hidden}, "
                f"{n_heads} heads, patch {named[1]}, but the weights have depth {depth}, width "
                f"{hidden}, {heads} heads, patch {patch}"
            )
    if head_dim is None or hidden % head_dim:
        raise ValueError(f"{source}: cannot infer the number of heads (no QK-norm, RoPE or name)")
    spec: dict[str, Any] = {
        "preset": next(
            (
                k
                for k, (d, h, n) in _PUBLIC_DIT_SIZES.items()
                if (d, h, n) == (depth, hidden, hidden // head_dim)
            ),
            "tiny",
        ),
        "patch_size": patch,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": hidden // head_dim,
        "mlp_ratio": 4.0,
        "use_rope": use_rope,
        "use_qknorm": "blocks.0.attn.q_norm.weight" in sd,
        "use_swiglu": "blocks.0.mlp.w12.weight" in sd,
        "use_rmsnorm": "blocks.0.norm1.weight" in sd,
        "use_pos_embed": True,
        "time_embed_scale": 1.0,
    }
    if spec["use_swiglu"]:
        mlp_hidden = int(_require(sd, "blocks.0.mlp.w12.weight", source).shape[0]) // 2
        if mlp_hidden != int(2 / 3 * int(4.0 * hidden)):
            spec["swiglu_hidden"] = mlp_hidden  # not a DiTSpec key: YAML configs cannot say it
    else:
        spec["mlp_ratio"] = int(_require(sd, "blocks.0.mlp.fc1.weight", source).shape[0]) / hidden
    ada = int(_require(sd, "blocks.0.adaLN_modulation.1.weight", source).shape[0])
    if ada == 4 * hidden:
        spec["wo_shift"] = True  # public option, off in every released model
    out = int(_require(sd, "final_layer.linear.weight", source).shape[0])
    if out == 2 * patch * patch * in_channels:
        spec["learn_sigma"] = True  # public option, off in every released model
    pos = _require(sd, "pos_embed", source)
    side = math.isqrt(int(pos.shape[1]))
    if side * side != int(pos.shape[1]):
        raise ValueError(f"{source}: pos_embed has {int(pos.shape[1])} tokens, not a square grid")
    return spec, in_channels, side


def _check_fixed_tables(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    spec: Mapping[str, Any],
    side: int,
    atol: float,
) -> dict[str, float]:
    """Compare the stored fixed tables of each state with the ones our DiT computes."""
    from dmvae_lightning.nets.dit import RotaryEmbedding2D, sincos_pos_embed_2d

    hidden, heads = spec["hidden_size"], spec["num_heads"]
    ours = {"pos_embed": sincos_pos_embed_2d(hidden, side, side)[None]}
    if spec["use_rope"]:
        cos, sin = RotaryEmbedding2D(hidden // heads, (side, side)).compute(side, side)
        ours.update({"feat_rope.freqs_cos": cos, "feat_rope.freqs_sin": sin})
    diffs = {}
    for entry, sd in states.items():
        for key, table in ours.items():
            theirs = sd[key]
            if tuple(theirs.shape) != tuple(table.shape):
                raise ValueError(
                    f"public DiT {entry}: {key} has shape {tuple(theirs.shape)}, the recomputed "
                    f"table {tuple(table.shape)} (grid {side}x{side})"
                )
            diff = _max_abs_diff(theirs, table)
            if diff > atol:
                raise ValueError(
                    f"public DiT {entry}: {key} differs from the recomputed fixed table by {diff:.3g}"
                    f" (> {atol:g}): not the public LightningDiT layout"
                )
            diffs[f"{entry}.{key}"] = diff
    return diffs


def convert_public_dit(
    checkpoint: Mapping[str, Any],
    *,
    use_ema: bool = True,
    num_classes: int | None = None,
    latent_mean: float | None = None,
    latent_scale: float | None = None,
    input_size: int | None = None,
    in_channels: int | None = None,
    ema_decay: float = 0.9999,
    table_atol: float = 1e-3,
) -> dict[str, Any]:
    """Convert a public LightningDiT training checkpoint into a ``LatentDiffusionModule`` one.

    Args:
        checkpoint: ``{"model": state, "ema": state, "args": {...}, ...}`` as ``train_diffusion``
            saves it (``opt``, ``steps``, ``epoch`` are not imported). Either state may be
            absent (the other is then used for both).
        use_ema: True: ``dit.*`` <- ``model`` (the raw training weights) and ``ema.*`` <-
            ``ema``; sampling, validation and predict swap the EMA in, so they use the public
            EMA weights. False: both ``dit.*`` and ``ema.*`` <- ``model``.
        num_classes: real classes; default ``args["num_classes"]``, else the label table's rows
            minus the null row. The null class is index ``num_classes``.
        latent_mean, latent_scale: ``(z - mean) * scale`` before the DiT; default from ``args``
            (released DMVAE: 0.0685 / 0.1763). Required when ``args`` lacks them.
        input_size: latent side; inferred from the ``pos_embed`` grid (must agree if given).
        in_channels: latent channels; inferred from ``x_embedder`` (must agree if given).
        ema_decay: EMA decay recorded in the hyperparameters.
        table_atol: largest accepted |difference| between a stored fixed table and ours. The
            public EMA also averages the frozen ``pos_embed`` in fp32, which drifts it by up to
            ~2e-4 from the exact table; layout mistakes differ by O(1).

    A label table without the null row (a public model trained with ``class_dropout_prob=0``)
    is padded with a zero row and the hyperparameters record ``class_dropout_prob=0``: such a
    model never learned an unconditional velocity, so sample it without CFG.

    Returns:
        ``{"state_dict", "hyper_parameters", "pytorch-lightning_version", "dmvae_import"}``.

    Raises:
        ValueError: unknown / missing / misshapen keys, fixed tables that differ from ours,
            inconsistent options or missing latent statistics.
    """
    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    if not isinstance(checkpoint, Mapping) or not ({"model", "ema"} & set(checkpoint)):
        raise ValueError(
            "public DiT checkpoint: expected a dict with 'model' and/or 'ema' state dicts, got "
            f"keys {sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint)}"
        )
    args = dict(checkpoint.get("args") or {})
    raw_name = "model" if "model" in checkpoint else "ema"
    if use_ema:
        avg_name = "ema" if "ema" in checkpoint else raw_name
    elif raw_name != "model":
        raise ValueError("use_ema=False (--no_ema) needs the checkpoint's 'model' state dict")
    else:
        avg_name = "model"
    raw, avg = checkpoint[raw_name], checkpoint[avg_name]
    entries = {raw_name: raw, avg_name: avg}
    spec, channels, side = _dit_spec(raw, args, f"public DiT {raw_name}")
    if set(avg) != set(raw) or any(avg[k].shape != raw[k].shape for k in raw):
        raise ValueError(f"public DiT: '{avg_name}' and '{raw_name}' hold different keys/shapes")
    if in_channels is not None and in_channels != channels:
        raise ValueError(
            f"in_channels={in_channels} (--in_channels) disagrees with x_embedder ({channels})"
        )
    grid_size = side * spec["patch_size"]
    if input_size is not None and input_size != grid_size:
        raise ValueError(
            f"input_size={input_size} (--input_size) disagrees with the stored pos_embed, "
            f"which covers a {grid_size}x{grid_size} latent"
        )
    table_diffs = _check_fixed_tables(entries, spec, side, table_atol)

    # Classes and the null row.
    rows = int(_require(raw, "y_embedder.embedding_table.weight", "public DiT").shape[0])
    args_drop = args.get("class_dropout_prob")
    if num_classes is None:
        num_classes = args.get("num_classes")
    if num_classes is None:
        num_classes = rows if args_drop == 0 else rows - 1
    if rows == num_classes + 1:
        pad, dropout = False, 0.1 if args_drop is None else float(args_drop)
    elif rows == num_classes:
        pad, dropout = True, 0.0
    else:
        raise ValueError(
            f"num_classes={num_classes} (--num_classes or args) does not fit the label table "
            f"with {rows} rows (num_classes + 1 with the null row, num_classes without)"
        )

    stats = {}
    for name, given in (("latent_mean", latent_mean), ("latent_scale", latent_scale)):
        value = given if given is not None else args.get(name)
        if value is None:
            raise ValueError(
                f"{name} is not in the checkpoint's args: pass {name} (--{name}); the released "
                "DMVAE generator uses latent_mean 0.0685, latent_scale 0.1763"
            )
        stats[name] = float(value)

    hparams: dict[str, Any] = {
        "latent_shape": [channels, grid_size, grid_size],
        "num_classes": int(num_classes),
        "dit": spec,
        "class_dropout_prob": dropout,
        "latent_mean": stats["latent_mean"],
        "latent_scale": stats["latent_scale"],
        "ema_decay": ema_decay,
    }
    # Expected keys, shapes and dtypes from the module itself, built without memory.
    with torch.device("meta"):
        meta = _build_isolated(LatentDiffusionModule, hparams)
    expected = meta.state_dict()
    dit_shapes = {k[4:]: tuple(v.shape) for k, v in expected.items() if k.startswith("dit.")}

    def prepare(sd: Mapping[str, torch.Tensor], entry: str) -> dict[str, torch.Tensor]:
        out = {k: _fp32(v) for k, v in sd.items() if k not in DIT_FIXED_TABLES}
        if pad:
            table = out["y_embedder.embedding_table.weight"]
            out["y_embedder.embedding_table.weight"] = torch.cat(
                [table, table.new_zeros(1, table.shape[1])]
            )
        _check_keys(out, dit_shapes, f"public DiT {entry}")
        return out

    dit_state = prepare(raw, raw_name)
    ema_state = prepare(avg, avg_name)
    state: dict[str, torch.Tensor] = {f"dit.{k}": v for k, v in dit_state.items()}
    if ema_decay:
        state.update({"ema." + k.replace(".", "__"): v for k, v in ema_state.items()})
        state["ema.num_updates"] = torch.zeros((), dtype=torch.long)
    state["latent_mean"] = torch.tensor(stats["latent_mean"], dtype=torch.float32)
    state["latent_scale"] = torch.tensor(stats["latent_scale"], dtype=torch.float32)
    state["stats_ready"] = torch.tensor(True)
    state["batch_count"] = torch.zeros((), dtype=torch.long)
    unfilled = set(expected) - set(state)
    if unfilled or set(state) - set(expected):
        raise RuntimeError(  # the module grew state this converter does not know about
            f"convert_public_dit is out of date with LatentDiffusionModule: unfilled "
            f"{_names(unfilled)}, unexpected {_names(set(state) - set(expected))}"
        )
    state = {k: state[k].to(expected[k].dtype) for k in expected}  # module order and dtypes
    info = {
        "kind": "dit",
        "dit_weights": raw_name,
        "ema_weights": avg_name,
        "ignored": sorted(DIT_FIXED_TABLES) + sorted(set(checkpoint) - {"model", "ema", "args"}),
        "fixed_table_max_abs_diff": table_diffs,
        "null_row_padded": pad,
        "public_args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool))},
    }
    cls_path = f"{LatentDiffusionModule.__module__}.{LatentDiffusionModule.__qualname__}"
    return _lightning_checkpoint(state, {"_class_path": cls_path, **hparams}, info)


# ------------------------------------------------------------------------------ command line
def load_public_checkpoint(path: str | Path, option: str = "--src") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU (memory-mapped when the format allows).

    Raises FileNotFoundError (naming ``option``) for a missing file and ValueError when the file
    holds more than tensors, containers and plain values (it is never unpickled unsafely)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{option}: checkpoint file {str(file)!r} does not exist")
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) format: no mmap
            if "mmap" not in str(err):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends from the weights-only unpickler
        raise ValueError(
            f"{option}: {str(file)!r} cannot be read with torch.load(weights_only=True): {err}. "
            "Re-save it as a dict of tensors and plain values."
        ) from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmvae import_public",
        description="Convert a released public DMVAE checkpoint into a dmvae-lightning one.",
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    tok = sub.add_parser("tokenizer", help="public VAE (vae_ema / vae_wo_ddp) -> DMVAEModule")
    dit = sub.add_parser("dit", help="public LightningDiT (model / ema / args) -> diffusion")
    for p in (tok, dit):
        p.add_argument("--src", required=True, help="public checkpoint file")
        p.add_argument("--out", required=True, help="Lightning checkpoint to write")
        p.add_argument(
            "--no_ema",
            dest="use_ema",
            action="store_false",
            help="use the raw weights instead of the EMA ones",
        )
    tok.add_argument("--model_size", choices=sorted(DINOV2_SIZES.values()))
    tok.add_argument(
        "--encoder_weights", help="DINOv2 weights file, for a decoder + bottleneck-only state"
    )
    tok.add_argument("--image_size", type=int)
    tok.add_argument("--patch_size", type=int)
    dit.add_argument("--num_classes", type=int)
    dit.add_argument("--latent_mean", type=float)
    dit.add_argument("--latent_scale", type=float)
    dit.add_argument("--input_size", type=int)
    dit.add_argument("--in_channels", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """``dmvae import_public {tokenizer,dit} --src PATH --out PATH [...]``; returns ``--out``."""
    opts = _parser().parse_args(argv)
    source = load_public_checkpoint(opts.src, "--src")
    if opts.kind == "tokenizer":
        ckpt = convert_public_tokenizer(
            source,
            use_ema=opts.use_ema,
            model_size=opts.model_size,
            encoder_weights=opts.encoder_weights,
            image_size=opts.image_size,
            patch_size=opts.patch_size,
        )
    else:
        ckpt = convert_public_dit(
            source,
            use_ema=opts.use_ema,
            num_classes=opts.num_classes,
            latent_mean=opts.latent_mean,
            latent_scale=opts.latent_scale,
            input_size=opts.input_size,
            in_channels=opts.in_channels,
        )
    ckpt["dmvae_import"]["source_file"] = str(Path(opts.src).expanduser().resolve())
    out = Path(opts.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    print(f"wrote {out} ({ckpt['dmvae_import']['kind']} from {opts.src})")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
