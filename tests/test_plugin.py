"""Plug-in use from another Lightning project: the example package in examples/plugin_project
(a DMVAEModule with its own encoder, a reference source and a matching loss of its own, a
LatentDiffusionModule with its own time sampling) trained through every entry point, each
test checking that the overridden part is what ran."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, checkpoints

from dmvae_lightning.cli import main
from dmvae_lightning.data.sources import build_source

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_project"
sys.path.insert(0, str(EXAMPLE / "src"))  # as `pip install examples/plugin_project` would

from plugin_example import (  # noqa: E402
    LaplaceSource,
    MomentMatchingLoss,
    PatchEncoder,
    PatchEncoderDMVAE,
    StratifiedTimeDiffusion,
)
from plugin_example import train as example_train  # noqa: E402

TOKENIZER = str(EXAMPLE / "configs" / "tokenizer.yaml")
DIFFUSION = str(EXAMPLE / "configs" / "diffusion.yaml")
LOC, SCALE = 2.0, 0.5  # the Laplace reference of both configs


def cli(subcommand: str, config: str, root: Path, data_root: Path, *extra: str):
    return main(
        [
            subcommand,
            "--config",
            config,
            "--trainer.default_root_dir",
            str(root),
            "--data.init_args.root",
            str(data_root),
            *extra,
        ]
    )


def assert_stratified(t: torch.Tensor) -> None:
    """One time in each of the n strata [k/n, (k+1)/n): what StratifiedTimeDiffusion draws and
    the library's uniform / logit-normal sampling almost never does (8!/8^8 = 0.24 %)."""
    n = t.numel()
    strata = torch.floor(t * n).long().sort().values
    assert torch.equal(strata, torch.arange(n)), t


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, fashion_mnist_root):
    """Entry point 1: `dmvae fit --config` with the example's classes named by class_path."""
    root = tmp_path_factory.mktemp("plugin_cli")
    built = main(
        [
            "--config",
            TOKENIZER,
            "--trainer.default_root_dir",
            str(root / "tokenizer"),
            "--data.init_args.root",
            str(fashion_mnist_root),
        ],
        run=False,
    )
    initial_encoder = {k: v.clone() for k, v in built.model.tokenizer.encoder.state_dict().items()}
    tokenizer = cli("fit", TOKENIZER, root / "tokenizer", fashion_mnist_root)
    diffusion = cli("fit", DIFFUSION, root / "diffusion", fashion_mnist_root)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "diffusion": diffusion,
        "initial_encoder": initial_encoder,
        "tokenizer_ckpt": checkpoints(root / "tokenizer")[-1],
        "diffusion_ckpt": checkpoints(root / "diffusion")[-1],
    }


def test_cli_fit_uses_the_example_encoder_source_and_loss(cli_runs):
    model = cli_runs["tokenizer"].model
    assert type(model) is PatchEncoderDMVAE
    encoder = model.tokenizer.encoder
    assert isinstance(encoder, PatchEncoder) and encoder.out_dim == 16
    # the encoder of build_encoder() is the one that trained: its weights moved from the
    # (same-seed) initial ones, and its EMA, which starts at them, lags behind
    trained = encoder.state_dict()
    initial = cli_runs["initial_encoder"]
    assert not torch.equal(trained["patchify.weight"], initial["patchify.weight"])
    ema = model.state_dict()["ema.encoder__patchify__weight"]
    assert not torch.equal(ema, trained["patchify.weight"])
    assert int(model.batch_count) == 4
    # the custom matching loss ran on every VAE step (vae_every: 1), on the custom source's
    # samples: Laplace(2, 0.5), mean 2 (2048 values per batch: standard error 0.016)
    loss = model.matching_loss
    assert isinstance(loss, MomentMatchingLoss) and loss.calls == 4
    assert abs(loss.last_reference_mean - LOC) < 0.1
    assert isinstance(cli_runs["tokenizer"].datamodule.feeder.source, LaplaceSource)
    assert "train/matching" in cli_runs["tokenizer"].trainer.logged_metrics
    state = torch.load(cli_runs["tokenizer_ckpt"], map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["_class_path"] == "plugin_example.modules.PatchEncoderDMVAE"
    assert state["state_dict"]["tokenizer.encoder.patchify.weight"].shape == (16, 1, 4, 4)


def test_cli_fit_uses_the_example_time_sampling(cli_runs):
    model = cli_runs["diffusion"].model
    assert type(model) is StratifiedTimeDiffusion
    assert list(model.hparams.latent_shape) == [4, 8, 8]  # linked from the source's init_args
    assert int(model.batch_count) == 4
    assert_stratified(model.last_time_draw)  # set only by the overridden sample_time


def test_load_from_checkpoint_gives_the_subclass_back(cli_runs):
    """Entry point 3: checkpoints of the subclasses load through their `load_from_checkpoint`
    with the same class, the parts the hooks built and bit-equal weights. (Call it on the
    subclass: Lightning 2.6 drops the checkpoint's class path when called on the base class.)"""
    for key, cls in (("tokenizer", PatchEncoderDMVAE), ("diffusion", StratifiedTimeDiffusion)):
        loaded = cls.load_from_checkpoint(cli_runs[f"{key}_ckpt"], map_location="cpu")
        assert type(loaded) is cls
        assert_same(loaded.state_dict(), cli_runs[key].model.state_dict())
    loaded = PatchEncoderDMVAE.load_from_checkpoint(cli_runs["tokenizer_ckpt"], map_location="cpu")
    assert isinstance(loaded.tokenizer.encoder, PatchEncoder)
    assert isinstance(loaded.matching_loss, MomentMatchingLoss)


def test_cli_validate_and_predict_from_subclass_checkpoints(cli_runs, fashion_mnist_root):
    """Entry point 4: `dmvae validate` / `dmvae predict --ckpt_path` rebuild the subclass from
    the checkpoint and run its weights."""
    root = cli_runs["root"]
    validated = cli(
        "validate",
        TOKENIZER,
        root / "validate",
        fashion_mnist_root,
        "--ckpt_path",
        str(cli_runs["tokenizer_ckpt"]),
    )
    assert type(validated.model) is PatchEncoderDMVAE
    assert_same(validated.model.state_dict(), cli_runs["tokenizer"].model.state_dict())
    assert math.isfinite(float(validated.trainer.callback_metrics["val/psnr"]))
    predicted = cli(
        "predict",
        DIFFUSION,
        root / "predict",
        fashion_mnist_root,
        "--ckpt_path",
        str(cli_runs["diffusion_ckpt"]),
    )
    assert type(predicted.model) is StratifiedTimeDiffusion
    assert_same(predicted.model.state_dict(), cli_runs["diffusion"].model.state_dict())


def test_example_script_trains_with_a_plain_trainer(tmp_path, fashion_mnist_root):
    """Entry point 2: the example's own script (plain `lightning.Trainer`, objects built in
    Python). A reference mean of 3 shows up in what the loss saw and in the latent statistics
    the diffusion model measured from the custom source; checkpoints load back."""
    loc, scale = 3.0, 0.25
    out = example_train.main(
        [
            "--out",
            str(tmp_path),
            "--batches",
            "3",
            "--data_root",
            str(fashion_mnist_root),
            "--loc",
            str(loc),
            "--scale",
            str(scale),
        ]
    )
    tokenizer, diffusion = out["tokenizer"], out["diffusion"]
    assert isinstance(tokenizer.tokenizer.encoder, PatchEncoder)
    assert tokenizer.matching_loss.calls == 3
    assert abs(tokenizer.matching_loss.last_reference_mean - loc) < 0.05
    # Laplace(3, 0.25): mean 3, std 0.25 sqrt(2); measured over 2 batches of 8 x 256 values
    assert abs(float(diffusion.latent_mean) - loc) < 0.05
    assert abs(1 / float(diffusion.latent_scale) - scale * math.sqrt(2)) < 0.05
    assert int(diffusion.batch_count) == 3
    assert_stratified(diffusion.last_time_draw)
    # objects built in Python stay out of the hyperparameters, so the checkpoints load with
    # weights_only=True; the matching loss is passed again
    loaded = PatchEncoderDMVAE.load_from_checkpoint(
        out["tokenizer_ckpt"], map_location="cpu", matching_loss=MomentMatchingLoss()
    )
    assert_same(loaded.state_dict(), tokenizer.state_dict())
    loaded = StratifiedTimeDiffusion.load_from_checkpoint(out["diffusion_ckpt"], map_location="cpu")
    assert_same(loaded.state_dict(), diffusion.state_dict())


def test_source_by_class_path_and_its_errors():
    spec = {
        "class_path": "plugin_example.sources.LaplaceSource",
        "init_args": {"shape": [2, 3, 3], "loc": 1.0, "scale": 2.0},
    }
    source = build_source(spec)
    assert isinstance(source, LaplaceSource) and source.shape == (2, 3, 3)
    assert build_source(source) is source
    with pytest.raises(ValueError, match=r"reference\.class_path.*cannot import"):
        build_source({"class_path": "plugin_example.sources.Missing"})
    with pytest.raises(TypeError, match="not a subclass of"):
        build_source({"class_path": "plugin_example.losses.MomentMatchingLoss"})
    with pytest.raises(ValueError, match="under 'init_args'"):
        build_source({"class_path": "plugin_example.sources.LaplaceSource", "shape": [1, 1, 1]})
    with pytest.raises(ValueError, match="class_path"):
        build_source({"name": "laplace", "shape": [1, 1, 1]})


def test_source_init_args_are_checked_when_the_config_is_parsed(capsys):
    """A source of your own is typed like the built-in ones: `--print_config` lists its
    arguments, and a misspelled one is a parse error."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TOKENIZER, "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "plugin_example.sources.LaplaceSource" in printed and "scale: 0.5" in printed
    bad = (
        '{"class_path": "plugin_example.sources.LaplaceSource", '
        '"init_args": {"shape": [4, 8, 8], "lco": 2.0}}'
    )
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TOKENIZER, "--data.init_args.reference", bad, "--print_config"])
    assert exc.value.code not in (0, None)
