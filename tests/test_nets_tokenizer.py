"""Tokenizer networks: public-decoder fixture, shapes/factors, timm wrapping, builder errors."""

import ast
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dmvae_lightning.nets import (
    ConvEncoder,
    Decoder,
    MLPBottleneck,
    PatchDiscriminator,
    TimmEncoder,
    build_encoder,
)
from dmvae_lightning.nets.decoder import Upsample, group_norm, upsample_conv_weight

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "public_dmvae"  # README.md there
TINY_VIT = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------- public decoder fixture


def test_public_decoder_fixture(no_tf32):
    path = FIXTURES / "vae_decoder.pt"
    f = torch.load(path, weights_only=True)
    sd = f["vae_ema"]

    def part(prefix):
        return {k[len(prefix) :]: v.float() for k, v in sd.items() if k.startswith(prefix)}

    cfg = f["config"]
    dec = Decoder(
        z_channels=cfg["decoder"]["post_init_z_channels"],
        out_channels=cfg["decoder"]["out_ch"],
        ch=cfg["decoder"]["ch"],
        ch_mult=cfg["decoder"]["ch_mult"],
        num_res_blocks=cfg["decoder"]["num_res_blocks"],
        input_upsample=True,
    ).eval()
    bott = MLPBottleneck(**cfg["bottle_neck"]).eval()
    dec.load_state_dict(part("decoder."), strict=True)
    bott.load_state_dict(part("bottle_neck."), strict=True)
    assert dec.get_last_layer() is dec.conv_out.weight

    with torch.no_grad():
        latent = bott(f["inputs"]["tokens"])
        torch.testing.assert_close(latent, f["outputs"]["latent"], rtol=0, atol=1e-5)
        image = dec(f["outputs"]["latent"])
        assert image.shape == (2, 3, 256, 256)
        torch.testing.assert_close(image, f["outputs"]["image"], rtol=0, atol=5e-4)
        # the same latent as NCHW (row-major token grid), one sample: same image
        ref = f["outputs"]["image"][1:]
        nchw = f["outputs"]["latent"][1:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(dec(nchw), ref, rtol=0, atol=5e-4)
        # sensitivity: a GroupNorm gain set to 1 must move the output far beyond the tolerance
        dec.mid.attn_1.norm.weight.fill_(1.0)
        assert (dec(nchw) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("size", [(5, 7), (8, 8), (1, 3)])
def test_upsample_equals_nearest_resize_then_conv(size):
    """Upsample's transposed convolution is nearest x2 + the 3x3 conv, values and gradients
    (float64, so that only rounding of the order of 1e-15 separates them), on odd sizes too."""
    torch.manual_seed(0)
    up = Upsample(3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = up(x)
    assert y.shape == (2, 3, 2 * size[0], 2 * size[1])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(
        F.interpolate(x_ref, scale_factor=2.0, mode="nearest"),
        up.conv.weight,
        up.conv.bias,
        padding=1,
    )
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, up.conv.weight, up.conv.bias), g)
    grads_ref = torch.autograd.grad(ref, (x_ref, up.conv.weight, up.conv.bias), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # the kernel taps: per axis (w2, w1 + w2, w0 + w1, w0), transposed to (C_in, C_out, 4, 4)
    w = up.conv.weight
    k = upsample_conv_weight(w)
    assert k.shape == (3, 3, 4, 4)
    torch.testing.assert_close(
        k[:, :, 1, 2], (w[:, :, 1, 0] + w[:, :, 1, 1] + w[:, :, 2, 0] + w[:, :, 2, 1]).T
    )
    torch.testing.assert_close(k[:, :, 3, 0], w[:, :, 0, 2].T)


def test_upsample_bf16_autocast_matches_fp32():
    """Under bf16 autocast the kernel is built in fp32 and cast once by the convolution: the
    result is the fp32 one to bf16 precision."""
    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = up(x)
    assert y.dtype == torch.bfloat16
    ref = up(x)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 2e-2


def test_latents_and_decoder_activations_are_contiguous_nchw():
    """The MLP bottleneck returns contiguous NCHW latents, and the decoder turns a channels-last
    view (row-major tokens, a permuted latent) into NCHW before its first convolution: the
    convolutions keep the layout they are given, and CPU GroupNorm on channels-last memory made
    the tokenizer training step 1.1x slower."""
    torch.manual_seed(0)
    bottleneck = MLPBottleneck(in_dim=8, hidden_dim=16, out_dim=4)
    z = bottleneck(torch.randn(2, 8, 4, 4))
    assert z.shape == (2, 4, 4, 4) and z.is_contiguous()
    decoder = Decoder(z_channels=4, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=0,
                      mid_attention=False)  # fmt: skip
    layouts = []
    for module in decoder.modules():
        if isinstance(module, nn.GroupNorm):
            module.register_forward_pre_hook(
                lambda m, args: layouts.append(args[0].is_contiguous())
            )
    channels_last = z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not channels_last.is_contiguous()
    tokens = z.flatten(2).transpose(1, 2)  # (B, N, C) row-major
    for latent in (channels_last, tokens):
        layouts.clear()
        out = decoder(latent)
        assert layouts and all(layouts)
        torch.testing.assert_close(out, decoder(z))


def test_decoder_parameter_names_match_public_keys():
    keys_file = FIXTURES / "vae_decoder_keys.txt"
    public = {}
    for line in keys_file.read_text().splitlines():
        if line.startswith("decoder."):
            name, shape = line.split("\t")[:2]
            public[name[len("decoder.") :]] = tuple(ast.literal_eval(shape))
    dec = Decoder(32, 3, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, input_upsample=True)
    ours = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert ours == public


# ---------------------------------------------------------------- decoder / encoder shapes


@pytest.mark.parametrize(
    ("ch_mult", "input_upsample", "factor"),
    [((1, 2), False, 2), ((1, 2, 2), False, 4), ((1, 2), True, 4), ((1,), True, 2)],
)
def test_decoder_upsample_factor(ch_mult, input_upsample, factor):
    dec = Decoder(
        4, out_channels=1, ch=8, ch_mult=ch_mult, num_res_blocks=1, input_upsample=input_upsample
    )
    assert dec.upsample_factor == factor
    assert dec(torch.randn(2, 4, 3, 5)).shape == (2, 1, 3 * factor, 5 * factor)
    assert isinstance(dec.conv_in, nn.Sequential) == input_upsample


def test_decoder_tokens_and_options():
    torch.manual_seed(0)
    dec = Decoder(4, out_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=0, mid_attention=False)
    assert not any("attn" in k for k in dec.state_dict())
    z = torch.randn(2, 4, 3, 3)
    tokens = z.permute(0, 2, 3, 1).reshape(2, 9, 4)  # token = row * w + col
    assert torch.equal(dec(tokens), dec(z))
    with pytest.raises(ValueError, match="perfect square"):
        dec(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="latent channels"):
        dec(torch.randn(2, 5, 3, 3))


def test_conv_encoder_decoder_round_trip_32px_one_channel():
    torch.manual_seed(0)
    enc = ConvEncoder(in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, mid_attention=True)
    assert enc.downsample_factor == 4 and enc.out_dim == 32
    bott = MLPBottleneck(enc.out_dim, 4, 16)
    dec = Decoder(4, out_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = enc(x)
    assert feats.shape == (3, 32, 8, 8)
    z = bott(feats)
    assert z.shape == (3, 4, 8, 8)
    y = dec(z)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert ConvEncoder(ch=8, ch_mult=(1, 2), out_dim=6)(torch.zeros(1, 3, 16, 16)).shape == (
        1,
        6,
        8,
        8,
    )


def test_group_norm_groups():
    assert group_norm(128).num_groups == 32
    assert group_norm(48).num_groups == 16
    assert group_norm(8).num_groups == 8
    assert group_norm(64).eps == 1e-6


def test_mlp_bottleneck_layouts_agree():
    torch.manual_seed(0)
    bott = MLPBottleneck(6, 3, 5)
    assert set(bott.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    x = torch.randn(2, 6, 3, 4)
    tokens = x.flatten(2).transpose(1, 2)  # (B, 12, 6), row-major
    out_map, out_tok = bott(x), bott(tokens)
    assert out_map.shape == (2, 3, 3, 4) and out_tok.shape == (2, 12, 3)
    torch.testing.assert_close(out_map.flatten(2).transpose(1, 2), out_tok, rtol=0, atol=1e-6)
    lin0, lin2 = bott.mlp[0], bott.mlp[2]
    expected = lin2(nn.functional.silu(lin0(x[0, :, 1, 2])))
    torch.testing.assert_close(out_map[0, :, 1, 2], expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- timm encoder


def test_timm_vit_normalisation_prefix_and_row_major_reshape():
    torch.manual_seed(0)
    enc = TimmEncoder(
        "vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=1, reg_tokens=2, frozen=True
    )
    assert enc.num_prefix_tokens == 3 and enc.downsample_factor == 8 and enc.out_dim == 192
    mean = torch.tensor(enc.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(enc.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert torch.equal(enc.mean, mean) and torch.equal(enc.std, std)
    assert "mean" not in enc.state_dict()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    out = enc(x)
    assert out.shape == (2, 192, 4, 6)
    with torch.no_grad():
        ref = enc.model.forward_features(((x + 1) / 2 - mean) / std)
    row, col = 2, 5
    torch.testing.assert_close(out[:, :, row, col], ref[:, 3 + row * 6 + col], rtol=0, atol=0)


def test_timm_weights_path_without_pretrained_is_a_warning(tmp_path):
    """A weights file named but ``pretrained: false``: the encoder starts from random weights
    without reading it, which is said (naming the option), not silent."""
    path = tmp_path / "weights.pth"
    with pytest.warns(UserWarning, match=r"set model\.init_args\.encoder\.pretrained: true"):
        TimmEncoder(**TINY_VIT, weights_path=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TimmEncoder(**TINY_VIT)  # nothing named: nothing said


def test_timm_one_channel_input_is_repeated():
    torch.manual_seed(0)
    gray = TimmEncoder(**TINY_VIT, in_channels=1)
    rgb = TimmEncoder(**TINY_VIT)
    rgb.model.load_state_dict(gray.model.state_dict())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(gray(x), rgb(x.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="in_channels"):
        TimmEncoder(**TINY_VIT, in_channels=2)


def test_timm_frozen_stays_eval_and_gets_no_grad():
    enc = TimmEncoder(**TINY_VIT, frozen=True)
    enc.train()
    assert enc.training and not enc.model.training
    assert not any(m.training for m in enc.model.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc(torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1)
    out.sum().backward()
    assert all(p.grad is None for p in enc.parameters())

    trainable = TimmEncoder(**TINY_VIT, frozen=False).train()
    assert trainable.model.training
    trainable(torch.rand(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters())  # head removed: none unused
    trainable.set_frozen(True)
    assert not trainable.model.training and not any(p.requires_grad for p in trainable.parameters())


def test_timm_cnn_feature_map():
    enc = TimmEncoder("resnet18", frozen=False)
    assert enc.downsample_factor == 32 and enc.out_dim == 512
    assert enc(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 2, 3)


def test_timm_pretrained_weights_loaded_from_file(tmp_path):
    torch.manual_seed(123)
    src = timm.create_model(**TINY_VIT)
    saved = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "vit_tiny.pth"
    torch.save(saved, path)
    torch.manual_seed(0)
    enc = TimmEncoder(**TINY_VIT, pretrained=True, weights_path=str(path))
    loaded = enc.model.state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("head.")}
    for k, v in loaded.items():
        assert torch.equal(v, saved[k]), k
    # a random init differs, so the equality above is not trivial
    assert not torch.equal(TimmEncoder(**TINY_VIT).model.pos_embed, saved["pos_embed"])


def test_timm_pretrained_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="encoder.weights_path") as err:
        TimmEncoder(**TINY_VIT, pretrained=True, weights_path=missing)
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="encoder.weights_path"):
        TimmEncoder(**TINY_VIT, pretrained=True)


def test_timm_pretrained_file_that_does_not_fit(tmp_path):
    sd = timm.create_model(**TINY_VIT).state_dict()
    del sd["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"encoder\.weights_path(.|\n)*blocks\.1\.mlp\.fc2"):
        TimmEncoder(**TINY_VIT, pretrained=True, weights_path=path)


# ---------------------------------------------------------------- builder


def test_build_encoder():
    enc = build_encoder({"name": "conv", "in_channels": 1, "ch": 8, "ch_mult": [1, 2]})
    assert isinstance(enc, ConvEncoder) and enc.downsample_factor == 2 and enc.out_dim == 16
    vit = build_encoder({"name": "timm", **TINY_VIT})
    assert isinstance(vit, TimmEncoder) and vit.downsample_factor == 8
    with pytest.raises(ValueError, match=r"'conv', 'timm'"):
        build_encoder({"name": "dino"})
    with pytest.raises(ValueError, match="model.init_args.encoder"):
        build_encoder({"ch": 8})
    with pytest.raises(TypeError, match=r"model\.init_args\.encoder.*chmult"):
        build_encoder({"name": "conv", "chmult": [1, 2]})
    with pytest.raises(TypeError, match=r"model\.init_args\.encoder(.|\n)*depht"):
        build_encoder({"name": "timm", "model_name": "vit_tiny_patch16_224", "depht": 2})


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize(
    ("size", "n_layers", "norm", "out"),
    [
        (32, 2, "group", 6),
        (32, 3, "group", 2),
        (32, 3, "batch", 2),
        (32, 3, "none", 2),
        (256, 3, "group", 30),
    ],
)
def test_patch_discriminator_shapes(size, n_layers, norm, out):
    disc = PatchDiscriminator(in_channels=1, ch=8, n_layers=n_layers, norm=norm)
    assert disc(torch.rand(2, 1, size, size) * 2 - 1).shape == (2, 1, out, out)
    has_bias = [m.bias is not None for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert has_bias[1:-1] == [norm == "none"] * n_layers  # no conv bias before a norm


def test_patch_discriminator_group_norm_is_per_sample_and_errors():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ch=16, n_layers=3).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[1:2], disc(x[1:2]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=4)(x)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")
