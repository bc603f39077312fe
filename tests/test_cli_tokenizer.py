"""The `dmvae` CLI and stage 1 end to end: configs parse, fit runs, resume is exact, errors name
the option to fix."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import SaveAtBatch, assert_same, checkpoints, config_stack, shipped_configs

from dmvae_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tokenizer_tiny.yaml")
ALL_CONFIGS = shipped_configs()


def fit(tmp_path: Path, *extra: str, config: str = TINY):
    args = ["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path), *extra]
    return main(args)


def build(tmp_path: Path, *extra: str):
    """The tiny config's model, data and trainer, built but not run (``run=False``)."""
    args = ["--config", TINY, "--trainer.default_root_dir", str(tmp_path), *extra]
    return main(args, run=False)


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    """`--print_config` parses and validates the whole file (class paths, keys, types)."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", *config_stack(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_fit_trains_and_reconstruction_improves(tmp_path):
    """A few CLI `fit` steps on real Fashion-MNIST lower the validation loss, log to
    TensorBoard and write a checkpoint holding weights, EMA and the batch counter."""
    cli = build(tmp_path, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "8")
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule)[0]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule)[0]
    assert after["val/rec_loss"] < 0.8 * before["val/rec_loss"]
    assert after["val/psnr"] > before["val/psnr"] + 1.0
    assert int(cli.model.batch_count) == 24
    state = torch.load(checkpoints(tmp_path)[-1], map_location="cpu", weights_only=True)
    sd = state["state_dict"]
    assert int(sd["batch_count"]) == 24
    assert any(k.startswith("ema.") for k in sd) and any(k.startswith("tokenizer.") for k in sd)
    assert list((tmp_path / "lightning_logs").rglob("events.out.tfevents*"))


def test_rerun_in_same_dir_overwrites_config(tmp_path):
    """Without a logger both runs save config.yaml in the same folder: the rerun does not fail
    on the existing file and the file then holds the second run's settings."""
    import yaml

    common = ["--trainer.max_epochs", "1", "--trainer.logger", "false"]
    fit(tmp_path, *common, "--trainer.limit_train_batches", "2")
    first = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert first["trainer"]["limit_train_batches"] == 2
    assert first["model"]["init_args"]["lr"] == pytest.approx(1e-3)
    fit(tmp_path, *common, "--trainer.limit_train_batches", "1", "--model.init_args.lr", "2e-3")
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("config.yaml")] == [Path("config.yaml")]
    second = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert second["trainer"]["limit_train_batches"] == 1
    assert second["model"]["init_args"]["lr"] == pytest.approx(2e-3)
    assert second["trainer"]["default_root_dir"] == str(tmp_path)


def _final_state(root: Path) -> dict:
    ckpt = torch.load(checkpoints(root)[-1], map_location="cpu", weights_only=True)
    return {"model": ckpt["state_dict"], "optim": ckpt["optimizer_states"]}


def test_kill_and_resume_is_exact(tmp_path):
    """2 epochs straight == 1 epoch, stop, resume from its checkpoint, 1 more epoch: every
    weight, EMA buffer, discriminator weight, batch counter and optimizer state is equal.
    The GAN starts at batch 4, so both phases (with and without discriminator) are covered."""
    straight, first = tmp_path / "straight", tmp_path / "resumed"
    fit(straight, "--trainer.max_epochs", "2")
    fit(first, "--trainer.max_epochs", "1")
    ckpt = checkpoints(first)[-1]
    fit(first, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt))
    a, b = _final_state(straight), _final_state(first)
    assert int(a["model"]["batch_count"]) == 6
    assert_same(a, b)


def test_misspelled_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--model.init_args.latent_chanels", "4"])
    assert exc.value.code != 0
    assert "latent_chanels" in capsys.readouterr().err


def test_misspelled_net_key_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                TINY,
                "--model.init_args.encoder",
                '{"name": "conv", "chmult": [1]}',
            ]
        )
    assert exc.value.code != 0
    assert "chmult" in capsys.readouterr().err


def test_missing_resume_checkpoint_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        fit(tmp_path, "--ckpt_path", str(tmp_path / "nope.ckpt"))


def test_missing_init_checkpoint_names_the_option(tmp_path):
    # jsonargparse re-raises instantiation errors as ValueError; our message is kept whole.
    with pytest.raises(
        (FileNotFoundError, ValueError), match=r"model\.init_args\.init_from.*does not exist"
    ):
        fit(tmp_path, "--model.init_args.init_from", str(tmp_path / "stage1.ckpt"))


def test_missing_pretrained_weights_name_the_option(tmp_path):
    encoder = (
        '{"name": "timm", "model_name": "vit_tiny_patch16_224", "pretrained": true, '
        f'"weights_path": "{tmp_path}/dino.safetensors", "img_size": 32}}'
    )
    with pytest.raises((FileNotFoundError, ValueError), match=r"encoder\.weights_path"):
        fit(tmp_path, "--model.init_args.encoder", encoder)


def test_channel_mismatch_names_both_options(tmp_path):
    with pytest.raises(ValueError, match=r"image_channels.*data\.init_args\.channels"):
        fit(tmp_path, "--data.init_args.channels", "3")


def test_finetune_stage_starts_from_stage1_and_freezes_encoder(tmp_path):
    fit(tmp_path / "s1", "--trainer.max_epochs", "1")
    stage1 = checkpoints(tmp_path / "s1")[-1]
    cli = build(
        tmp_path / "s4",
        "--trainer.max_epochs",
        "1",
        "--model.init_args.stage",
        "finetune",
        "--model.init_args.init_from",
        str(stage1),
    )
    model = cli.model
    sd1 = torch.load(stage1, map_location="cpu", weights_only=True)["state_dict"]
    enc_before = {k: v.clone() for k, v in model.tokenizer.encoder.state_dict().items()}
    # the stage-1 EMA weights are the starting point
    for name, p in model.tokenizer.named_parameters():
        assert torch.equal(p, sd1["ema." + name.replace(".", "__")]), name
    dec_before = model.tokenizer.decoder.conv_out.weight.clone()
    cli.trainer.fit(model, datamodule=cli.datamodule)
    for k, v in model.tokenizer.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert not torch.equal(model.tokenizer.decoder.conv_out.weight, dec_before)


def test_bf16_mixed_precision_trains(tmp_path):
    """Trainer precision picks bf16 autocast (the training forwards' convolutions run in
    bf16); losses stay finite and the weights move."""
    cli = build(tmp_path, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    conv_out = cli.model.tokenizer.decoder.conv_out
    before = conv_out.weight.detach().clone()
    seen: list[tuple[bool, torch.dtype]] = []
    conv_out.register_forward_hook(lambda m, _, out: seen.append((m.training, out.dtype)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    training = {dtype for was_training, dtype in seen if was_training}
    assert training == {torch.bfloat16}, seen
    after = conv_out.weight
    assert after.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before, after)
    assert torch.isfinite(cli.trainer.callback_metrics["loss"])


def test_a_generator_loss_override_with_its_own_log_keys_trains(tmp_path):
    """A subclass's ``generator_loss`` returns ``(loss, logs)`` with keys of its own (no
    ``train/g_loss``): the step still runs, the progress bar's ``loss`` is that loss, and its
    keys are logged."""
    cli = build(tmp_path, "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1")
    model = cli.model
    base = type(model).generator_loss

    def generator_loss(x, x_rec, z):
        loss, _ = base(model, x, x_rec, z)
        return loss, {"train/mine": loss.detach()}

    model.generator_loss = generator_loss
    cli.trainer.fit(model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["loss"]) and "train/mine" in metrics
    assert float(metrics["loss"]) == pytest.approx(float(metrics["train/mine"]))


def test_pointwise_alignment_projection_trains_with_the_vae(tmp_path):
    """VA-VAE-style alignment with a projection C -> D (latents 4 channels, reference 6): the
    reference may have D channels, and the projection is in the VAE optimizer and moves."""
    loss = {
        "class_path": "dmvae_lightning.losses.matching.PointwiseAlignmentLoss",
        "init_args": {"proj": [4, 6]},
    }
    cli = build(
        tmp_path,
        "--trainer.max_epochs",
        "1",
        "--model.init_args.matching_loss",
        json.dumps(loss),
        "--model.init_args.matching_weight",
        "1.0",
        "--data.init_args.reference",
        json.dumps({"name": "gaussian", "shape": [6, 16, 16]}),
    )
    proj = cli.model.matching_loss.proj
    before = proj.weight.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    opt_g = cli.trainer.optimizers[0]
    assert any(p is proj.weight for group in opt_g.param_groups for p in group["params"])
    assert not torch.equal(proj.weight, before)
    assert torch.isfinite(cli.trainer.callback_metrics["train/matching"])


def test_mid_epoch_resume_is_exact(tmp_path):
    """A checkpoint written in the middle of epoch 1 resumes to the same end state: the data
    module stores how far into the epoch's order training got, the sampler skips it."""
    args = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4"]
    straight = build(tmp_path / "a", *args)
    mid = tmp_path / "mid.ckpt"
    straight.trainer.callbacks.append(SaveAtBatch(6, mid))  # batch 2 of epoch 1 (0-based)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    assert torch.load(mid, weights_only=True)["ReferenceDistribution"]["batches"] == 2

    resumed = build(tmp_path / "b", *args)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(mid))
    assert int(resumed.model.batch_count) == 8
    assert_same(straight.model.state_dict(), resumed.model.state_dict())
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers, strict=True):
        assert_same(opt_a.state_dict(), opt_b.state_dict())


def test_frozen_timm_encoder_trains_only_bottleneck_and_decoder(tmp_path):
    """The paper's stage-1 layout at toy size: a frozen timm ViT (random weights here, a local
    file in real runs) under an MLP bottleneck; only bottleneck and decoder train, and EMA leaves
    the frozen backbone out."""
    encoder = (
        '{"name": "timm", "model_name": "vit_tiny_patch16_224", "pretrained": false, '
        '"frozen": true, "img_size": 32, "patch_size": 8, "timm_kwargs": {"depth": 2}}'
    )
    decoder = '{"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 0, "mid_attention": false}'
    cli = build(
        tmp_path,
        "--trainer.max_epochs",
        "1",
        "--model.init_args.encoder",
        encoder,
        "--model.init_args.decoder",
        decoder,
    )
    model = cli.model
    enc = {k: v.clone() for k, v in model.tokenizer.encoder.state_dict().items()}
    dec = model.tokenizer.decoder.conv_out.weight.detach().clone()
    neck = {k: v.clone() for k, v in model.tokenizer.bottleneck.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert all(torch.equal(v, enc[k]) for k, v in model.tokenizer.encoder.state_dict().items())
    assert not torch.equal(model.tokenizer.decoder.conv_out.weight, dec)
    bottleneck = model.tokenizer.bottleneck.state_dict()
    assert neck and any(not torch.equal(v, neck[k]) for k, v in bottleneck.items())
    assert model.encode(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 4, 4)
    ema_keys = [k for k in model.state_dict() if k.startswith("ema.")]
    assert ema_keys and not [k for k in ema_keys if k.startswith("ema.encoder")]
    assert not model.tokenizer.encoder.model.training  # frozen backbone stays in eval mode


class _WeightsSeenInValidation(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.trained: list[torch.Tensor] = []  # after each training batch

    @property
    def last_trained(self) -> torch.Tensor:
        return self.trained[-1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained.append(pl_module.tokenizer.decoder.conv_out.weight.detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(pl_module.tokenizer.decoder.conv_out.weight.detach().clone())


def test_validation_runs_on_ema_weights_and_restores_the_trained_ones(tmp_path):
    """Decay 0.9, one EMA update per batch: the average is the closed-form recursion
    e_k = 0.9 e_(k-1) + 0.1 w_k from the initial weights over the trained weights w_k;
    validation sees it, and the trained weights are swapped back afterwards."""
    cli = build(tmp_path, "--trainer.max_epochs", "1")
    spy = _WeightsSeenInValidation()
    cli.trainer.callbacks.append(spy)
    model = cli.model
    assert model.ema.decay == 0.9 and not model.ema.warmup
    expected = model.tokenizer.decoder.conv_out.weight.detach().clone()
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert len(spy.trained) == 3
    for w in spy.trained:
        expected = 0.9 * expected + 0.1 * w
    ema_weight = model.ema.decoder__conv_out__weight
    torch.testing.assert_close(ema_weight, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ema_weight, spy.last_trained)  # the average lags
    assert spy.seen and torch.equal(spy.seen[-1], ema_weight)  # validation saw the EMA
    assert torch.equal(model.tokenizer.decoder.conv_out.weight, spy.last_trained)  # swapped back


@pytest.mark.parametrize("source", ["gaussian", "diffusion_noise"])
def test_reference_configs_state_shape_and_classes_once(source):
    """The reference-source configs give the latent shape and classes only in the data section;
    the CLI links them into the model (a nested diffusion-noise base included)."""
    config = REPO / "configs" / "reference_sources" / f"{source}.yaml"
    text = config.read_text()
    assert "latent_shape" not in text and "num_classes" not in text
    extra = []
    if source == "diffusion_noise":  # its shipped base needs a trained tokenizer; keep the nesting
        base = '{"name": "gaussian", "shape": [4, 8, 8]}'
        extra = ["--data.init_args.reference", f'{{"name": "{source}", "t": 0.5, "base": {base}}}']
    cli = main(["--config", str(config), "--trainer.logger", "false", *extra], run=False)
    assert list(cli.model.hparams.latent_shape) == [4, 8, 8]
    assert cli.model.hparams.num_classes == cli.datamodule.hparams.num_classes == 10


def test_unlinked_latent_shape_names_the_options(tmp_path):
    with pytest.raises((ValueError, SystemExit), match=r"latent_shape.*reference\.shape"):
        main(
            [
                "--config",
                str(REPO / "configs" / "fashion_mnist" / "diffusion.yaml"),
                "--model.init_args.latent_shape",
                "null",
                "--model.init_args.tokenizer_ckpt",
                "null",
                "--model.init_args.encode_images",
                "false",
            ],
            run=False,
        )


def test_console_script_exits_with_status_zero(tmp_path):
    """`python -m dmvae_lightning.cli fit ...` (the console script's function) exits 0."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dmvae_lightning.cli", "fit", "--config", TINY]
    cmd += ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    cmd += ["--trainer.limit_train_batches", "2", "--trainer.logger", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert checkpoints(tmp_path)


def test_args_from_inside_a_program_do_not_warn_about_its_command_line(tmp_path, monkeypatch):
    """The study and the demo call ``main([...])`` while ``sys.argv`` holds their own options;
    LightningCLI warns about that on every stage unless the parse sees a bare ``sys.argv``, and
    the program's ``sys.argv`` is back afterwards."""
    argv = ["python -m dmvae_lightning.study", "--arms", "kl_vae", "--jobs", "1"]
    monkeypatch.setattr("sys.argv", list(argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build(tmp_path, "--trainer.max_epochs", "1")
    assert sys.argv == argv
    assert cli.trainer.max_epochs == 1  # the args were parsed, not the program's command line
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "args parameter is intended" in m], messages
