"""DiT: exactness against the public LightningDiT fixture, label dropout, fixed tables, dtypes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from dmvae_lightning.nets.dit import DIT_CONFIGS, DiT, sincos_pos_embed_2d

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "public_dmvae"  # README.md there


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The fixture's init rule: adaLN-Zero would make every output 0 and hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def _tiny(**kw) -> DiT:
    kw = {"input_size": 4, "in_channels": 3, "num_classes": 5, **kw}
    return _randomize(DiT.from_preset("tiny", **kw)).eval()


def _inputs(n: int = 3, c: int = 3, h: int = 4, w: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    t = torch.rand(n, generator=gen)
    y = torch.arange(n) % 5
    return x, t, y


@pytest.fixture(scope="module")
def public():
    path = FIXTURES / "dit_mini.pt"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    f = torch.load(path, weights_only=True)
    state = {k: v.float() for k, v in f["checkpoint"]["ema"].items()}
    return f, state


def _public_model(f, state, **overrides) -> DiT:
    model = DiT.from_public_kwargs(f["config"]["constructor_kwargs"], **overrides)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_fixture_forward_and_cfg_match_public(public):
    f, state = public
    model = _public_model(f, state)
    with torch.no_grad():
        out = model(**f["inputs"])
        torch.testing.assert_close(out, f["outputs"]["forward"], rtol=0, atol=1e-5)
        # Public call: batch [x, x], y = [y, null]; ours takes each input once.
        cin, scale = f["cfg"]["inputs"], f["cfg"]["scale"]
        n = cin["x"].shape[0] // 2
        assert (cin["y"][n:] == model.null_class).all()
        guided = model.forward_with_cfg(cin["x"][:n], cin["t"][:n], cin["y"][:n], scale)
    expected = f["cfg"]["output"]
    torch.testing.assert_close(guided, expected[:n], rtol=0, atol=5e-5)
    torch.testing.assert_close(guided, expected[n:], rtol=0, atol=5e-5)


def test_fixture_fixed_tables_are_recomputed_identically(public):
    f, state = public
    model = _public_model(f, state)
    torch.testing.assert_close(model.pos_embed, state["pos_embed"], rtol=0, atol=1e-6)
    for key in ("freqs_cos", "freqs_sin"):
        ours = getattr(model.feat_rope, key)
        torch.testing.assert_close(ours, state[f"feat_rope.{key}"], rtol=0, atol=1e-6)
    # Not saved by us, silently accepted from public dicts (strict load above succeeded).
    assert not any("pos_embed" in k or "feat_rope" in k for k in model.state_dict())


@pytest.mark.parametrize(
    "override",
    [
        {"time_embed_scale": 1000.0},
        {"time_embed_order": "sin_cos"},
        {"pos_embed_order": "row_col"},
        {"rope_order": "col_row"},
    ],
)
def test_fixture_convention_options_change_the_output(public, override):
    """Each convention option is live: the non-public choice breaks the match clearly."""
    f, state = public
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stored tables no longer match the layout
        model = _public_model(f, state, **override)
    with torch.no_grad():
        out = model(**f["inputs"])
    assert (out - f["outputs"]["forward"]).abs().max() > 1e-2


def test_public_dict_loads_into_bf16_model_without_warnings(public):
    f, state = public
    model = DiT.from_public_kwargs(f["config"]["constructor_kwargs"]).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 buffers are not compared against fp32 tables
        model.load_state_dict(state, strict=True)


def test_mismatching_fixed_table_in_state_dict_warns():
    model = _tiny()
    state = model.state_dict()
    state["pos_embed"] = torch.zeros_like(model.pos_embed)
    with pytest.warns(UserWarning, match="pos_embed"):
        model.load_state_dict(state, strict=True)
    assert model.pos_embed.abs().sum() > 0  # recomputed table kept


def test_fresh_model_outputs_zero_adaln_zero():
    model = DiT.from_preset("tiny", input_size=4, in_channels=3, num_classes=5)
    x, t, y = _inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


def test_label_dropout_train_all_null_eval_none():
    model = _tiny(class_dropout_prob=1.0)
    x, t, y = _inputs()
    null = torch.full_like(y, model.null_class)
    with torch.no_grad():
        cond_eval = model(x, t, y)
        null_eval = model(x, t, null)
        assert (cond_eval - null_eval).abs().max() > 1e-3
        model.train()
        torch.testing.assert_close(model(x, t, y), null_eval, rtol=0, atol=1e-6)
        # forward_with_cfg never drops at random, even in training mode.
        guided_train = model.forward_with_cfg(x, t, y, 3.0)
        model.eval()
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 3.0), guided_train)
        torch.testing.assert_close(guided_train, null_eval + 3.0 * (cond_eval - null_eval))
        # Forced drops: only the marked rows become null.
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 0]))
    torch.testing.assert_close(forced[0], null_eval[0])
    torch.testing.assert_close(forced[1:], cond_eval[1:])


def test_null_label_table_row_and_y_none():
    model = _tiny()
    assert model.y_embedder.embedding_table.num_embeddings == model.num_classes + 1
    x, t, _ = _inputs()
    null = torch.full((3,), model.null_class)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, None), model(x, t, null))


def test_fixed_tables_are_buffers_not_parameters():
    model = _tiny()
    names = {n for n, _ in model.named_parameters()}
    assert not any("pos_embed" in n or "feat_rope" in n for n in names)
    assert "pos_embed" in dict(model.named_buffers())
    assert all(not b.requires_grad for b in model.buffers())
    expected = sincos_pos_embed_2d(model.hidden_size, 4, 4)[None]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, t, y = _inputs()
    model.train()
    model(x, t, y).square().mean().backward()
    opt.step()
    assert torch.equal(model.pos_embed, expected)


def test_pos_embed_layout_first_half_is_column():
    table = sincos_pos_embed_2d(8, 2, 3)  # tokens row-major over a 2 x 3 grid
    col, row = 2.0, 1.0  # token 5
    omega = torch.tensor([1.0, 1e-2])  # 1e4^(-k/2)
    expected = torch.cat([(col * omega).sin(), (col * omega).cos()])
    expected = torch.cat([expected, (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(table[5], expected)


def test_single_token_input_and_rope_identity():
    """A 1x1 grid (the 2-D toy study: (N, 2, 1, 1)) works; RoPE at position 0 is the identity."""
    kw = {"input_size": 1, "in_channels": 2, "num_classes": 0, "class_dropout_prob": 0.0}
    with_rope = _tiny(**kw)
    without = DiT.from_preset("tiny", use_rope=False, **kw).eval()
    without.load_state_dict(with_rope.state_dict())
    x = torch.randn(5, 2, 1, 1)
    t = torch.rand(5)
    out = with_rope(x, t)
    assert out.shape == (5, 2, 1, 1) and torch.isfinite(out).all()
    torch.testing.assert_close(out, without(x, t), rtol=0, atol=1e-6)


def test_any_grid_and_patch2_token_layout():
    """Without position information the model is equivariant to shifting whole patches, on a
    non-square grid other than the configured one; with RoPE it is not."""
    plain = _tiny(patch_size=2, use_pos_embed=False, use_rope=False)
    rope = _tiny(patch_size=2, use_pos_embed=False)
    x, t, y = _inputs(h=4, w=6)
    shifted = torch.roll(x, shifts=(2, 4), dims=(2, 3))
    with torch.no_grad():
        out = plain(x, t, y)
        torch.testing.assert_close(
            plain(shifted, t, y), torch.roll(out, shifts=(2, 4), dims=(2, 3)), rtol=0, atol=1e-5
        )
        moved = rope(shifted, t, y) - torch.roll(rope(x, t, y), shifts=(2, 4), dims=(2, 3))
    assert moved.abs().max() > 1e-3
    assert out.shape == x.shape


def test_unpatchify_channel_order_is_p_q_c():
    model = _tiny(patch_size=2)
    x, t, y = _inputs()
    captured = {}
    model.final_layer.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    with torch.no_grad():
        out = model(x, t, y)
    tokens = captured["tokens"]  # (N, T, p*p*C) with T = 2 x 2 patches
    n, row, col, p, q, c = 1, 1, 0, 0, 1, 2
    assert out[n, c, row * 2 + p, col * 2 + q] == tokens[n, row * 2 + col, (p * 2 + q) * 3 + c]


def test_grad_checkpointing_same_output_and_grads():
    """Checkpointed blocks run again in backward (each block twice per step instead of once)
    and give the same output and gradients."""
    ref = _tiny().train()
    ckpt = _tiny(grad_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    calls = {"ref": 0, "ckpt": 0}
    for key, model in (("ref", ref), ("ckpt", ckpt)):
        for block in model.blocks:
            # a pre-hook: the recomputation stops early, once it has what backward needs
            block.register_forward_pre_hook(lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
    x, t, y = _inputs()
    forced = torch.zeros_like(y)  # no random label dropout
    out_ref = ref(x, t, y, forced)
    out_ckpt = ckpt(x, t, y, forced)
    torch.testing.assert_close(out_ckpt, out_ref, rtol=0, atol=0)
    out_ref.square().sum().backward()
    out_ckpt.square().sum().backward()
    depth = len(ref.blocks)
    assert depth > 0 and calls == {"ref": depth, "ckpt": 2 * depth}  # recomputed in backward
    for (name, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_time_embedding_stays_fp32_under_bf16_autocast():
    model = _tiny()
    seen = {}
    model.t_embedder.mlp[0].register_forward_pre_hook(
        lambda m, args: seen.setdefault("freq", args[0])
    )
    x, _, y = _inputs()
    t = torch.tensor([0.1234567, 0.1234568, 0.9999999])  # apart in fp32, equal in bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    freq = seen["freq"]
    assert freq.dtype == torch.float32
    assert out.dtype == torch.bfloat16  # the rest does run under autocast
    torch.testing.assert_close(freq, model.t_embedder.sinusoid(t), rtol=0, atol=0)
    assert not torch.equal(freq[0], freq[1])
    # [cos | sin] of the unscaled t with f_0 = 1.
    torch.testing.assert_close(freq[:, 0], t.cos())
    torch.testing.assert_close(freq[:, 128], t.sin())


def test_bf16_weights_without_autocast_run():
    model = _tiny().to(torch.bfloat16)
    x, t, y = _inputs()
    out = model(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_presets_and_public_kwargs():
    assert DIT_CONFIGS["XL"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16}
    mini = DiT.from_preset("LightningDiT-Mini/1", input_size=2, in_channels=4, num_classes=3)
    assert len(mini.blocks) == 6 and mini.hidden_size == 256 and mini.patch_size == 1
    assert mini.blocks[0].mlp.w3.in_features == 682  # public int(2/3 * 4 * 256)
    assert DiT._mlp_hidden(256, 4.0, True, "multiple_of_8") == 688
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiT.from_preset("XXL")
    with pytest.raises(ValueError, match="conflicts"):
        DiT.from_preset("tiny/2", patch_size=1)
    with pytest.raises(TypeError, match="unknown LightningDiT argument"):
        DiT.from_public_kwargs({"input_size": 4, "use_rope_typo": True})
    with pytest.raises(ValueError, match="divisible"):
        DiT.from_preset("tiny", input_size=5, patch_size=2)


def test_rmsnorm_fused_fp32_path_is_the_written_formula():
    """fp32 RMSNorm runs the fused kernel; values and gradients are the formula's
    ``x / sqrt(mean(x^2) + eps) * weight``, and the bf16 path normalises in fp32 as before."""
    from dmvae_lightning.nets.dit import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(16))
    x = (3 * torch.randn(5, 7, 16)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)

    def formula(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight

    y, ref = norm(x), formula(x_ref)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x_ref, norm.weight), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    xb = x.detach().bfloat16()
    expected = (formula(xb.float()).detach() / norm.weight.detach()).bfloat16().float()
    torch.testing.assert_close(norm(xb).detach(), expected * norm.weight.detach())


def test_block_modulation_and_gates_are_written_formula():
    """The adaLN block (addcmul form): x + g1 * attn(n1(x) * (1 + s1) + b1), then the same with
    the MLP, written out here with plain products and sums."""
    from dmvae_lightning.nets.dit import DiTBlock

    torch.manual_seed(0)
    block = DiTBlock(32, 4, 64, use_qknorm=True, use_swiglu=True, use_rmsnorm=True, wo_shift=False)
    _randomize(block)
    x, c = torch.randn(3, 5, 32), torch.randn(3, 32)
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        m[:, None] for m in block.adaLN_modulation(c).chunk(6, dim=1)
    )
    h = x + gate1 * block.attn(block.norm1(x) * (1 + scale1) + shift1, None)
    ref = h + gate2 * block.mlp(block.norm2(h) * (1 + scale2) + shift2)
    torch.testing.assert_close(block(x, c, None), ref, rtol=1e-5, atol=1e-5)
