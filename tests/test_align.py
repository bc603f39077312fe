"""Stage 3 (DMD alignment) of DMVAEModule: two-time-scale counting, encode-only batches, frozen
real model and buffers, exact kill-and-resume, other matching losses, and the errors that name
the option to fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import SaveAtBatch, assert_same, checkpoints

from dmvae_lightning import flow
from dmvae_lightning.cli import main
from dmvae_lightning.losses.matching import DMDLoss, GaussianKLLoss, MMDLoss
from dmvae_lightning.modules.dmvae import DMVAEModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
ALIGN_TINY = str(CONFIGS / "align_tiny.yaml")


def align_args(root: Path, ckpts: dict[str, str], *extra: str) -> list[str]:
    return [
        "--config",
        ALIGN_TINY,
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.init_from",
        ckpts["tokenizer"],
        "--model.init_args.matching_loss.init_args.real_model",
        ckpts["reference"],
        *extra,
    ]


def build(root: Path, ckpts: dict[str, str], *extra: str):
    return main(align_args(root, ckpts, *extra), run=False)


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps taken by an Adam(W) optimizer (its per-parameter ``step`` counter)."""
    states = [s for s in optimizer.state.values() if "step" in s]
    counts = {int(s["step"]) for s in states}
    assert len(counts) <= 1, counts
    return counts.pop() if counts else 0


def test_vae_every_defaults_to_5_only_with_a_fake_model_to_train(tmp_path, stage_ckpts):
    """Between VAE steps only the DMD fake model trains: with another matching loss, or DMD at
    weight 0, the default is a VAE step on every batch; an explicit value is kept."""
    default = ["--model.init_args.vae_every", "null"]
    mmd = ["--model.init_args.matching_loss", "dmvae_lightning.losses.matching.MMDLoss"]
    cases = [
        (default, 5),
        ([*default, "--model.init_args.matching_weight", "0"], 1),
        ([*default, *mmd], 1),
        (mmd, 3),  # align_tiny.yaml's own vae_every
    ]
    for i, (extra, want) in enumerate(cases):
        assert build(tmp_path / str(i), stage_ckpts, *extra).model.vae_every == want, extra


def test_a_gaussian_kl_without_a_gaussian_bottleneck_is_refused_at_construction():
    """The KL needs the posterior: refused when the module is built (it used to fail at the
    first VAE step), naming the option; at weight 0 (not computed) it is accepted."""
    from dmvae_lightning.modules.dmvae import DMVAEModule

    with pytest.raises(ValueError, match=r"model\.init_args\.bottleneck_gaussian: true"):
        DMVAEModule(stage="pretrain", matching_loss=GaussianKLLoss())
    DMVAEModule(stage="pretrain", matching_loss=GaussianKLLoss(), matching_weight=0.0)


def test_a_matching_loss_in_the_finetune_stage_is_refused():
    """Fine-tuning freezes encoder and bottleneck: a matching term could not move the latents,
    so configuring one is an error naming the option (before any file is read)."""
    from dmvae_lightning.losses.matching import MMDLoss
    from dmvae_lightning.modules.dmvae import DMVAEModule

    with pytest.raises(ValueError, match="matching_loss has no effect with stage: finetune"):
        DMVAEModule(stage="finetune", init_from="no_such.ckpt", matching_loss=MMDLoss())


def test_two_time_scales_and_encode_only_batches(tmp_path, stage_ckpts):
    """7 batches, vae_every 3: generator and discriminator step on batches 2 and 5 only, the fake
    model on all 7; the decoder runs in training on exactly those two batches."""
    cli = build(tmp_path, stage_ckpts)
    model = cli.model
    decoded_at: list[int] = []

    def record(module, args, output):
        if module.training:
            decoded_at.append(int(model.batch_count))

    model.tokenizer.decoder.register_forward_hook(record)
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert int(model.batch_count) == 7
    opt_g, opt_d, opt_f = cli.trainer.optimizers
    assert adam_steps(opt_g) == 2 and adam_steps(opt_d) == 2 and adam_steps(opt_f) == 7
    assert decoded_at == [2, 5]
    assert int(model.matching_loss.num_steps) == 2  # DMD annealing counts VAE steps
    assert [model.is_vae_step(k) for k in range(7)] == [False, False, True] * 2 + [False]


def test_real_model_and_frozen_buffers_unchanged_fake_and_encoder_train(tmp_path, stage_ckpts):
    """After alignment steps the real score model (weights and buffers) and the fake model's
    fixed position table are bit-identical; the fake model and the whole VAE have moved."""
    cli = build(tmp_path, stage_ckpts)
    model = cli.model
    loss = model.matching_loss
    assert isinstance(loss, DMDLoss)
    real_before = {k: v.clone() for k, v in loss.real.state_dict().items()}
    fake_buffers = {k: v.clone() for k, v in loss.fake.named_buffers()}
    assert fake_buffers, "the DiT should hold its position table as a buffer"
    fake_before = {k: p.detach().clone() for k, p in loss.fake.named_parameters()}
    enc_before = {k: p.detach().clone() for k, p in model.tokenizer.encoder.named_parameters()}
    assert_same(real_before, {k: v for k, v in loss.fake.state_dict().items()})  # fake = copy

    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert_same(real_before, loss.real.state_dict())
    assert_same(fake_buffers, dict(loss.fake.named_buffers()))
    assert not any(p.requires_grad for p in loss.real.parameters())
    moved = [k for k, p in loss.fake.named_parameters() if not torch.equal(p, fake_before[k])]
    assert len(moved) > 0.8 * len(fake_before)
    enc_moved = [
        k
        for k, p in model.tokenizer.encoder.named_parameters()
        if not torch.equal(p, enc_before[k])
    ]
    assert enc_moved, "the encoder is trainable in the alignment stage"
    # EMA covers the tokenizer only: never the real or fake score model
    assert not [k for k in model.state_dict() if k.startswith("ema.matching_loss")]


def _one_vae_batch(root: Path, ckpts: dict[str, str], weight: float) -> tuple[dict, DMVAEModule]:
    """One training batch (a VAE step: GAN with DiffAug on, disc_start 0) of the alignment
    config with ``matching_weight`` ``weight``. Returns what the step saw: the raw latents ``z``
    of the generator forward and the generator loss's gradient ``grad`` w.r.t. them, and, with
    a DMD term, the normalised latents, labels and draws ``t``, ``eps`` the DMD loss used."""
    cli = build(
        root,
        ckpts,
        "--model.init_args.matching_weight",
        str(weight),
        "--model.init_args.vae_every",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "0",
    )
    model, loss = cli.model, cli.model.matching_loss
    with torch.no_grad():  # a fake that differs from the real model (else g = 0 at step 0)
        gen = torch.Generator().manual_seed(1)
        for p in loss.fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    seen: dict = {}
    encode, dmd, draw = model.encode, loss.loss, loss._draw

    def spy_encode(x):
        z = encode(x)
        if z.requires_grad and "z" not in seen:
            seen["z"] = z.detach().clone()
            z.register_hook(lambda g: seen.setdefault("grad", g.clone()))
        return z

    def spy_loss(z, labels=None, *args, **kwargs):
        seen["zn"], seen["labels"] = z.detach().clone(), labels
        seen["fake"] = copy.deepcopy(loss.fake)  # the fake model steps later in this batch
        return dmd(z, labels, *args, **kwargs)

    def spy_draw(*args, **kwargs):
        t, eps, lo, hi = draw(*args, **kwargs)
        seen["t"], seen["eps"] = t.clone(), eps.clone()
        return t, eps, lo, hi

    model.encode, loss.loss, loss._draw = spy_encode, spy_loss, spy_draw
    cli.trainer.fit(model, datamodule=cli.datamodule)
    return seen, model


def test_dmd_gradient_reaches_the_encoder(tmp_path, stage_ckpts):
    """The generator loss's gradient at the encoder latents, with matching weight w = 10 minus
    with w = 0 (same weights, batch, GAN, DiffAug and seeds), is exactly the DMD surrogate
    gradient w x latent_scale x g / numel, g = nan_to_num((x_fake - x_real) / mean|z - x_real|)
    from the real and fake models at the DMD loss's own draws. (The encoder update is this
    gradient back-propagated: a zeroed or sign-flipped DMD term fails here.)"""
    weight = 10.0
    on, model = _one_vae_batch(tmp_path / "on", stage_ckpts, weight)
    off, _ = _one_vae_batch(tmp_path / "off", stage_ckpts, 0.0)
    assert torch.equal(on["z"], off["z"])  # same starting point
    loss = model.matching_loss
    scale = float(loss.latent_scale)
    assert scale != 1.0  # the chain rule through normalize() is exercised
    zn = on["zn"]
    torch.testing.assert_close(zn, loss.normalize(on["z"]))
    t, eps, labels = on["t"], on["eps"], on["labels"]
    with torch.no_grad():
        z_t = flow.interpolate(zn, eps, t)
        x_real = flow.velocity_to_x1(z_t, t, loss.guided_velocity(loss.real, z_t, t, labels))
        x_fake = flow.velocity_to_x1(z_t, t, loss.guided_velocity(on["fake"], z_t, t, labels))
        g = torch.nan_to_num((x_fake - x_real) / (zn - x_real).abs().mean((1, 2, 3), keepdim=True))
    expected = weight * scale * g / zn.numel()
    difference = on["grad"] - off["grad"]
    assert expected.abs().max() > 0.1 * off["grad"].abs().max()  # not lost in the other terms
    torch.testing.assert_close(difference, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_matching_weight_zero_trains_no_fake_model(tmp_path, stage_ckpts):
    b = build(tmp_path / "b", stage_ckpts, "--model.init_args.matching_weight", "0")
    b.trainer.fit(b.model, datamodule=b.datamodule)
    assert len(b.trainer.optimizers) == 2
    fake_b = b.model.matching_loss.fake.state_dict()
    assert_same(b.model.matching_loss.real.state_dict(), fake_b)  # never trained


def test_fake_model_trains_on_normalized_stop_gradient_latents(tmp_path, stage_ckpts):
    """On every batch (encode-only batches 0, 1 and the VAE step 2) the fake score model's
    flow-matching loss gets exactly ``normalize(z)`` of that batch's latents, without a graph
    back to the encoder."""
    cli = build(tmp_path, stage_ckpts, "--trainer.limit_train_batches", "3")
    model, loss = cli.model, cli.model.matching_loss
    assert float(loss.latent_scale) != 1.0 or float(loss.latent_mean) != 0.0
    latents: list[torch.Tensor] = []
    given: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    encode, fake_loss = model.encode, loss.fake_loss

    def spy_encode(x):
        z = encode(x)
        latents.append(z.detach().clone())
        return z

    def spy_fake_loss(z, labels=None):
        given.append((z.detach().clone(), latents[-1], z.requires_grad))
        return fake_loss(z, labels)

    model.encode, loss.fake_loss = spy_encode, spy_fake_loss
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert len(given) == 3
    for value, z, requires_grad in given:
        assert not requires_grad
        assert torch.equal(value, loss.normalize(z))


def test_kill_and_resume_is_exact(tmp_path, stage_ckpts):
    """A checkpoint written after batch 4 of 7 (mid-epoch, between VAE steps) resumes to the
    same end state: VAE, EMA, discriminator, fake model, DMD step counter, batch counter and all
    three optimizers (with their schedulers) are bit-identical to the uninterrupted run."""
    straight = build(tmp_path / "a", stage_ckpts)
    mid = tmp_path / "mid.ckpt"
    straight.trainer.callbacks.append(SaveAtBatch(4, mid))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    state = torch.load(mid, map_location="cpu", weights_only=True)
    assert int(state["state_dict"]["batch_count"]) == 4
    assert any(k.startswith("matching_loss.fake.") for k in state["state_dict"])

    resumed = build(tmp_path / "b", stage_ckpts)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(mid))
    assert int(resumed.model.batch_count) == 7
    assert int(resumed.model.matching_loss.num_steps) == 2
    assert_same(straight.model.state_dict(), resumed.model.state_dict())
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers, strict=True):
        assert_same(opt_a.state_dict(), opt_b.state_dict())
    for sch_a, sch_b in zip(
        straight.trainer.lr_scheduler_configs, resumed.trainer.lr_scheduler_configs, strict=True
    ):
        assert sch_a.scheduler.state_dict() == sch_b.scheduler.state_dict()


def test_missing_real_model_checkpoint_names_the_option(tmp_path, stage_ckpts):
    ckpts = dict(stage_ckpts, reference=str(tmp_path / "missing.ckpt"))
    with pytest.raises((FileNotFoundError, ValueError), match="real_model"):
        build(tmp_path, ckpts)


def test_align_without_init_from_names_the_option(tmp_path, stage_ckpts):
    args = align_args(tmp_path, stage_ckpts)
    args[args.index("--model.init_args.init_from") + 1] = "null"
    with pytest.raises((FileNotFoundError, ValueError), match="init_from"):
        main(args, run=False)


def tiny_module(**kwargs) -> DMVAEModule:
    """A DMVAEModule with the sizes of tests/configs/align_tiny.yaml's tokenizer (conv encoder
    ch 8, decoder ch 8, 4 latent channels), ``kwargs`` on top."""
    return DMVAEModule(
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1},
        bottleneck_hidden=16,
        decoder={"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 0, "mid_attention": False},
        discriminator={"ch": 8, "n_layers": 2},
        **kwargs,
    )


def test_mmd_matching_reads_reference_samples_from_the_batch(tmp_path, stage_ckpts):
    """With an MMD loss the matching term is MMD(z, batch["reference"]) exactly; without a
    reference in the data the error names data.init_args.reference."""
    model = tiny_module(stage="align", init_from=stage_ckpts["tokenizer"], matching_loss=MMDLoss())
    assert "matching_loss" not in model.hparams  # a module object stays out of the hparams
    torch.manual_seed(0)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    ref = torch.randn(6, 4, 16, 16)
    z = model.encode(x)
    value, logs = model.matching_term(x, z, {"image": x, "reference": ref})
    expected = MMDLoss().loss(z, ref)
    torch.testing.assert_close(value, expected)
    assert float(value) > 0 and torch.equal(logs["train/matching"], value.detach())
    with pytest.raises(ValueError, match=r"data\.init_args\.reference"):
        model.matching_term(x, z, {"image": x})
    with pytest.raises(ValueError, match="reference.shape"):
        model.matching_term(x, z, {"image": x, "reference": torch.randn(6, 4, 8, 8)})


def test_gaussian_kl_reuses_the_encoder_pass():
    """The per-sample-KL term reads the posterior of the features the encoder computed for z:
    one encoder forward per VAE step, with the value and gradients of a second, fresh pass
    (what it used to run: the KL-VAE's encoder twice a step). Latents that are not the
    bottleneck's last output (an ``encode`` override rescaling them) fall back to that pass."""
    torch.manual_seed(3)
    model = tiny_module(
        stage="pretrain", bottleneck_gaussian=True, matching_loss=GaussianKLLoss()
    ).train()
    calls = []
    model.tokenizer.encoder.register_forward_hook(lambda *args: calls.append(1))
    params = [p for p in model.tokenizer.encoder.parameters() if p.requires_grad]
    assert params
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    z = model.encode(x)
    value, _ = model.matching_term(x, z, {"image": x})
    assert len(calls) == 1 and model._bottleneck_io is None  # consumed: no graph kept
    grads = torch.autograd.grad(value, params)
    mean, logvar = model.tokenizer.bottleneck.forward_stats(model.tokenizer.encoder(x))
    expected = GaussianKLLoss()(mean, logvar)
    torch.testing.assert_close(value, expected)
    assert float(value) > 0
    for got, want in zip(grads, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(got, want)
    calls.clear()
    z = model.encode(x)
    value, _ = model.matching_term(x, 2.0 * z, {"image": x})  # not the bottleneck's output
    assert len(calls) == 2
    torch.testing.assert_close(value, expected)
    # other matching losses never record (nothing would consume the features)
    other = tiny_module(stage="pretrain", bottleneck_gaussian=True, matching_loss=MMDLoss()).train()
    other.encode(x)
    assert other._bottleneck_io is None


def test_alignment_checkpoint_loads_as_a_tokenizer(tmp_path, stage_ckpts):
    """Later stages read an alignment checkpoint's tokenizer; its matching-loss weights are
    ignored when the module is built without one."""
    from dmvae_lightning.latents import load_frozen_tokenizer
    from dmvae_lightning.nets.tokenizer import Tokenizer

    cli = build(tmp_path, stage_ckpts, "--trainer.limit_train_batches", "3")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = checkpoints(tmp_path)[-1]
    tok = load_frozen_tokenizer(ckpt)
    assert isinstance(tok, Tokenizer) and not any(p.requires_grad for p in tok.parameters())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad(), cli.model.ema_scope():
        expected = cli.model.eval().encode(x)
    torch.testing.assert_close(tok.encode(x), expected)


def test_step_logs_reach_tensorboard_on_the_written_batches(tmp_path, stage_ckpts):
    """log_every_n_steps 3 = vae_every: the module skips self.log on batches Lightning would not
    write, and the written ones (batches 2 and 5) carry both the VAE and the fake-model losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = build(tmp_path, stage_ckpts, "--trainer.log_every_n_steps", "3")
    logged_at: list[int] = []  # batch_count (already advanced) at each training log_dict
    log_dict = cli.model.log_dict

    def spy(*args, **kwargs):
        if cli.model.training:
            logged_at.append(int(cli.model.batch_count))
        return log_dict(*args, **kwargs)

    cli.model.log_dict = spy
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert logged_at == [3, 6]  # batches 2 and 5 only: the others skip self.log
    events = sorted((tmp_path / "lightning_logs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    g_loss = acc.Scalars("train/g_loss")
    fake = acc.Scalars("train/fake_loss")
    assert len(g_loss) == 2 and len(fake) == 2
    assert [e.step for e in g_loss] == [e.step for e in fake]
    assert all(e.value > 0 for e in g_loss + fake)
