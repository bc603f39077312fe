"""Evaluation: FID / IS against torch-fidelity, the Inception wrapper and its weights option, ADM
``.npz`` files, the statistics cache, and resumable class-balanced sampling split over ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same, save_module_checkpoint
from torch import nn
from torch.utils.data import Dataset

from dmvae_lightning.data.images import FashionMNIST
from dmvae_lightning.metrics import (
    DomainFeatures,
    FeatureExtractor,
    FidelityFeatures,
    InceptionFeatures,
    StatsCache,
    build_extractor,
    evaluate_samples,
    feature_stats,
    frechet_distance,
    inception_score,
    load_adm_samples,
    load_adm_stats,
    reference_stats,
    save_adm_samples,
    save_adm_stats,
)
from dmvae_lightning.metrics.extractors import save_random_inception_weights
from dmvae_lightning.modules.classifier import ClassifierModule
from dmvae_lightning.sampling import (
    DiffusionGenerator,
    balanced_labels,
    blocks_of_rank,
    load_module,
    pack_samples,
    sample_path,
    write_samples,
)


def save_classifier_checkpoint(path: Path, seed: int = 0, norm: str = "batch") -> Path:
    """A ClassifierModule checkpoint (untrained, fid_net design at small width). Untrained with
    ``norm="batch"`` (running statistics 0 / 1) its features barely vary between images;
    ``"group"`` normalises each image, so its features tell images apart."""
    torch.manual_seed(seed)
    return save_module_checkpoint(ClassifierModule(widths=[8, 16, 32], norm=norm), path)


@pytest.fixture(scope="module")
def test_images(fashion_mnist_root) -> torch.Tensor:
    data = FashionMNIST(fashion_mnist_root, split="test")
    return torch.stack([data[i]["image"] for i in range(600)])


# ------------------------------------------------------------------ FID maths
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(tmp_path, test_images):
    features = DomainFeatures(save_classifier_checkpoint(tmp_path / "fid_net.ckpt"))
    real = features.stats(test_images)
    assert abs(frechet_distance(real, real)) < 1e-8
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(test_images.shape, generator=gen)
    fids = [
        frechet_distance(features.stats((test_images + s * noise).clamp(-1, 1)), real)
        for s in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    ]
    assert abs(fids[0]) < 1e-8
    assert all(b > a for a, b in zip(fids, fids[1:], strict=False)), fids
    assert fids[-1] > 100 * fids[1] > 0


class TinyFidelityExtractor(nn.Module):
    """A torch-fidelity FeatureExtractorBase (fixed random conv, 24-d features, 10 logits)."""

    @staticmethod
    def make():
        from torch_fidelity.feature_extractor_base import FeatureExtractorBase

        class Tiny(FeatureExtractorBase):
            def __init__(self, name, features_list, **kwargs):
                super().__init__(name, features_list)
                gen = torch.Generator().manual_seed(7)
                self.conv = nn.Conv2d(3, 24, 5, stride=2)
                self.conv.weight.data = torch.randn(24, 3, 5, 5, generator=gen)
                self.conv.bias.data.zero_()
                self.fc = nn.Linear(24, 10)
                self.fc.weight.data = torch.randn(10, 24, generator=gen)
                self.fc.bias.data = torch.randn(10, generator=gen)

            @staticmethod
            def get_provided_features_list():
                return "feat", "logits"

            @staticmethod
            def get_default_feature_layer_for_metric(metric):
                return {"fid": "feat", "isc": "logits", "kid": "feat", "prc": "feat"}[metric]

            @staticmethod
            def can_be_compiled():
                return False

            def forward(self, x):
                h = F.relu(self.conv(x.float() / 127.5 - 1)).mean((2, 3))
                out = {"feat": h, "logits": self.fc(h)}
                return tuple(out[name] for name in self.features_list)

        return Tiny


class Uint8Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_fid_and_is_equal_torch_fidelity_on_the_same_extractor(tmp_path):
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    tiny = TinyFidelityExtractor.make()
    if "dmvae-test-tiny" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("dmvae-test-tiny", tiny)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (300, 3, 16, 16), generator=gen, dtype=torch.uint8)
    b = (a.float() * 0.7 + 40 + 20 * torch.randn(a.shape, generator=gen)).clamp(0, 255)
    b = b.round().to(torch.uint8)
    theirs = torch_fidelity.calculate_metrics(
        input1=Uint8Images(b),
        input2=Uint8Images(a),
        fid=True,
        isc=True,
        feature_extractor="dmvae-test-tiny",
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        samples_shuffle=False,
        verbose=False,
        batch_size=64,
    )
    ours = FidelityFeatures(
        tiny("dmvae-test-tiny", ["feat", "logits"]), "feat", "tiny", logits_layer="logits"
    )
    signed = lambda x: x.float() / 127.5 - 1  # noqa: E731 - exact inverse of to_uint8
    result = evaluate_samples(signed(b), ours, reference=signed(a), cache=False, batch_size=64)
    fid = theirs["frechet_inception_distance"]
    assert fid > 1.0  # a real difference, not two zeros
    assert result["fid"] == pytest.approx(fid, abs=1e-3)
    assert result["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert result["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-9)


def test_inception_wrapper_equals_torch_fidelity_and_missing_weights_name_the_option(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = save_random_inception_weights(tmp_path / "inception.pth")
    ours = build_extractor({"name": "inception", "weights_path": str(weights)})
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 32, 32, generator=gen) * 2 - 1
    features, logits = ours.features_and_logits(images)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    ref_features, ref_logits = theirs(pixels)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.equal(features, ref_features) and torch.equal(logits, ref_logits)
    assert features.std(0).mean() > 1e-3  # the stand-in weights are not degenerate
    assert ours.identity.startswith("inception-v3-compat/2048/")

    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.fid\.weights_path"):
        build_extractor(
            {"name": "inception", "weights_path": str(tmp_path / "no.pth")}, "model.init_args.fid"
        )
    with pytest.raises(FileNotFoundError, match=r"extractor\.weights_path is not set.*hub"):
        InceptionFeatures()  # TORCH_HOME is this test's empty folder
    with pytest.raises(FileNotFoundError, match=r"fid\.checkpoint"):
        build_extractor({"name": "domain", "checkpoint": str(tmp_path / "no.ckpt")}, "fid")


def test_inception_score_matches_closed_forms():
    # identical one-hot predictions: IS = 1; uniform over K classes, each certain: IS = K
    certain = torch.full((40, 4), -1e4)
    certain[torch.arange(40), torch.arange(40) % 4] = 0
    assert inception_score(certain, splits=2)[0] == pytest.approx(4.0, rel=1e-9)
    same = torch.zeros(40, 4)
    same[:, 1] = 1e4
    assert inception_score(same, splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)
    # too few samples is its own error type (the evaluate CLI turns it into a usage error);
    # a wrong shape is a plain ValueError
    from dmvae_lightning.metrics.evaluate import TooFewSamplesError

    with pytest.raises(TooFewSamplesError, match="3 samples cannot fill 10"):
        inception_score(same[:3], splits=10)
    with pytest.raises(ValueError, match="shape") as err:
        inception_score(same[0], splits=1)
    assert not isinstance(err.value, TooFewSamplesError)


# ------------------------------------------------------------------ files and cache
def test_adm_npz_round_trip_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    stats = feature_stats(feats)
    loaded = load_adm_stats(save_adm_stats(tmp_path / "ref.npz", stats))
    assert torch.equal(loaded.mu, stats.mu) and torch.equal(loaded.sigma, stats.sigma)
    assert loaded.count == 50
    # a file as guided-diffusion writes it (np.savez with mu / sigma only)
    np.savez(tmp_path / "adm.npz", mu=stats.mu.numpy(), sigma=stats.sigma.numpy())
    adm = reference_stats(str(tmp_path / "adm.npz"))
    assert torch.equal(adm.mu, stats.mu) and torch.equal(adm.sigma, stats.sigma)
    assert frechet_distance(adm, stats) == pytest.approx(0.0, abs=1e-10)

    images = torch.randint(0, 256, (5, 6, 7, 3), generator=gen, dtype=torch.uint8)
    labels = torch.arange(5)
    back, back_labels = load_adm_samples(save_adm_samples(tmp_path / "s.npz", images, labels))
    assert back.dtype == torch.uint8 and torch.equal(back, images)
    assert torch.equal(back_labels, labels)


class CountingExtractor(FeatureExtractor):
    identity = "counting/v1"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def features_and_logits(self, images):
        self.calls += 1
        return images.flatten(1)[:, :6].float() + images.mean((1, 2, 3))[:, None], None


def test_stats_cache_hits_without_recomputing_and_misses_on_new_content(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 4, 4, generator=gen) * 2 - 1
    extractor = CountingExtractor()
    cache = StatsCache(tmp_path / "cache")
    first = cache.stats(images, extractor, batch_size=16)
    assert extractor.calls == 3 and cache.misses == 1
    second = StatsCache(tmp_path / "cache").stats(images.clone(), extractor, batch_size=16)
    assert extractor.calls == 3  # read from disk: the extractor did not run
    assert torch.equal(first.mu, second.mu) and torch.equal(first.sigma, second.sigma)
    changed = images.clone()
    changed[0, 0, 0, 0] += 0.5
    cache.stats(changed, extractor, batch_size=16)
    assert extractor.calls == 6 and cache.misses == 2
    other = CountingExtractor()
    other.identity = "counting/v2"  # other weights: another entry
    cache.stats(images, other, batch_size=16)
    assert other.calls == 3 and len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_folder_sources_and_evaluate_cli(tmp_path, test_images, capsys):
    from dmvae_lightning.metrics.evaluate import main as evaluate_main

    # group norm: features that tell images apart (an untrained batch-norm net's barely vary)
    ckpt = save_classifier_checkpoint(tmp_path / "fid_net.ckpt", norm="group")
    pixels = ((test_images[:60] + 1) * 127.5).round().to(torch.uint8)
    save_adm_samples(tmp_path / "samples.npz", pixels.permute(0, 2, 3, 1))
    folder = tmp_path / "real"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(pixels):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    args = ["--samples", str(tmp_path / "samples.npz"), "--reference", str(folder)]
    args += ["--extractor", "domain", "--checkpoint", str(ckpt), "--isc_splits", "2"]
    result = evaluate_main([*args, "--cache_dir", str(tmp_path / "cache")])
    assert result["num_samples"] == 60 and abs(result["fid"]) < 1e-6  # same pixels both sides
    # IS over --isc_splits 2, as computed here from the extractor's logits of the samples
    _, logits = DomainFeatures(ckpt).features_and_logits(pixels.float() / 127.5 - 1)
    want = inception_score(logits, splits=2)
    assert (result["is_mean"], result["is_std"]) == pytest.approx(want, rel=1e-4)
    assert inception_score(logits, splits=10) != pytest.approx(want, rel=1e-4)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # other samples (the images negated) against the same reference: FID > 0, from the cache
    save_adm_samples(tmp_path / "negated.npz", (255 - pixels).permute(0, 2, 3, 1))
    args[1] = str(tmp_path / "negated.npz")
    other = evaluate_main([*args, "--cache_dir", str(tmp_path / "cache")])
    assert other["fid"] > 0.05
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # plain mistakes are usage errors naming the flag, not tracebacks
    for bad, words in [
        (["--samples", str(tmp_path / "nope.npz")], "--samples"),
        (["--reference", str(tmp_path / "nope")], "--reference"),
        (["--isc_splits", "100"], "--isc_splits 100"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main([*args, *bad, "--cache_dir", str(tmp_path / "cache")])
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err


def test_image_folders_of_mixed_modes_and_sizes(tmp_path):
    """An RGB folder with a greyscale file (ImageNet has some) reads it as RGB, its grey value
    in all three channels; colour in a greyscale folder and a file of another size are errors
    naming the file."""
    from PIL import Image

    from dmvae_lightning.metrics.stats import image_batches

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(rgb / "a.png")
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(rgb / "b.png")  # greyscale
    (batch,) = list(image_batches(rgb, batch_size=10))
    assert batch.shape == (2, 3, 8, 8)
    assert torch.allclose(batch[1], torch.full((3, 8, 8), 51 / 127.5 - 1))
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(grey / "a.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(grey / "b.png")
    with pytest.raises(ValueError, match="b.png is RGB but the folder's first image is grey"):
        list(image_batches(grey))
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(rgb / "c.png")
    Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(rgb / "d.png")
    with pytest.raises(ValueError, match="d.png is 8x6 but a.png is 8x8"):
        list(image_batches(rgb, batch_size=2))


# ------------------------------------------------------------------ sampling
def test_sampling_cli_refuses_to_resume_with_another_checkpoint_at_the_same_path(
    tmp_path, stage_ckpts
):
    """``sampling.json`` records the checkpoint's and tokenizer's contents: a resume with the
    same files passes, one whose checkpoint file was overwritten (a later ``last.ckpt``) is
    refused before any sample is written."""
    import shutil

    from dmvae_lightning.sampling import main as sampling_main

    ckpt = tmp_path / "last.ckpt"
    shutil.copy(stage_ckpts["reference"], ckpt)
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--num_samples", "4", "--batch_size", "2"]
    argv += ["--steps", "2", "--no_progress", "--device", "cpu"]
    sampling_main(argv)
    manifest = json.loads((out / "sampling.json").read_text())
    assert manifest["ckpt_sha256"] and manifest["tokenizer_sha256"]
    sampling_main(argv)  # the same files: resumes (nothing left to draw)
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("dit.") and k.endswith("weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1.0
    torch.save(state, ckpt)
    (out / "images" / sorted(os.listdir(out / "images"))[0]).unlink()  # one left to draw
    with pytest.raises(ValueError, match="ckpt_sha256"):
        sampling_main(argv)


def toy_generate(log: list[int]):
    """A deterministic generator: image i is a function of its noise seed only, except for a
    block term (as the SDE noise is) that depends on the block seed."""

    def generate(labels, noise_seeds, block_seed):
        out = []
        for label, seed in zip(labels.tolist(), noise_seeds, strict=True):
            g = torch.Generator().manual_seed(seed)
            out.append(torch.tanh(torch.randn(1, 8, 8, generator=g) + 0.1 * label))
        block = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(block_seed))
        log.extend(noise_seeds)
        return torch.stack(out) + 0.01 * block

    return generate


def test_sampling_resumes_without_duplicates_across_two_ranks(tmp_path):
    n, batch, classes = 21, 4, 5
    blocks = [blocks_of_rank(n, batch, r, 2) for r in (0, 1)]
    indices = [i for rank in blocks for block in rank for i in block]
    assert sorted(indices) == list(range(n))  # disjoint shards covering every index

    straight = tmp_path / "straight"
    write_samples(toy_generate([]), n, straight, classes, batch, progress=False)
    pack_samples(straight)

    split = tmp_path / "split"
    rank0 = write_samples(toy_generate([]), n, split, classes, batch, 0, 2, progress=False)
    assert rank0 == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    calls = []

    def killed_after_two_blocks(labels, noise_seeds, block_seed):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(block_seed)
        return toy_generate([])(labels, noise_seeds, block_seed)

    with pytest.raises(KeyboardInterrupt):  # rank 1 dies while drawing its third block
        write_samples(killed_after_two_blocks, n, split, classes, batch, 1, 2, progress=False)
    sample_path(split, 13).unlink()  # and its second block was only partly written
    sample_path(split, 20).with_name(".000020.999.png").write_bytes(b"half")  # unfinished tmp
    before = {int(p.stem) for p in (split / "images").glob("[0-9]*.png")}
    log: list[int] = []
    resumed = write_samples(toy_generate(log), n, split, classes, batch, 1, 2, progress=False)
    assert resumed == [13, 20]  # only what was missing
    assert len(log) == 5  # block [12, 16) drawn again (same samples), then block [20, 21)
    assert before.isdisjoint(resumed) and sorted(before | set(resumed)) == list(range(n))
    again = write_samples(toy_generate([]), n, split, classes, batch, 0, 2, progress=False)
    assert again == []

    packed_split, labels = load_adm_samples(pack_samples(split))
    packed_straight, _ = load_adm_samples(straight / "samples.npz")
    assert packed_split.shape == (n, 8, 8, 1) and packed_split.dtype == torch.uint8
    assert torch.equal(packed_split, packed_straight)  # independent of ranks and interruptions
    assert torch.equal(labels, balanced_labels(range(n), classes))
    assert torch.bincount(labels[:20]).tolist() == [4] * classes

    with pytest.raises(ValueError, match="other settings"):
        write_samples(toy_generate([]), n, split, classes, batch + 1, progress=False)


class PixelShuffleTokenizer(nn.Module):
    """Stand-in tokenizer: decode (B, 4, 4, 4) latents to (B, 1, 8, 8) images."""

    def decode(self, z):
        return torch.tanh(F.pixel_shuffle(z, 2))


def test_diffusion_generator_samples_do_not_depend_on_the_rank_split(tmp_path):
    from dmvae_lightning.modules.diffusion import LatentDiffusionModule

    torch.manual_seed(0)
    module = LatentDiffusionModule(
        latent_shape=[4, 4, 4],
        num_classes=3,
        dit={"preset": "tiny", "patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2},
        latent_mean=0.0,
        latent_scale=1.0,
        ema_decay=None,
        sampler="sde",
        sample_steps=3,
    )
    object.__setattr__(module, "_tokenizer", PixelShuffleTokenizer())
    generate = DiffusionGenerator(module)
    write_samples(generate, 7, tmp_path / "one", 3, 2, progress=False)
    for rank in (1, 0):
        write_samples(generate, 7, tmp_path / "two", 3, 2, rank, 2, progress=False)
    one, _ = load_adm_samples(pack_samples(tmp_path / "one"))
    two, labels = load_adm_samples(pack_samples(tmp_path / "two"))
    assert torch.equal(one, two) and one.shape == (7, 8, 8, 1)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert one.float().std() > 1  # not a constant image


def test_sampling_cli_loads_the_checkpoint_and_names_missing_pieces(tmp_path):
    from dmvae_lightning.modules.diffusion import LatentDiffusionModule
    from dmvae_lightning.sampling import main as sampling_main

    module = LatentDiffusionModule(
        latent_shape=[4, 4, 4],
        num_classes=3,
        dit={"preset": "tiny", "patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2},
        latent_mean=0.0,
        latent_scale=1.0,
    )
    with torch.no_grad():  # weights no fresh module has, so that loading them shows
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ckpt = save_module_checkpoint(module, tmp_path / "gen.ckpt")
    cls_path = "dmvae_lightning.modules.diffusion.LatentDiffusionModule"
    loaded = load_module(str(ckpt), cls_path, None, "cpu")
    assert type(loaded) is LatentDiffusionModule and not loaded.training
    assert_same(loaded.state_dict(), module.state_dict())
    out = ["--out", str(tmp_path / "s"), "--num_samples", "4", "--no_progress"]
    with pytest.raises(ValueError, match="--tokenizer_ckpt"):
        sampling_main(["--ckpt", str(ckpt), *out])
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        sampling_main(["--ckpt", str(tmp_path / "none.ckpt"), *out])
