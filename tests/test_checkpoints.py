"""Reading checkpoints (dmvae_lightning.checkpoints): concise errors naming option, file and
problem; the frozen real score model stored by reference in alignment checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import SaveAtBatch, checkpoints, save_module_checkpoint

from dmvae_lightning.checkpoints import (
    CheckpointError,
    CheckpointNotFoundError,
    file_sha256,
    load_classifier,
    load_score_model,
    load_tokenizer,
)
from dmvae_lightning.cli import main
from dmvae_lightning.modules import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
ALIGN_TINY = str(REPO / "tests" / "configs" / "align_tiny.yaml")


def align(root: Path, tokenizer: str, reference: str, *extra: str):
    return main(
        ["--config", ALIGN_TINY, "--trainer.default_root_dir", str(root)]
        + ["--model.init_args.init_from", tokenizer]
        + ["--model.init_args.matching_loss.init_args.real_model", reference, *extra],
        run=False,
    )


def short(err: pytest.ExceptionInfo, option: str, file: Path) -> str:
    message = str(err.value)
    assert message.startswith(f"{option}: {str(file)!r}"), message
    assert len(message.splitlines()) <= 2, message
    return message


def test_missing_truncated_corrupt_and_wrong_kind(tmp_path, stage_ckpts):
    tokenizer = Path(stage_ckpts["tokenizer"])
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(CheckpointNotFoundError) as err:
        load_tokenizer(missing, option="model.init_args.tokenizer_ckpt")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    assert "does not exist" in short(err, "model.init_args.tokenizer_ckpt", missing)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tokenizer.read_bytes()[: tokenizer.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(truncated, option="tokenizer_ckpt")
    assert "truncated or corrupt" in short(err, "tokenizer_ckpt", truncated)

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        load_score_model(garbage, option="DMDLoss.real_model")
    assert "truncated or corrupt" in short(err, "DMDLoss.real_model", garbage)

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_classifier(empty, option="fid.checkpoint")

    # a tokenizer where a reference model is expected, and the other way round
    with pytest.raises(CheckpointError) as err:
        load_score_model(tokenizer, option="DMDLoss.real_model")
    assert "not a LatentDiffusionModule checkpoint" in short(err, "DMDLoss.real_model", tokenizer)
    reference = Path(stage_ckpts["reference"])
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(reference, option="model.init_args.init_from")
    assert "not a DMVAEModule checkpoint" in short(err, "model.init_args.init_from", reference)
    with pytest.raises(CheckpointError, match="not a ClassifierModule checkpoint"):
        load_classifier(reference, option="encoder.weights_path")


def test_shape_mismatch_names_the_option(tmp_path, stage_ckpts):
    """Weights that do not fit the hyperparameters saved beside them (here: a latent channel
    count edited in the file) are a two-line error naming the first misfit tensor."""
    ckpt = torch.load(stage_ckpts["tokenizer"], weights_only=True)
    ckpt["hyper_parameters"]["latent_channels"] = 6
    edited = tmp_path / "edited.ckpt"
    torch.save(ckpt, edited)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(edited, option="tokenizer_ckpt")
    assert "does not fit" in short(err, "tokenizer_ckpt", edited)
    assert "size mismatch" in str(err.value)


def test_init_from_errors_name_the_option(tmp_path, stage_ckpts):
    """Through the CLI (jsonargparse wraps the CheckpointError raised while it builds the
    model in its own ValueError; issue 17's CLI presentation shortens it)."""
    with pytest.raises(ValueError, match=r"model\.init_args\.init_from: .*not a DMVAEModule"):
        align(tmp_path, stage_ckpts["reference"], stage_ckpts["reference"])


def test_classifier_round_trip(tmp_path):
    module = ClassifierModule(widths=[4, 8], norm="batch")
    path = tmp_path / "clf.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    net = load_classifier(path)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x), module.eval().net(x), rtol=0, atol=0)


def test_alignment_checkpoint_stores_the_real_model_by_reference(tmp_path, stage_ckpts):
    """No ``matching_loss.real.*`` tensor in the file: path, sha256 and latent statistics
    instead; the fake model and everything trained are there. A reference file with other
    bytes is refused when the checkpoint is loaded; the same file loads."""
    cli = align(tmp_path / "run", stage_ckpts["tokenizer"], stage_ckpts["reference"])
    cli.trainer.callbacks.append(SaveAtBatch(4, tmp_path / "mid.ckpt"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert not [k for k in state if k.startswith("matching_loss.real.")]
    assert [k for k in state if k.startswith("matching_loss.fake.")]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    digest = file_sha256(stage_ckpts["reference"])
    assert bytes(state["matching_loss.real_sha256"].tolist()).hex() == digest
    ref = ckpt["dmd_real_model"]
    assert ref["path"] == str(Path(stage_ckpts["reference"])) and ref["sha256"] == digest
    saved = torch.load(stage_ckpts["reference"], weights_only=True)["state_dict"]
    assert ref["latent_mean"] == float(saved["latent_mean"])
    assert ref["latent_scale"] == float(saved["latent_scale"])

    # the same file: loads, the real model keeps its weights
    same = align(tmp_path / "same", stage_ckpts["tokenizer"], stage_ckpts["reference"])
    real_before = {k: v.clone() for k, v in same.model.matching_loss.real.state_dict().items()}
    same.model.load_state_dict(state)
    for key, value in same.model.matching_loss.real.state_dict().items():
        assert torch.equal(value, real_before[key]), key

    # another file (one weight changed): refused, naming the option and the file
    other = tmp_path / "other_reference.ckpt"
    shutil.copy(stage_ckpts["reference"], other)
    changed = torch.load(other, weights_only=True)
    first = next(k for k in changed["state_dict"] if k.startswith("dit."))
    changed["state_dict"][first] = changed["state_dict"][first] + 1e-3
    torch.save(changed, other)
    wrong = align(tmp_path / "wrong", stage_ckpts["tokenizer"], str(other))
    with pytest.raises(CheckpointError) as err:
        wrong.model.load_state_dict(state)
    assert "DMDLoss.real_model" in str(err.value) and str(other) in str(err.value)
    assert "sha256" in str(err.value)
    # ... also when resuming through the CLI
    with pytest.raises(CheckpointError, match="not the reference model"):
        wrong.trainer.fit(wrong.model, datamodule=wrong.datamodule, ckpt_path=tmp_path / "mid.ckpt")


def test_the_real_model_file_is_hashed_when_it_is_read(tmp_path, stage_ckpts):
    """The sha256 a checkpoint records is that of the file the weights were read from, even
    if the file is replaced before the first checkpoint is written."""
    from dmvae_lightning.losses.matching import DMDLoss

    reference = tmp_path / "reference.ckpt"
    shutil.copy(stage_ckpts["reference"], reference)
    read = file_sha256(reference)
    loss = DMDLoss(str(reference))
    changed = torch.load(reference, weights_only=True)
    changed["state_dict"]["latent_mean"] = changed["state_dict"]["latent_mean"] + 1.0
    torch.save(changed, reference)
    assert file_sha256(reference) != read
    assert loss.real_sha256() == read
    assert bytes(loss.state_dict()["real_sha256"].tolist()).hex() == read


def test_checkpoint_from_before_storage_by_reference_still_loads(tmp_path, stage_ckpts):
    """A file written when the real model's tensors were stored (no reference record) loads:
    the stored tensors are used as before."""
    cli = align(tmp_path / "run", stage_ckpts["tokenizer"], stage_ckpts["reference"])
    state = cli.model.state_dict()
    old = {k: v for k, v in state.items() if k != "matching_loss.real_sha256"}
    stored = {}  # values the reference file does not hold, so that loading them shows
    for name, tensor in cli.model.matching_loss.real.state_dict().items():
        stored[name] = tensor + 1 if tensor.is_floating_point() else tensor.clone()
        old[f"matching_loss.real.{name}"] = stored[name]
    assert any(t.is_floating_point() for t in stored.values())
    other = align(tmp_path / "other", stage_ckpts["tokenizer"], stage_ckpts["reference"])
    other.model.load_state_dict(old)
    loaded = other.model.matching_loss.real.state_dict()
    assert loaded.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor), name


def test_init_from_loads_a_fitting_discriminator_and_warns_for_one_that_does_not(
    tmp_path, stage_ckpts
):
    """The stage-1 checkpoint's discriminator is loaded when it fits; with another
    ``discriminator`` spec a warning names it and the discriminator starts from scratch."""
    saved = torch.load(stage_ckpts["tokenizer"], weights_only=True)["state_dict"]
    cli = align(tmp_path / "same", stage_ckpts["tokenizer"], stage_ckpts["reference"])
    for name, value in cli.model.discriminator.state_dict().items():
        assert torch.equal(value, saved[f"discriminator.{name}"]), name
    with pytest.warns(UserWarning, match=r"does not fit model\.init_args\.discriminator"):
        other = align(
            tmp_path / "other",
            stage_ckpts["tokenizer"],
            stage_ckpts["reference"],
            "--model.init_args.discriminator.n_layers",
            "3",
        )
    assert len(other.model.discriminator.state_dict()) != len(cli.model.discriminator.state_dict())


def test_init_from_refuses_a_changed_reference_file(tmp_path, stage_ckpts):
    """Starting a run from an alignment checkpoint with the same ``real_model`` path: the file
    must still be the one the checkpoint was trained with."""
    reference = tmp_path / "reference.ckpt"
    shutil.copy(stage_ckpts["reference"], reference)
    first = align(
        tmp_path / "first",
        stage_ckpts["tokenizer"],
        str(reference),
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "0",
    )
    first.trainer.fit(first.model, datamodule=first.datamodule)
    aligned = str(checkpoints(tmp_path / "first")[-1])
    align(tmp_path / "again", aligned, str(reference))  # unchanged file: fine
    changed = torch.load(reference, weights_only=True)
    changed["state_dict"]["latent_mean"] = changed["state_dict"]["latent_mean"] + 1.0
    torch.save(changed, reference)
    with pytest.raises(ValueError, match=r"DMDLoss\.real_model: .*changed since the init_from"):
        align(tmp_path / "changed", aligned, str(reference))


def test_a_classifier_encoder_tokenizer_loads_without_its_classifier_file(tmp_path):
    """A tokenizer on a frozen classifier encoder saves the classifier's architecture with its
    hyperparameters (``encoder.arch``), so its checkpoint loads, with the same encoder, after
    the classifier file is gone (the weights are its own copy); a checkpoint without ``arch``
    (written before it) still needs the file, and the error names the tokenizer's option and
    file and the missing classifier path."""
    from test_eval import save_classifier_checkpoint

    from dmvae_lightning.modules.dmvae import DMVAEModule
    from dmvae_lightning.nets.classifier import ConvClassifier

    classifier = save_classifier_checkpoint(tmp_path / "classifier.ckpt")
    module = DMVAEModule(
        stage="pretrain",
        image_channels=1,
        latent_channels=4,
        encoder={"name": "classifier", "weights_path": str(classifier)},
        decoder={"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
        discriminator={"ch": 8, "n_layers": 2},
    )
    arch = module.hparams.encoder["arch"]
    assert arch == load_classifier(classifier).config
    assert (
        ConvClassifier(**arch).state_dict().keys()
        == module.tokenizer.encoder.net.state_dict().keys()
    )
    tok = save_module_checkpoint(module, tmp_path / "tokenizer.ckpt")
    old = torch.load(tok, weights_only=True)  # the same checkpoint as an older version wrote it
    old["hyper_parameters"]["encoder"] = {"name": "classifier", "weights_path": str(classifier)}
    torch.save(old, old_tok := tmp_path / "old_tokenizer.ckpt")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = module.eval().encode(x)
        torch.testing.assert_close(load_tokenizer(tok).encode(x), expected)
        classifier.unlink()
        torch.testing.assert_close(load_tokenizer(tok).encode(x), expected)
        reloaded = DMVAEModule.load_from_checkpoint(tok, map_location="cpu").eval()
        torch.testing.assert_close(reloaded.encode(x), expected)
    assert not reloaded.tokenizer.encoder.net.training  # frozen: eval mode, as loaded from file
    option = "model.init_args.tokenizer_ckpt"
    with pytest.raises(CheckpointNotFoundError) as err:
        load_tokenizer(old_tok, option=option)
    message = str(err.value)
    assert message.startswith(f"{option}: {str(old_tok)!r} rebuilds its classifier encoder")
    assert repr(str(classifier)) in message
