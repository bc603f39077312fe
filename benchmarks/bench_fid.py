"""FID / IS feature-extraction throughput: our extractor wrapper vs torch-fidelity's own pipeline.

Both sides extract TF-Inception features of the same images (Fashion-MNIST test images as RGB, or
random ones with ``--random``): the 2048-d pool features (FID) and ``logits_unbiased`` (IS), in
one pass. Ours: :class:`~dmvae_lightning.metrics.InceptionFeatures` built from the weights file,
then ``extract`` on float batches in [-1, 1]. Theirs: torch-fidelity's
``create_feature_extractor`` and ``extract_featuresdict_from_input_id`` on a uint8 Dataset of the
same pixels (``save_cpu_ram``: no loader workers, like ours). Network construction is timed on
both sides, after one untimed warm-up pass. Prints images/s and the ratio, the largest feature
difference, and then the time of the Frechet distance itself on those features (ours: symmetric
eigendecompositions in fp64; torch-fidelity: ``eigvals`` of ``sigma1 @ sigma2``).

    OMP_NUM_THREADS=1 python benchmarks/bench_fid.py --num_images 48

Without ``--weights_path`` a randomly initialised stand-in for the Inception weights is written
to a temporary file (the real file cannot be downloaded here): the timing is the same network,
the metric values mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from dmvae_lightning.metrics import InceptionFeatures, feature_stats, frechet_distance
from dmvae_lightning.metrics.extractors import save_random_inception_weights, to_uint8
from dmvae_lightning.metrics.stats import image_batches


class Pixels(Dataset):
    """uint8 (3, H, W) items, as torch-fidelity's Dataset inputs must be."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pixels[i]


def load_images(n: int, random: bool) -> torch.Tensor:
    if random:
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from dmvae_lightning.data.images import FashionMNIST

    data = FashionMNIST(split="test", channels=3)
    return torch.stack([data[i]["image"] for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--weights_path", help="TF-Inception weights (default: random stand-in)")
    parser.add_argument("--random", action="store_true", help="random images, not Fashion-MNIST")
    args = parser.parse_args()
    images = load_images(args.num_images, args.random)
    pixels = to_uint8(images)
    images = pixels.float() / 127.5 - 1  # both sides see exactly the same pixels
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights_path or str(save_random_inception_weights(Path(tmp) / "inc.pth"))
        n, bs = args.num_images, args.batch_size
        print(f"{n} images {tuple(images.shape[1:])}, batch {bs}, torch threads", end=" ")
        print(f"{torch.get_num_threads()}, TF-Inception at 299x299, features 2048 + logits")
        InceptionFeatures(weights)(images[:2])  # warm-up (allocator, kernels) before timing

        start = time.perf_counter()
        extractor = InceptionFeatures(weights)
        ours, ours_logits = extractor.extract(image_batches(images, bs), logits=True)
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        net = create_feature_extractor(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            cuda=False,
            feature_extractor_weights_path=weights,
            verbose=False,
        )
        theirs = extract_featuresdict_from_input_id(
            1, net, input1=Pixels(pixels), cuda=False, batch_size=bs, save_cpu_ram=True,
            verbose=False,
        )  # fmt: skip
        theirs_s = time.perf_counter() - start

    print(f"{'feature extraction':<36}{'seconds':>10}{'images/s':>12}")
    print(f"{'ours (InceptionFeatures.extract)':<36}{ours_s:>10.2f}{n / ours_s:>12.2f}")
    print(f"{'torch-fidelity (its own pipeline)':<36}{theirs_s:>10.2f}{n / theirs_s:>12.2f}")
    print(f"ratio ours / torch-fidelity throughput: {theirs_s / ours_s:.2f}x")
    diff = max(
        (ours - theirs["2048"]).abs().max().item(),
        (ours_logits - theirs["logits_unbiased"]).abs().max().item(),
    )
    print(f"largest feature difference: {diff:.3g}")

    half = n // 2  # FD between the two halves, on the same features
    start = time.perf_counter()
    fd_ours = frechet_distance(feature_stats(ours[:half]), feature_stats(ours[half:]))
    fd_ours_s = time.perf_counter() - start
    start = time.perf_counter()
    fd_theirs = fid_statistics_to_metric(
        fid_features_to_statistics(ours[:half]), fid_features_to_statistics(ours[half:]), False
    )["frechet_inception_distance"]
    fd_theirs_s = time.perf_counter() - start
    print(
        f"Frechet distance (2048-d): ours {fd_ours_s:.2f} s, torch-fidelity {fd_theirs_s:.2f} s; "
        f"values {fd_ours:.6g} vs {fd_theirs:.6g}"
    )


if __name__ == "__main__":
    main()
