"""Importing public DMVAE checkpoints: exactness against the golden fixtures, strict key checks,
sampling / decoding with the imported weights, the `dmvae import_public` command and the
`configs/imagenet/public_dmvae.yaml` predict config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmvae_lightning import flow
from dmvae_lightning.cli import main
from dmvae_lightning.convert import convert_public_dit, convert_public_tokenizer
from dmvae_lightning.latents import load_frozen_tokenizer
from dmvae_lightning.modules.diffusion import LatentDiffusionModule
from dmvae_lightning.modules.dmvae import DMVAEModule

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "public_dmvae"  # README.md there
DINO_B = "vit_base_patch14_dinov2.lvd142m"
STATS = {"latent_mean": 0.0685, "latent_scale": 0.1763}


def _fixture(name: str) -> dict:
    path = FIXTURES / name
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def dit_fx() -> dict:
    return _fixture("dit_mini.pt")


@pytest.fixture(scope="module")
def vae_fx() -> dict:
    return _fixture("vae_decoder.pt")


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The fixtures' init rule (LayerScale gains like norm gains, so the block matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name or "gamma" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


@pytest.fixture(scope="module")
def dino(tmp_path_factory) -> dict:
    """A one-block DINOv2-B at patch 16 / 256 px (the public encoder layout), random weights,
    plus the same weights at the native patch 14 / 518 px saved as a 'DINOv2 weights file'."""
    import timm

    vit = timm.create_model(DINO_B, pretrained=False, depth=1, img_size=256, patch_size=16)
    native = timm.create_model(DINO_B, pretrained=False, depth=1)
    path = tmp_path_factory.mktemp("dino") / "dinov2_vitb14_depth1.pth"
    torch.save(_randomize(native, 3).state_dict(), path)
    return {"vit": _randomize(vit, 4).eval(), "file": path}


@pytest.fixture(scope="module")
def tokenizer_ckpt(vae_fx, dino, tmp_path_factory) -> Path:
    """The decoder + bottleneck fixture, encoder from the DINOv2 file."""
    ckpt = convert_public_tokenizer(
        vae_fx, encoder_weights=dino["file"], encoder_timm_kwargs={"depth": 1}
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def dit_ckpt(dit_fx, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dit") / "dit.ckpt"
    torch.save(convert_public_dit(dit_fx["checkpoint"], **STATS), path)
    return path


def _full_public_vae_state(vae_fx: dict, vit: torch.nn.Module) -> dict:
    """A public VAE state dict as the released tokenizer has it: encoder.* (DINOv2 weights and
    the normalisation buffers), decoder.*, bottle_neck.*."""
    state = {f"encoder.model.{k}": v.clone() for k, v in vit.state_dict().items()}
    state["encoder.de_scale.mean"] = torch.full((1, 3, 1, 1), 0.5)
    state["encoder.de_scale.std"] = torch.full((1, 3, 1, 1), 0.5)
    state["encoder.scale.mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    state["encoder.scale.std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    state.update(vae_fx["vae_ema"])
    return state


# ------------------------------------------------------------------------------------ DiT
def test_dit_import_reproduces_public_forward_and_cfg(dit_fx, dit_ckpt):
    module = LatentDiffusionModule.load_from_checkpoint(dit_ckpt).eval()
    hp = module.hparams
    assert hp.num_classes == 10 and list(hp.latent_shape) == [32, 4, 4]
    assert module.dit.null_class == 10 and bool(module.stats_ready)
    assert float(module.latent_mean) == pytest.approx(0.0685)
    assert float(module.latent_scale) == pytest.approx(0.1763)
    with torch.no_grad():
        out = module.dit(**dit_fx["inputs"])
        cin, scale = dit_fx["cfg"]["inputs"], dit_fx["cfg"]["scale"]
        guided = module.dit.forward_with_cfg(cin["x"][:2], cin["t"][:2], cin["y"][:2], scale)
        with module.ema_scope():  # the public EMA weights, which sampling uses
            out_ema = module.dit(**dit_fx["inputs"])
    ref = dit_fx["outputs"]["forward"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # measured 1.7e-6
    torch.testing.assert_close(out_ema, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(guided, dit_fx["cfg"]["output"][:2], rtol=0, atol=5e-5)
    torch.testing.assert_close(guided, dit_fx["cfg"]["output"][2:], rtol=0, atol=5e-5)
    # the public default (standard_cfg=False): guidance on channels 0-2 only, rows 0-1
    with torch.no_grad():
        partial = module.dit.forward_with_cfg(
            cin["x"][:2], cin["t"][:2], cin["y"][:2], scale, guided_channels=3
        )
    torch.testing.assert_close(partial, dit_fx["cfg"]["output_default"][:2], rtol=0, atol=5e-5)
    assert (partial[:, 3:] - guided[:, 3:]).abs().max() > 1e-2  # the option is live
    info = torch.load(dit_ckpt, weights_only=True)["dmvae_import"]
    assert max(info["fixed_table_max_abs_diff"].values()) < 1e-6
    assert set(info["ignored"]) >= {"pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"}


def test_dit_model_goes_to_weights_and_ema_to_ema_buffers(dit_fx):
    ckpt = copy.deepcopy(dit_fx["checkpoint"])
    ckpt["model"]["final_layer.linear.bias"] = ckpt["model"]["final_layer.linear.bias"].float() + 1
    sd = convert_public_dit(ckpt, **STATS)["state_dict"]
    raw, ema = sd["dit.final_layer.linear.bias"], sd["ema.final_layer__linear__bias"]
    assert raw.dtype == ema.dtype == torch.float32
    assert torch.equal(raw, ema + 1)
    sd_raw = convert_public_dit(ckpt, use_ema=False, **STATS)["state_dict"]
    assert torch.equal(sd_raw["ema.final_layer__linear__bias"], raw)


def test_dit_args_supply_classes_stats_and_name(dit_fx):
    ckpt = dict(dit_fx["checkpoint"])
    ckpt["args"] = {"num_classes": 10, "latent_mean": 0.5, "latent_scale": 2.0, "model": "Mini/1"}
    with pytest.raises(ValueError, match="args.model='Mini/1' means depth 6"):
        convert_public_dit(ckpt)
    ckpt["args"]["model"] = "LightningDiT-XL/1"
    with pytest.raises(ValueError, match="depth 28, width 1152, 16 heads"):
        convert_public_dit(ckpt)
    del ckpt["args"]["model"]
    hp = convert_public_dit(ckpt)["hyper_parameters"]
    assert (hp["latent_mean"], hp["latent_scale"], hp["num_classes"]) == (0.5, 2.0, 10)
    with pytest.raises(ValueError, match="latent_scale"):
        convert_public_dit(dit_fx["checkpoint"], latent_mean=0.0)


def test_dit_without_null_row_is_padded(dit_fx):
    ckpt = copy.deepcopy(dit_fx["checkpoint"])
    for name in ("model", "ema"):
        table = ckpt[name]["y_embedder.embedding_table.weight"]
        ckpt[name]["y_embedder.embedding_table.weight"] = table[:10]
    ckpt["args"] = {"class_dropout_prob": 0.0, **STATS}
    converted = convert_public_dit(ckpt)
    assert converted["hyper_parameters"]["num_classes"] == 10
    assert converted["hyper_parameters"]["class_dropout_prob"] == 0.0
    assert converted["dmvae_import"]["null_row_padded"] is True
    table = converted["state_dict"]["dit.y_embedder.embedding_table.weight"]
    assert table.shape == (11, 256) and not table[10].any()
    hparams = {k: v for k, v in converted["hyper_parameters"].items() if k != "_class_path"}
    module = LatentDiffusionModule(**hparams).eval()
    module.load_state_dict(converted["state_dict"], strict=True)
    with torch.no_grad():
        out = module.dit(**dit_fx["inputs"])
    # rows with real classes are unchanged; the last row used the (now zero) null class
    torch.testing.assert_close(out[:3], dit_fx["outputs"]["forward"][:3], rtol=0, atol=1e-5)
    assert (out[3] - dit_fx["outputs"]["forward"][3]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="num_classes=7"):
        convert_public_dit(ckpt, num_classes=7)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.__setitem__("blocks.0.attn.extra", torch.zeros(3)), "blocks.0.attn.extra"),
        (lambda sd: sd.pop("blocks.1.mlp.w3.bias"), "missing: 'blocks.1.mlp.w3.bias'"),
        (
            lambda sd: sd.__setitem__("pos_embed", sd["pos_embed"].flip(-1)),
            "pos_embed differs from the recomputed fixed table",
        ),
        (
            lambda sd: sd.__setitem__("feat_rope.freqs_sin", -sd["feat_rope.freqs_sin"]),
            "feat_rope.freqs_sin differs",
        ),
    ],
)
def test_dit_bad_keys_and_tables_fail_by_name(dit_fx, edit, match):
    ckpt = copy.deepcopy(dit_fx["checkpoint"])
    edit(ckpt["model"])
    edit(ckpt["ema"])
    with pytest.raises(ValueError, match=match):
        convert_public_dit(ckpt, **STATS)


def test_dit_options_must_agree_with_weights(dit_fx):
    with pytest.raises(ValueError, match="input_size=16"):
        convert_public_dit(dit_fx["checkpoint"], input_size=16, **STATS)
    with pytest.raises(ValueError, match="in_channels=16"):
        convert_public_dit(dit_fx["checkpoint"], in_channels=16, **STATS)


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_import_reproduces_public_bottleneck_and_decoder(vae_fx, tokenizer_ckpt):
    module = DMVAEModule.load_from_checkpoint(tokenizer_ckpt).eval()
    hp = module.hparams
    assert hp.encoder["model_name"] == DINO_B and hp.encoder["pretrained"] is False
    assert hp.decoder == {
        "ch": 32,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "mid_attention": True,
        "input_upsample": True,
    }
    assert (hp.latent_channels, hp.bottleneck_hidden) == (32, 256)
    tokens, latent_ref = vae_fx["inputs"]["tokens"], vae_fx["outputs"]["latent"]
    with torch.no_grad():
        latent = module.tokenizer.bottleneck(tokens)
        image = module.decode(latent_ref)
        nchw = tokens.reshape(2, 16, 16, 768).permute(0, 3, 1, 2)  # the encoder's layout
        latent_nchw = module.tokenizer.bottleneck(nchw)
    torch.testing.assert_close(latent, latent_ref, rtol=0, atol=1e-5)  # measured 1.9e-6
    torch.testing.assert_close(image, vae_fx["outputs"]["image"], rtol=0, atol=5e-4)  # 5.9e-5
    torch.testing.assert_close(
        latent_nchw.permute(0, 2, 3, 1).reshape(2, 256, 32), latent_ref, rtol=0, atol=1e-5
    )
    # the frozen-tokenizer path (tokenizer_ckpt / latent caches) swaps the EMA buffers in
    frozen = load_frozen_tokenizer(tokenizer_ckpt)
    with torch.no_grad():
        image = frozen.decode(latent_ref[:1].reshape(1, 16, 16, 32).permute(0, 3, 1, 2))
    torch.testing.assert_close(image, vae_fx["outputs"]["image"][:1], rtol=0, atol=5e-4)


def test_tokenizer_encoder_from_dinov2_file_is_resampled_like_timm(dino, tokenizer_ckpt):
    import timm

    module = DMVAEModule.load_from_checkpoint(tokenizer_ckpt)
    ref = timm.create_model(
        DINO_B,
        pretrained=True,
        depth=1,
        img_size=256,
        patch_size=16,
        pretrained_cfg_overlay=dict(file=str(dino["file"])),
    )
    ours = module.tokenizer.encoder.model.state_dict()
    assert ours["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_tokenizer_full_public_state_encodes_like_public_code(vae_fx, dino, tmp_path):
    vit = dino["vit"]
    state = _full_public_vae_state(vae_fx, vit)
    ckpt = convert_public_tokenizer({"vae_ema": state, "vae_wo_ddp": state})
    assert ckpt["hyper_parameters"]["encoder"]["timm_kwargs"] == {"depth": 1}  # inferred
    assert max(ckpt["dmvae_import"]["normalisation_max_abs_diff"].values()) < 1e-7
    torch.save(ckpt, tmp_path / "tok.ckpt")
    module = DMVAEModule.load_from_checkpoint(tmp_path / "tok.ckpt").eval()
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(5)) * 2 - 1
    bott = {k: v.float() for k, v in vae_fx["vae_ema"].items()}
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        # the public computation: de_scale, scale, DINOv2 tokens without the prefix, MLP
        tokens = vit.forward_features(((x * 0.5 + 0.5) - mean) / std)[:, 1:]
        hidden = F.silu(
            F.linear(tokens, bott["bottle_neck.mlp.0.weight"], bott["bottle_neck.mlp.0.bias"])
        )
        ref = F.linear(hidden, bott["bottle_neck.mlp.2.weight"], bott["bottle_neck.mlp.2.bias"])
        z = module.encode(x)
    assert z.shape == (2, 32, 16, 16)
    torch.testing.assert_close(z.permute(0, 2, 3, 1).reshape(2, 256, 32), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(1)), "decoder.extra.weight"),
        (lambda sd: sd.__setitem__("disc.weight", torch.zeros(1)), "'disc.weight'"),
        (lambda sd: sd.pop("decoder.mid.block_2.conv2.bias"), "decoder.mid.block_2.conv2.bias"),
        (lambda sd: sd.pop("encoder.model.norm.bias"), "encoder.model.norm.bias"),
        (
            lambda sd: sd.__setitem__("encoder.scale.std", torch.full((1, 3, 1, 1), 0.5)),
            "encoder.scale.std",
        ),
        (
            lambda sd: sd.__setitem__("encoder.de_scale.mean", torch.zeros(1, 3, 1, 1)),
            "encoder.de_scale.mean",
        ),
    ],
)
def test_tokenizer_bad_keys_and_buffers_fail_by_name(vae_fx, dino, edit, match):
    state = _full_public_vae_state(vae_fx, dino["vit"])
    edit(state)
    with pytest.raises(ValueError, match=match):
        convert_public_tokenizer(state)


def test_tokenizer_options_and_missing_encoder(vae_fx, dino, tmp_path):
    with pytest.raises(ValueError, match="--encoder_weights"):
        convert_public_tokenizer(vae_fx)
    with pytest.raises(FileNotFoundError, match="--encoder_weights"):
        convert_public_tokenizer(vae_fx, encoder_weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="model_size='large'"):
        convert_public_tokenizer(vae_fx, model_size="large", encoder_weights=dino["file"])
    state = _full_public_vae_state(vae_fx, dino["vit"])
    with pytest.raises(ValueError, match="patch_size=14"):
        convert_public_tokenizer(state, patch_size=14)


# ---------------------------------------------------------------- sampling and the command
def test_imported_dit_samples_and_decodes_with_imported_tokenizer(dit_ckpt, tokenizer_ckpt):
    module = LatentDiffusionModule.load_from_checkpoint(
        dit_ckpt, tokenizer_ckpt=str(tokenizer_ckpt)
    ).eval()
    labels = torch.tensor([1, 7])
    gen = torch.Generator().manual_seed(0)
    z = module.sample(labels, steps=3, sampler="euler", generator=gen)
    assert z.shape == (2, 32, 4, 4) and torch.isfinite(z).all()
    # the same three Euler steps written out on the imported DiT (EMA weights in), from the
    # same noise: the samples are the DiT's, not the noise's
    hp = module.hparams
    noise = torch.randn((2, 32, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), module.ema_scope():
        x = flow.euler_sample(
            lambda x, t: module.dit.forward_with_cfg(x, t, labels, hp.sample_cfg),
            noise,
            3,
            hp.sample_shift,
        )
    torch.testing.assert_close(z, module.denormalize(x), rtol=1e-5, atol=1e-5)
    assert (z - module.denormalize(noise)).abs().max() > 1e-2
    gen = torch.Generator().manual_seed(0)
    images = module.sample(labels, steps=3, sampler="euler", generator=gen, decode=True)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    # decoded by the imported tokenizer, loaded here on its own
    with torch.no_grad():
        want = load_frozen_tokenizer(str(tokenizer_ckpt)).decode(z)
    torch.testing.assert_close(images, want, rtol=0, atol=1e-5)


def test_import_public_command(dit_fx, vae_fx, dino, tmp_path):
    src = tmp_path / "public_dit.pt"
    torch.save({**dit_fx["checkpoint"], "args": {"num_classes": 10, **STATS}}, src)
    out = tmp_path / "out" / "dit.ckpt"
    assert main(["import_public", "dit", "--src", str(src), "--out", str(out)]) is None
    got = torch.load(out, weights_only=True)
    want = convert_public_dit(dit_fx["checkpoint"], num_classes=10, **STATS)
    assert got["hyper_parameters"] == want["hyper_parameters"]
    assert all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())
    assert got["dmvae_import"]["source_file"] == str(src.resolve())

    state = _full_public_vae_state(vae_fx, dino["vit"])
    src = tmp_path / "public_vae.pt"
    torch.save({"vae_wo_ddp": state, "vae_ema": state, "steps": 0}, src)
    out = tmp_path / "tok.ckpt"
    main(["import_public", "tokenizer", "--src", str(src), "--out", str(out), "--no_ema"])
    got = torch.load(out, weights_only=True)
    assert got["dmvae_import"]["source_entry"] == "vae_wo_ddp"
    assert torch.equal(
        got["state_dict"]["tokenizer.encoder.model.norm.weight"], state["encoder.model.norm.weight"]
    )
    with pytest.raises(FileNotFoundError, match="--src"):
        main(["import_public", "dit", "--src", str(tmp_path / "missing.pt"), "--out", str(out)])


def test_public_dmvae_config_predicts_with_imported_weights(
    dit_ckpt, tokenizer_ckpt, tmp_path, monkeypatch
):
    """The shipped sampling config, pointed at the fixture imports, on CPU with synthetic labels:
    the PNGs are the samples ``sample`` draws with the config's sampler settings and the noise of
    batch 0 (the samplers themselves: tests/test_diffusion_module.py)."""
    monkeypatch.chdir(tmp_path)  # the PredictionWriter's relative output_dir lands here
    main(
        [
            "predict",
            "--config",
            str(REPO / "configs" / "imagenet" / "public_dmvae.yaml"),
            "--ckpt_path",
            str(dit_ckpt),
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.tokenizer_ckpt",
            str(tokenizer_ckpt),
            "--model.init_args.sample_steps=2",
            "--data.init_args.dataset=synthetic",
            "--data.init_args.image_size=32",
            "--data.init_args.num_classes=10",
            "--data.init_args.synthetic_size=2",  # one batch of 2 (no limit_* flag: "1" is ambiguous)
            "--data.init_args.val_batch_size=2",
            "--data.init_args.num_workers=0",
        ]
    )
    pngs = sorted((tmp_path / "runs" / "imagenet" / "public_samples" / "images").glob("*.png"))
    assert len(pngs) == 2
    import numpy as np
    from PIL import Image

    from dmvae_lightning.utils.rng import step_seed

    written = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in pngs]))
    assert written.shape == (2, 64, 64, 3)
    # the same samples drawn here: the config's sampler (SDE, cfg 1, shift 1), 2 steps, the
    # noise of batch 0 on rank 0 (seed 0), the labels the files are named with
    module = LatentDiffusionModule.load_from_checkpoint(
        dit_ckpt, tokenizer_ckpt=str(tokenizer_ckpt)
    ).eval()
    labels = torch.tensor([int(p.stem.rpartition("_c")[2]) for p in pngs])
    gen = torch.Generator().manual_seed(step_seed(0, 0, 0))
    z = module.sample(labels, steps=2, cfg=1.0, sampler="sde", shift=1.0, generator=gen)
    images = (module.decode(z).clamp(-1, 1) + 1) / 2
    want = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (written.int() - want.int()).abs().max() <= 1
    assert written.float().std() > 5  # images, not a constant grey
    other = module.sample(labels, steps=2, cfg=1.0, sampler="sde", shift=1.0, generator=gen)
    assert (other - z).abs().max() > 1e-3  # the next noise gives other samples
