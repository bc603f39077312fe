"""LatentDiffusionModule (stages 2 and 5) and latent caches: CLI fit on tokenizer latents,
checkpoint contents, latent statistics, exact resume, sampling, a 2-D mixture learned to the
right component weights, and cache round trips."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import assert_same, checkpoints
from torch.utils.data import DataLoader, Dataset, Subset

from dmvae_lightning import flow
from dmvae_lightning.cli import main
from dmvae_lightning.data.images import FashionMNIST
from dmvae_lightning.latents import LatentCache, encode_dataset, load_frozen_tokenizer
from dmvae_lightning.latents import main as latents_main
from dmvae_lightning.modules.diffusion import LatentDiffusionModule

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TINY = str(REPO / "tests" / "configs" / "tokenizer_tiny.yaml")
TINY = str(REPO / "tests" / "configs" / "diffusion_tiny.yaml")
TINY_DIT = {"preset": "tiny", "patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory, fashion_mnist_root) -> str:
    """A stage-1 checkpoint of the tiny tokenizer (1 epoch, 3 batches): latents 4 x 16 x 16."""
    root = tmp_path_factory.mktemp("tokenizer")
    main(
        [
            "fit",
            "--config",
            TOKENIZER_TINY,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
        ]
    )
    return str(checkpoints(root)[-1])


def fit(root: Path, tokenizer: str, *extra: str):
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", str(root)]
    return main([*args, "--model.init_args.tokenizer_ckpt", tokenizer, *extra])


def test_cli_fit_checkpoint_and_latent_stats(tmp_path, tokenizer_ckpt):
    """CLI fit on real Fashion-MNIST with the tokenizer encoding on the fly: the checkpoint holds
    DiT, EMA, latent stats and batch counter but no tokenizer weights; the optimizer holds only
    the DiT; the stats equal a direct computation over the same first batches."""
    cli = fit(tmp_path, tokenizer_ckpt, "--trainer.max_epochs", "1")
    model = cli.model
    ckpt = torch.load(checkpoints(tmp_path)[-1], map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert int(sd["batch_count"]) == 3 and bool(sd["stats_ready"])
    assert any(k.startswith("dit.") for k in sd) and any(k.startswith("ema.") for k in sd)
    assert not [k for k in sd if "tokenizer" in k or k.startswith(("encoder", "decoder"))]
    dit_params = list(model.dit.parameters())
    assert len(ckpt["optimizer_states"][0]["param_groups"][0]["params"]) == len(dit_params)
    assert {id(p) for p in model.parameters()} == {id(p) for p in dit_params}
    tok = model.tokenizer
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())

    # direct computation over the same first `stats_batches` (2) training batches
    ref = load_frozen_tokenizer(tokenizer_ckpt)
    loader = cli.datamodule.train_dataloader()
    with torch.no_grad():
        z = torch.cat([ref.encode(b["image"]) for b, _ in zip(loader, range(2), strict=False)])
    z = z.double()
    mean, std = z.mean().item(), z.std(unbiased=False).item()
    assert abs(mean) > 1e-3 and abs(std - 1) > 1e-2  # the stats are not the defaults
    assert float(sd["latent_mean"]) == pytest.approx(mean, rel=1e-6, abs=1e-7)
    assert float(sd["latent_scale"]) == pytest.approx(1 / std, rel=1e-6)
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])

    # predict: samples for the val labels, decoded; seeded per batch, so repeatable
    out = cli.trainer.predict(model, datamodule=cli.datamodule)
    assert out[0]["latent"].shape == (16, 4, 16, 16) and out[0]["image"].shape == (16, 1, 32, 32)
    assert out[0]["image"].abs().max() <= 1
    again = cli.trainer.predict(model, datamodule=cli.datamodule)
    assert torch.equal(out[0]["latent"], again[0]["latent"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent)).Reload()
    assert "val/samples" in events.Tags()["images"]

    # the demo's grid: one row per class, loaded back from the checkpoint, seeded
    from dmvae_lightning.demo import save_sample_grid

    png = tmp_path / "grid.png"
    grid = save_sample_grid(checkpoints(tmp_path)[-1], png, per_class=2, steps=3, seed=1)
    assert grid.shape == (20, 1, 32, 32) and png.stat().st_size > 0
    again = save_sample_grid(checkpoints(tmp_path)[-1], png, per_class=2, steps=3, seed=1)
    other = save_sample_grid(checkpoints(tmp_path)[-1], png, per_class=2, steps=3, seed=2)
    assert torch.equal(grid, again) and not torch.equal(grid, other)


def test_missing_tokenizer_checkpoint_names_the_option(tmp_path, fashion_mnist_root):
    with pytest.raises(
        (FileNotFoundError, ValueError), match=r"model\.init_args\.tokenizer_ckpt.*does not exist"
    ):
        fit(tmp_path, str(tmp_path / "missing.ckpt"))


def test_kill_and_resume_is_exact(tmp_path, tokenizer_ckpt):
    """2 epochs straight == 1 epoch + resume for 1 more: DiT, EMA, latent stats, batch counter,
    optimizer and scheduler states all bit-equal (t, noise and label dropout are per-step)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(straight, tokenizer_ckpt, "--trainer.max_epochs", "2")
    fit(resumed, tokenizer_ckpt, "--trainer.max_epochs", "1")
    first = checkpoints(resumed)[-1]
    fit(resumed, tokenizer_ckpt, "--trainer.max_epochs", "2", "--ckpt_path", str(first))
    a, b = (
        torch.load(checkpoints(root)[-1], map_location="cpu", weights_only=True)
        for root in (straight, resumed)
    )
    assert int(a["state_dict"]["batch_count"]) == 6
    assert int(a["state_dict"]["ema.num_updates"]) == 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same(a[key], b[key], key)
    # the run really trained: DiT differs from the first epoch's
    sd1 = torch.load(first, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(
        sd1["dit.final_layer.linear.weight"], a["state_dict"]["dit.final_layer.linear.weight"]
    )


def _perturbed_module(ema_decay: float | None = None) -> LatentDiffusionModule:
    torch.manual_seed(0)
    model = LatentDiffusionModule(
        latent_shape=[4, 16, 16],
        num_classes=10,
        dit=TINY_DIT,
        latent_mean=0.5,
        latent_scale=2.0,
        ema_decay=ema_decay,
    )
    with torch.no_grad():  # adaLN-Zero outputs 0 at init; make cond and null velocities differ
        for p in model.dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_sample_shapes_determinism_and_cfg():
    model = _perturbed_module()
    labels = torch.tensor([0, 1, 2, 3, 9, 10])  # 10 = null class

    def draw(seed: int, **kw):
        return model.sample(labels, steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    z = draw(1)
    assert z.shape == (6, 4, 16, 16) and z.dtype == torch.float32
    assert torch.equal(z, draw(1)) and not torch.allclose(z, draw(2))

    # CFG scale 1 is the plain conditional model; scale 3 is v_null + 3 (v_cond - v_null)
    noise = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.sample(labels, steps=4, noise=noise, cfg=1.0), z)
    null = torch.full_like(labels, 10)

    def manual(scale: float):
        def velocity(x, t):
            cond, uncond = model.dit(x, t, labels), model.dit(x, t, null)
            return uncond + scale * (cond - uncond)

        return model.denormalize(flow.euler_sample(velocity, noise, 4))

    torch.testing.assert_close(z, manual(1.0), rtol=0, atol=1e-6)
    guided = model.sample(labels, steps=4, noise=noise, cfg=3.0)
    torch.testing.assert_close(guided, manual(3.0), rtol=1e-5, atol=1e-5)
    assert (guided - z).abs().max() > 1e-2

    # Heun is the trapezoidal ODE solver on the same velocity (not Euler under another name)
    heun = model.sample(labels, steps=4, noise=noise, sampler="heun")
    cond = lambda x, t: model.dit(x, t, labels)  # noqa: E731
    torch.testing.assert_close(
        heun, model.denormalize(flow.heun_sample(cond, noise, 4)), rtol=1e-5, atol=1e-5
    )
    assert (heun - z).abs().max() > 1e-3

    # SDE: Euler-Maruyama with its own noise drawn from ``generator``: seeded, reproducible,
    # other than the ODE from the same start, and other for another generator seed
    def sde(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return model.sample(labels, steps=4, noise=noise, sampler="sde", generator=gen)

    gen = torch.Generator().manual_seed(3)
    sde_gen = torch.Generator().manual_seed(int(torch.randint(1 << 62, (), generator=gen)))
    want = model.denormalize(flow.euler_maruyama_sample(cond, noise, 4, generator=sde_gen))
    torch.testing.assert_close(sde(3), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(sde(3), sde(3))
    assert (sde(3) - z).abs().max() > 1e-3 and (sde(3) - sde(4)).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match=r"model\.init_args\.tokenizer_ckpt"):
        draw(1, decode=True)


def test_a_conditional_model_refuses_batches_without_labels():
    """A class-conditional module given unlabelled batches would train the null class only:
    it is an error naming the option; its labels are used as given otherwise."""
    model = _perturbed_module()
    z = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"model.init_args.num_classes is 10 .* no 'label'"):
        model.get_labels({"reference": z}, 2)
    assert model.get_labels({"reference": z, "label": torch.tensor([3, 7])}, 2).tolist() == [3, 7]


def test_sample_uses_ema_weights_and_denormalizes():
    """The EMA still holds the adaLN-Zero init (velocity 0), so sampling returns the noise,
    denormalised: noise / scale + mean; the raw (perturbed) weights move it."""
    model = _perturbed_module(ema_decay=0.99)
    noise = torch.randn(3, 4, 16, 16)
    labels = torch.tensor([1, 2, 3])
    raw = {k: v.clone() for k, v in model.dit.state_dict().items()}
    out = model.sample(labels, steps=3, noise=noise)
    torch.testing.assert_close(out, noise / 2.0 + 0.5, rtol=0, atol=1e-6)
    for k, v in model.dit.state_dict().items():  # raw weights restored after the EMA scope
        assert torch.equal(v, raw[k]), k
    assert model.dit(noise, torch.zeros(3), labels).abs().max() > 1e-2


class _Mixture(Dataset):
    """Samples of a 2-D Gaussian mixture as (2, 1, 1) single-token latents, unlabelled."""

    MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
    STD = 0.15

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(self.WEIGHTS, n, replacement=True, generator=g)
        self.points = self.MEANS[comp] + self.STD * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"reference": self.points[i].view(2, 1, 1)}


def test_gaussian_mixture_component_weights_are_learned():
    """A single-token DiT (2 x 1 x 1) trained 400 steps on a 3-component 2-D mixture samples
    the component weights within 0.04 and lands 90 % of samples within 4 std of a mean. The
    latent stats are measured on the way (unlabelled data: unconditional model)."""
    pl.seed_everything(0)
    model = LatentDiffusionModule(
        latent_shape=[2, 1, 1],
        num_classes=0,
        dit={"preset": "tiny", "patch_size": 1, "hidden_size": 64, "depth": 2, "num_heads": 4},
        class_dropout_prob=0.0,
        stats_batches=4,
        lr=1e-3,
        warmup_steps=20,
        ema_decay=0.98,
    )
    data = _Mixture(8192)
    trainer = pl.Trainer(
        max_steps=400,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(data, batch_size=256, shuffle=True, drop_last=True)
    trainer.fit(model, loader)
    # measured on 4 shuffled batches: close to the statistics of the whole set
    assert float(model.latent_mean) == pytest.approx(data.points.mean().item(), abs=0.05)
    assert float(model.latent_scale) == pytest.approx(1 / data.points.std().item(), rel=0.03)

    labels = torch.zeros(4000, dtype=torch.long)  # the null class of an unconditional model
    samples = model.sample(labels, steps=25, generator=torch.Generator().manual_seed(0))
    samples = samples.view(-1, 2)
    dist = torch.cdist(samples, _Mixture.MEANS)
    nearest = dist.argmin(1)
    weights = torch.bincount(nearest, minlength=3).float() / len(samples)
    assert (weights - _Mixture.WEIGHTS).abs().max() < 0.04, weights
    close = dist.min(1).values < 4 * _Mixture.STD
    assert close.float().mean() > 0.9, close.float().mean()


def test_latent_cache_round_trip_and_fingerprint(tmp_path, tokenizer_ckpt, fashion_mnist_root):
    tok = load_frozen_tokenizer(tokenizer_ckpt)
    data = Subset(FashionMNIST(split="test", pad_to=32), range(20))
    images = torch.stack([data[i]["image"] for i in range(20)])
    labels = torch.stack([data[i]["label"] for i in range(20)])

    @torch.no_grad()
    def encode_in_batches(size: int, flips: bool) -> torch.Tensor:
        """What encode_dataset computes: batches of `size`, flips in the same forward; CPU conv
        results depend on the batch composition in the last bits."""
        out = []
        for x in images.split(size):
            z = tok.encode(torch.cat([x, x.flip(-1)]) if flips else x)
            out.append(torch.stack(z.chunk(2 if flips else 1), 1))
        return torch.cat(out)

    z, z_flip = encode_in_batches(8, flips=True).unbind(1)
    with torch.no_grad():  # one big batch: equal up to rounding
        torch.testing.assert_close(tok.encode(images), z, rtol=1e-5, atol=1e-6)

    meta = encode_dataset(
        tok,
        data,
        tmp_path / "f32",
        batch_size=8,
        flips=True,
        progress=False,
        dtype="float32",
        tokenizer_ckpt=tokenizer_ckpt,
    )
    cache = LatentCache(tmp_path / "f32", expected_fingerprint=meta["fingerprint"])
    assert len(cache) == 20 and cache.latent_shape == (4, 16, 16) and meta["views"] == 2
    stored = np.load(tmp_path / "f32" / "latents.npy")
    assert torch.equal(torch.from_numpy(stored), torch.stack([z, z_flip], 1))
    seen_views = set()
    for i in range(20):
        item = cache[i]
        assert item["reference"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert int(item["label"]) == int(labels[i])
        is_plain = torch.equal(item["reference"], z[i])
        assert is_plain or torch.equal(item["reference"], z_flip[i])
        seen_views.add(is_plain)
    assert seen_views == {True, False}  # both views are served
    fixed = LatentCache(tmp_path / "f32", random_view=False)  # validation / no hflip: view 0
    assert all(torch.equal(fixed[i]["reference"], z[i]) for i in range(20) for _ in range(3))
    # the data module: random views only for the training split with hflip; a cache whose
    # labels exceed num_classes is refused, naming the option
    from dmvae_lightning.data.reference import ReferenceDistribution

    (tmp_path / "caches").mkdir()
    for split in ("train", "val"):
        (tmp_path / "caches" / split).symlink_to(tmp_path / "f32")
    for hflip, split, random_view in [(True, "train", True), (True, "val", False),
                                      (False, "train", False)]:  # fmt: skip
        dm = ReferenceDistribution(
            dataset="latent_cache", root=str(tmp_path / "caches"), num_classes=10, hflip=hflip
        )
        assert dm._build(split).random_view is random_view
    too_few = ReferenceDistribution(
        dataset="latent_cache", root=str(tmp_path / "caches"), num_classes=int(labels.max())
    )
    with pytest.raises(ValueError, match="data.init_args.num_classes"):
        too_few._build("train")
    whole, whole_labels = cache.as_tensors()  # every latent of one view at once, in order
    assert torch.equal(whole, z) and torch.equal(whole_labels, labels)
    assert torch.equal(cache.as_tensors(view=1)[0], z_flip)
    with pytest.raises(ValueError, match="2 view"):
        cache.as_tensors(view=2)

    # float16 storage: exactly the rounded latents; no flips -> another fingerprint
    meta16 = encode_dataset(tok, data, tmp_path / "f16", batch_size=7, progress=False)
    cache16 = LatentCache(tmp_path / "f16")
    z16 = encode_in_batches(7, flips=False)[:, 0].half().float()
    assert torch.equal(torch.stack([cache16[i]["reference"] for i in range(20)]), z16)
    assert meta16["fingerprint"] != meta["fingerprint"]
    with pytest.raises(ValueError, match="fingerprint"):
        LatentCache(tmp_path / "f16", expected_fingerprint=meta["fingerprint"])
    cache.check_tokenizer(tokenizer_ckpt)  # the checkpoint's hash is stored; other bytes fail
    other = tmp_path / "other.ckpt"
    other.write_bytes(Path(tokenizer_ckpt).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="tokenizer_ckpt"):
        cache.check_tokenizer(other)
    (tmp_path / "f16" / "meta.json").unlink()  # an interrupted encode is not a cache
    with pytest.raises(FileNotFoundError, match="not a complete latent cache"):
        LatentCache(tmp_path / "f16")

    # the command line writes the same latents (Fashion-MNIST val = its test split)
    out = tmp_path / "cli"
    cli_meta = latents_main(
        [
            "--tokenizer_ckpt",
            tokenizer_ckpt,
            "--out",
            str(out),
            "--split",
            "val",
            "--limit",
            "20",
            "--flips",
            "--batch_size",
            "8",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--no_progress",
        ]
    )
    assert torch.equal(torch.from_numpy(np.load(out / "latents.npy")), torch.from_numpy(stored))
    # images of another channel count than the tokenizer's: a usage error naming --channels
    with pytest.raises(SystemExit) as exit_info:
        latents_main(["--tokenizer_ckpt", tokenizer_ckpt, "--out", str(tmp_path / "rgb")]
                     + ["--channels", "3", "--no_progress", "--device", "cpu"])  # fmt: skip
    assert exit_info.value.code == 2 and not (tmp_path / "rgb").exists()
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == cli_meta["fingerprint"]

    # a LatentDiffusionModule trains on the cache and decodes samples with the tokenizer
    model = LatentDiffusionModule(
        latent_shape=[4, 16, 16],
        num_classes=10,
        dit=TINY_DIT,
        tokenizer_ckpt=tokenizer_ckpt,
        encode_images=False,
        stats_batches=2,
        ema_decay=None,
    )
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(cache, batch_size=8))
    assert int(model.batch_count) == 2 and bool(model.stats_ready)
    images_out = model.sample(torch.tensor([0, 1]), steps=2, decode=True)
    assert images_out.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("workers", [0, 1])
def test_cli_trains_on_latent_cache_and_rejects_a_stale_one(tmp_path, tokenizer_ckpt, workers):
    """`data.dataset: latent_cache` feeds cached latents as batch["reference"]; a cache encoded by
    another tokenizer checkpoint is refused before training, naming the option. With a loader
    worker (persistent), the statistics pass over the whole epoch must not eat the epoch's
    training batches (it did: the pass restarted the fit loop's own iterator)."""
    for split in ("train", "val"):
        latents_main(
            [
                "--tokenizer_ckpt",
                tokenizer_ckpt,
                "--out",
                str(tmp_path / "cache" / split),
                "--split",
                split,
                "--limit",
                "32",
                "--dtype",
                "float32",
                "--no_progress",
            ]
        )
    cache_args = [
        "--model.init_args.encode_images=false",
        "--data.init_args.dataset=latent_cache",
        f"--data.init_args.root={tmp_path / 'cache'}",
        "--data.init_args.train_subset=null",
        "--data.init_args.val_subset=null",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--model.init_args.stats_batches=4",  # 4 x 8 = the whole 32-latent cache
        f"--data.init_args.num_workers={workers}",
    ]
    cli = fit(tmp_path / "run", tokenizer_ckpt, *cache_args)
    assert int(cli.model.batch_count) == 4
    cached = LatentCache(tmp_path / "cache" / "train")
    z = torch.stack([cached[i]["reference"] for i in range(len(cached))]).double()
    assert cli.model.latent_mean.item() == pytest.approx(z.mean().item(), rel=1e-5)
    assert cli.model.latent_scale.item() == pytest.approx(
        1 / z.std(unbiased=False).item(), rel=1e-5
    )

    state = torch.load(tokenizer_ckpt, map_location="cpu", weights_only=True)
    state["state_dict"]["tokenizer.decoder.conv_out.bias"] += 0.01  # another tokenizer
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    with pytest.raises(ValueError, match=r"model\.init_args\.tokenizer_ckpt.*latent cache"):
        fit(tmp_path / "stale", str(other), *cache_args)


def test_predict_writes_pngs_and_latents(tmp_path, tokenizer_ckpt):
    """`dmvae predict` with the PredictionWriter writes one PNG per sample (class in the name)
    and the latents it returned."""
    from dmvae_lightning.callbacks import PredictionWriter

    cli = fit(tmp_path / "run", tokenizer_ckpt, "--trainer.max_epochs", "1")
    writer = PredictionWriter(str(tmp_path / "out"))
    cli.trainer.callbacks.append(writer)
    out = cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=True)
    pngs = sorted((tmp_path / "out" / "images").glob("*.png"))
    labels = torch.cat([o["label"] for o in out])
    assert len(pngs) == len(labels) == 16
    assert pngs[0].name.endswith(f"_c{int(labels[0])}.png")
    saved = torch.load(tmp_path / "out" / "tensors" / "r0_b000000.pt", weights_only=True)
    assert torch.equal(saved["latent"], out[0]["latent"]) and "image" not in saved
    # image_keys that match nothing (a typo): a warning naming them, once, and no PNG
    cli.trainer.callbacks.remove(writer)
    typo = PredictionWriter(str(tmp_path / "typo"), image_keys=["images"])
    cli.trainer.callbacks.append(typo)
    with pytest.warns(UserWarning, match=r"image_keys \['images'\] match none") as record:
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    assert sum("image_keys" in str(w.message) for w in record) == 1
    assert not (tmp_path / "typo" / "images").exists()


def test_compiled_dit_matches_eager_and_keeps_checkpoint_keys():
    """`compile: true` compiles the DiT in place: same outputs, same state-dict keys."""
    torch.manual_seed(0)
    eager = LatentDiffusionModule(
        latent_shape=[2, 4, 4], num_classes=3, dit=TINY_DIT, ema_decay=None
    )
    torch.manual_seed(0)
    compiled = LatentDiffusionModule(
        latent_shape=[2, 4, 4],
        num_classes=3,
        dit=TINY_DIT,
        ema_decay=None,
        compile=True,
        compile_backend="aot_eager",  # the tracing path without a C++ toolchain in the loop
    )
    for p in eager.dit.parameters():  # non-zero outputs despite adaLN-Zero init
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    eager.eval(), compiled.eval()
    with torch.no_grad():
        expected, got = eager.dit(x, t, y), compiled.dit(x, t, y)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert compiled.dit._compiled_call_impl is not None
