"""torch.compile options (DiT, DMD score models, tokenizer encoder/decoder), channels_last, the
TF32 callback, and the train-step benchmark / GPU parity check at tiny sizes on the CPU.

Compiled-vs-eager tolerances: the ``aot_eager`` backend (dynamo + AOTAutograd, eager kernels)
must give the eager values up to reassociation: rtol 1e-5 / atol 1e-6 for outputs, losses and
gradients; ``inductor`` (generated C++ kernels, fused and reordered fp32 arithmetic) rtol 1e-4 /
atol 1e-5. Most tests use ``aot_eager``: an inductor build costs tens of seconds per graph on
two CPU cores, so one tiny DiT forward covers the inductor path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dmvae_lightning.callbacks import TF32Matmul
from dmvae_lightning.callbacks import precision as precision_module
from dmvae_lightning.losses.matching import DMDLoss
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.nets.dit import DiT
from dmvae_lightning.utils.compile import RECOMPILE_LIMIT, compile_module, compile_options

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

AOT = {"backend": "aot_eager"}
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    net = DiT(input_size=4, in_channels=2, patch_size=1, hidden_size=32, depth=1, num_heads=2,
              num_classes=3)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adaLN-Zero init would make every output 0
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def tiny_tokenizer(**kwargs) -> DMVAEModule:
    torch.manual_seed(0)
    return DMVAEModule(
        image_channels=1,
        latent_channels=2,
        encoder={"name": "conv", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1},
        bottleneck_hidden=16,
        decoder={"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False},
        discriminator={"ch": 8, "n_layers": 1},
        ema_decay=None,
        **kwargs,
    )


# ---------------------------------------------------------------------------------- options
def test_compile_options_parse_and_reject_unknown_keys():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options(True, backend="aot_eager") == {"backend": "aot_eager"}
    spec = {"mode": "max-autotune", "dynamic": False}
    assert compile_options(spec, backend="inductor") == {**spec, "backend": "inductor"}
    assert compile_options({"backend": "eager"}, backend="inductor") == {"backend": "eager"}
    with pytest.raises(ValueError, match=r"DMDLoss.compile: unknown .*\['modes'\]"):
        compile_options({"modes": "x"}, "DMDLoss.compile")
    with pytest.raises(TypeError, match="compile must be a bool"):
        compile_options("yes")
    module = nn.Linear(2, 2)
    assert compile_module(module, False) is False and module._compiled_call_impl is None


def test_many_compiled_modules_each_get_a_graph():
    """All modules compiled in place share one frame; past dynamo's default limit of 8 graphs
    per frame the rest would silently run eager. compile_module raises the limit."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mods = [nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.ReLU(), nn.Tanh(), nn.Sigmoid(),
            nn.SiLU(), nn.Softplus(), nn.ELU(), nn.Mish(), nn.Hardtanh(), nn.Softsign()]  # fmt: skip
    for m in mods:
        compile_module(m, {"backend": backend})
    x = torch.randn(3, 4)
    for m in mods:
        m(x)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    assert len(graphs) == len(mods) > 8


# ---------------------------------------------------------------------------------- DiT
def test_dit_inductor_forward_matches_eager():
    eager = tiny_dit().eval()
    compiled = copy.deepcopy(eager)
    compile_module(compiled, True)
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        expected, got = eager(x, t, y), compiled(x, t, y)
    # dynamo captured the forward (a silently eager "compiled" module would compare eager
    # with eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())


# ---------------------------------------------------------------------------------- DMD
def dmd_pair(compile) -> DMDLoss:
    loss = DMDLoss(tiny_dit(), cfg_scale=3.0, compile=compile)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in loss.fake.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return loss


def test_dmd_compiled_score_models_give_eager_loss_and_gradients():
    eager, compiled = dmd_pair(False), dmd_pair(AOT)
    assert eager.real._compiled_call_impl is None
    assert compiled.real._compiled_call_impl is not None
    assert compiled.fake._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 2, 4, 4, generator=g)
    t, eps = torch.rand(4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    results = []
    for loss in (eager, compiled):
        z = z0.clone().requires_grad_(True)
        value, _ = loss.loss(z, y, t=t, eps=eps)
        value.backward()
        torch.manual_seed(3)  # same t, noise and label dropout in the fake step
        fake = loss.fake_loss(z0, y)
        fake.backward()
        grads = [p.grad.clone() for p in loss.fake.parameters()]
        results.append((value.detach(), z.grad, fake.detach(), grads))
    (v_e, g_e, f_e, fg_e), (v_c, g_c, f_c, fg_c) = results
    assert g_e.abs().max() > 0 and v_e > 0
    torch.testing.assert_close(v_c, v_e, **TIGHT)
    torch.testing.assert_close(g_c, g_e, **TIGHT)
    torch.testing.assert_close(f_c, f_e, **TIGHT)
    for a, b in zip(fg_c, fg_e, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    for p in compiled.real.parameters():  # still frozen
        assert p.grad is None


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_compiled_encode_decode_and_gradients_match_eager():
    eager, compiled = tiny_tokenizer(), tiny_tokenizer(compile=AOT)
    assert compiled.tokenizer.encoder._compiled_call_impl is not None
    assert compiled.tokenizer.decoder._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = []
    for module in (eager, compiled):
        z = module.encode(x)
        rec = module.decode(z)
        rec.square().mean().backward()
        grads = [p.grad.clone() for p in module.tokenizer.parameters()]
        out.append((z.detach(), rec.detach(), grads))
    (z_e, r_e, g_e), (z_c, r_c, g_c) = out
    torch.testing.assert_close(z_c, z_e, **TIGHT)
    torch.testing.assert_close(r_c, r_e, **TIGHT)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_checkpoints_load_compiled_into_eager_and_back(tmp_path):
    """Saved compiled -> loaded eager and the other way: identical keys, identical tensors."""
    compiled = tiny_tokenizer(compile=AOT, matching_loss=dmd_pair(AOT), matching_weight=1.0)
    eager = tiny_tokenizer(matching_loss=dmd_pair(False), matching_weight=1.0)
    with torch.no_grad():
        for p in compiled.parameters():
            p.add_(1.0)  # make the two state dicts differ
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    eager.load_state_dict(torch.load(tmp_path / "compiled.pt", weights_only=True))
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    fresh = tiny_tokenizer(compile=AOT, matching_loss=dmd_pair(AOT), matching_weight=1.0)
    torch.save(eager.state_dict(), tmp_path / "eager.pt")
    fresh.load_state_dict(torch.load(tmp_path / "eager.pt", weights_only=True))
    for (k, a), b in zip(fresh.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------- layouts
def test_channels_last_decoder_and_discriminator_same_values():
    eager, nhwc = tiny_tokenizer(), tiny_tokenizer(channels_last=True)
    nhwc.load_state_dict(eager.state_dict())
    conv_weights = [
        p
        for part in (nhwc.tokenizer.decoder, nhwc.discriminator)
        for p in part.parameters()
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1
    ]
    assert conv_weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert all(not p.is_contiguous() for p in conv_weights)
    z = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(nhwc.decode(z), eager.decode(z), rtol=1e-5, atol=1e-5)
        x = torch.rand(2, 1, 16, 16)
        torch.testing.assert_close(nhwc.discriminator(x), eager.discriminator(x), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    plain = tiny_tokenizer()
    plain.load_state_dict(nhwc.state_dict())
    assert all(p.is_contiguous() for p in plain.parameters())


def test_tf32_callback_sets_and_restores_only_where_supported(monkeypatch):
    before = torch.get_float32_matmul_precision()
    trainer = type("T", (), {"strategy": type("S", (), {"root_device": torch.device("cpu")})()})()
    callback = TF32Matmul()
    callback.setup(trainer, None, "fit")  # CPU: nothing
    assert torch.get_float32_matmul_precision() == before == "highest"
    monkeypatch.setattr(precision_module, "tf32_supported", lambda device: True)
    callback.setup(trainer, None, "fit")
    assert torch.get_float32_matmul_precision() == "high"
    callback.teardown(trainer, None, "fit")
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="TF32Matmul.precision"):
        TF32Matmul(precision="low")


# ---------------------------------------------------------------------------------- benchmark
def test_bench_train_step_small_reports_both_variants(tmp_path):
    import bench_train_step

    out = tmp_path / "bench.json"
    result = bench_train_step.main(["--small", "--stages", "dit-b", "--compile_backend",
                                    "aot_eager", "--warmup", "1", "--steps", "1", "--rounds",
                                    "2", "--device", "cpu", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    stage = result["stages"]["dit-b"]
    # A DiT step does at least 6 * (attention + MLP weights) * tokens (2 forward, 4 backward
    # per weight and token); the adaLN weights act once per sample, not per token.
    net = DiT(input_size=8, in_channels=4, patch_size=1, num_classes=10,
              **bench_train_step.SMALL["dit"]["dit-b"])  # fmt: skip
    linear = sum(
        m.weight.numel()
        for block in net.blocks
        for part in (block.attn, block.mlp)
        for m in part.modules()
        if isinstance(m, nn.Linear)
    )
    assert stage["flops_per_step"] >= 6 * linear * 4 * 64
    for name in ("eager", "compiled"):
        v = stage["variants"][name]
        assert v["ms_per_step"] > 0 and len(v["rounds_ms"]) == 2 and v["mfu"] is None
        assert v["images_per_s"] == pytest.approx(4 / (v["ms_per_step"] / 1e3))
    assert stage["compiled_over_eager"] == pytest.approx(
        stage["variants"]["compiled"]["ms_per_step"] / stage["variants"]["eager"]["ms_per_step"]
    )


def test_gpu_parity_small_passes_and_measures_a_real_difference():
    import gpu_parity

    result = gpu_parity.main(["--small", "--device", "cpu", "--checks", "dit_forward,dmd_gradient"])
    assert result["passed"]
    for name in ("dit_forward", "dmd_gradient"):
        figures = result["checks"][name]
        # bf16 really ran (a zero error would mean both sides computed in fp32 or aliased).
        assert 0 < figures["rel_l2"] <= gpu_parity.CPU_TOLERANCES[name]["rel_l2"]


def test_bench_eager_only_skips_the_compiled_variant_of_the_stages_it_names():
    """The GPU check times the alignment stage eager only (its compilation outlasts the
    budget): --eager_only drops that stage's compiled build, keeps the others', and refuses a
    stage left with no variant."""
    import bench_train_step

    args = bench_train_step.parse_args(["--small", "--stages", "dit-b,align",
                                        "--eager_only", "align", "--device", "cpu"])  # fmt: skip
    assert bench_train_step.variants_of("align", args) == ["eager"]
    assert bench_train_step.variants_of("dit-b", args) == ["eager", "compiled"]
    result = bench_train_step.main(["--small", "--stages", "dit-b", "--eager_only", "dit-b",
                                    "--warmup", "1", "--steps", "1", "--rounds", "1",
                                    "--device", "cpu"])  # fmt: skip
    stage = result["stages"]["dit-b"]
    assert list(stage["variants"]) == ["eager"] and "compiled_over_eager" not in stage
    assert result["settings"]["eager_only"] == ["dit-b"]
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--stages", "align", "--eager_only", "align",
                                     "--variants", "compiled"])  # fmt: skip
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--eager_only", "vae"])


def test_gpu_check_script_small_writes_valid_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "BENCH_ARGS": "--stages dit-b --variants eager --rounds 1",
        "PARITY_ARGS": "--checks dit_forward",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--small", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["small"]
    assert list(result["bench"]["stages"]) == ["dit-b"]
    assert list(result["parity"]["checks"]) == ["dit_forward"]
    assert result["decoder_exit_code"] == 0
    assert 0 < result["decoder"]["study_train"]["relative_difference"] < 1e-5


def test_align_fit_compiled_matches_eager(tmp_path, stage_ckpts):
    """The whole stage-3 training step under Lightning (manual optimisation, adaptive GAN
    weight, DMD with CFG, fake steps, EMA) with the encoder, decoder and both score models
    compiled (aot_eager) ends 7 batches later where the eager run ends."""
    from dmvae_lightning.cli import main

    states = []
    for compile_args in ([], ["--model.init_args.compile", json.dumps(AOT),
                              "--model.init_args.matching_loss.init_args.compile",
                              json.dumps(AOT)]):  # fmt: skip
        torch._dynamo.reset()
        args = ["--config", str(REPO / "tests" / "configs" / "align_tiny.yaml"),
                "--trainer.default_root_dir", str(tmp_path / str(len(states))),
                "--trainer.logger", "false",
                "--model.init_args.init_from", stage_ckpts["tokenizer"],
                "--model.init_args.matching_loss.init_args.real_model", stage_ckpts["reference"],
                *compile_args]  # fmt: skip
        cli = main(args, run=False)
        model = cli.model
        assert (model.tokenizer.decoder._compiled_call_impl is not None) == bool(compile_args)
        cli.trainer.fit(model, datamodule=cli.datamodule)
        assert int(model.batch_count) == 7
        states.append(model.state_dict())
    eager, compiled = states
    assert list(eager) == list(compiled)
    for key, value in eager.items():
        if value.is_floating_point():
            torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(compiled[key], value), key


def test_bench_decoder_keeps_less_for_backward_and_agrees_with_the_resize_form(tmp_path):
    """The decoder benchmark's figures that do not depend on the clock: the transposed form
    keeps fewer bytes for the backward pass (the low-resolution input instead of the upsampled
    one), exactly as many as the shapes say, and both forms give the same image."""
    import bench_decoder

    out = tmp_path / "decoder.json"
    result = bench_decoder.main(["--flagship_batch", "0", "--steps", "1", "--rounds", "1",
                                 "--threads", "1", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    train = result["study_train"]
    saved = train["saved_bytes"]
    # study decoder: upsampled inputs of 32 ch at 16x16 and 32x32 (batch 64, fp32) are replaced
    # by their 8x8 and 16x16 originals; each of the two upsamplings keeps its 32x32x4x4 kernel
    # instead of the 32x32x3x3 weight
    fewer = 64 * 32 * 4 * ((16 * 16 - 8 * 8) + (32 * 32 - 16 * 16))
    kernels = 2 * 32 * 32 * (16 - 9) * 4
    assert saved["resize"] - saved["transposed"] == fewer - kernels
    for part in ("study_train", "study_decode"):
        assert 0 < result[part]["relative_difference"] < 1e-5
        assert result[part]["ms"]["resize"] > 0 and result[part]["ms"]["transposed"] > 0


def test_bench_dit_ops_forms_agree():
    """The DiT benchmark's written-out norms, modulation and gates compute what the fused ones
    do (the benchmark would otherwise time two different networks)."""
    import bench_dit_ops

    result = bench_dit_ops.main(["--threads", "1", "--sample_batch", "8", "--train_batch", "4",
                                 "--steps", "1", "--rounds", "1"])  # fmt: skip
    assert result["max_abs_difference"] < 1e-5
    assert result["sample"]["written_ms"] > 0 and result["train"]["fused_ms"] > 0
    # and the written forms are really swapped in and out
    import dmvae_lightning.nets.dit as dit

    fused = dit.RMSNorm.forward
    with bench_dit_ops.form("written"):
        assert dit.RMSNorm.forward is bench_dit_ops.written_rms_norm
    assert dit.RMSNorm.forward is fused
