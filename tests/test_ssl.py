"""The self-supervised (SimCLR) objective of ClassifierModule: the SSL encoder of the study."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from dmvae_lightning.checkpoints import load_classifier
from dmvae_lightning.modules.classifier import ClassifierModule, nt_xent, simclr_views
from dmvae_lightning.nets.encoders import ClassifierEncoder


def test_nt_xent_closed_form():
    """Pairs identical and orthogonal to every other row: each row's partner has cosine 1, the
    2B - 2 others 0, so the loss is -log(e^(1/T) / (e^(1/T) + 2B - 2))."""
    b, temp = 4, 0.2
    eye = torch.eye(b, 8)
    loss = nt_xent(torch.cat([eye, 3 * eye]), temp)  # scale does not matter (cosine)
    expected = -math.log(math.exp(1 / temp) / (math.exp(1 / temp) + 2 * b - 2))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # swapping a partner for a stranger raises the loss
    shuffled = torch.cat([eye, eye[[1, 0, 2, 3]]])
    assert float(nt_xent(shuffled, temp)) > expected + 1


def test_views_pair_up_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    torch.manual_seed(0)
    views = simclr_views(x)
    assert views.shape == (12, 1, 32, 32)
    assert views.min() >= -1 and views.max() <= 1
    assert not torch.allclose(views[:6], views[6:])  # two different augmentations
    torch.manual_seed(0)
    assert torch.equal(views, simclr_views(x))  # the global RNG decides them


def test_simclr_module_trains_without_labels_and_loads_as_an_encoder(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule(widths=[8, 16], objective="simclr", ssl_proj_dim=8)
    x = torch.rand(16, 1, 32, 32) * 2 - 1
    labels = torch.full((16,), -100)  # never read: an invalid class would fail cross-entropy
    loss = module.training_step({"image": x, "label": labels}, 0)
    torch.manual_seed(1)
    unlabelled = module.training_step({"image": x}, 0)  # a data set without labels
    torch.manual_seed(1)
    assert torch.equal(unlabelled, module.training_step({"image": x, "label": labels}, 0))
    supervised = ClassifierModule(widths=[8, 16])
    with pytest.raises(KeyError, match="objective: simclr"):
        supervised.training_step({"image": x}, 0)
    loss.backward()
    assert math.isfinite(float(loss))
    assert module.net.body[0].weight.grad.abs().sum() > 0  # the encoder learns from it
    assert module.net.head[1].weight.grad is None  # the class head is not trained
    with pytest.raises(ValueError, match="objective"):
        ClassifierModule(objective="byol")

    # a trained SSL checkpoint is an encoder like the supervised one: same feature map
    data = [{"image": x[i], "label": torch.tensor(0)} for i in range(16)]
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    ckpt = tmp_path / "ssl.ckpt"
    trainer.save_checkpoint(ckpt)
    encoder = ClassifierEncoder(load_classifier(ckpt), frozen=True)
    module.eval()
    with torch.no_grad():
        assert torch.equal(encoder(x), module.net.features(x))
