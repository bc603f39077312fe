"""gFID / IS of a sample set, rFID / PSNR / SSIM / LPIPS of reconstructions, and the command
line that scores a sample folder or ``.npz`` against reference images or ADM statistics.

    python -m dmvae_lightning.metrics.evaluate --samples runs/samples/samples.npz \\
        --reference VIRTUAL_imagenet256_labeled.npz --extractor inception \\
        --weights_path weights-inception-2015-12-05-6726825d.pth
    python -m dmvae_lightning.metrics.evaluate --samples runs/samples/images \\
        --reference fashion_mnist:test --extractor domain \\
        --checkpoint runs/fashion_mnist/checkpoints/fid_net.ckpt

``--extractor inception`` is torch-fidelity's TF-Inception (published FID / IS numbers);
``--extractor domain`` the offline Fashion-MNIST network (``configs/fashion_mnist/fid_net.yaml``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dmvae_lightning.metrics.extractors import DomainFeatures, FeatureExtractor, InceptionFeatures
from dmvae_lightning.metrics.fid import feature_stats, frechet_distance
from dmvae_lightning.metrics.stats import StatsCache, image_batches, reference_stats

__all__ = [
    "TooFewSamplesError",
    "evaluate_samples",
    "inception_score",
    "main",
    "reconstruction_metrics",
]


class TooFewSamplesError(ValueError):
    """Fewer samples than the Inception Score has splits (each split needs one at least)."""


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of logits (N, K), float64, as mean and
    (population) standard deviation over ``splits`` consecutive chunks (torch-fidelity's
    ``isc_features_to_metric`` with ``shuffle=False``). Raises :class:`TooFewSamplesError`
    when N < ``splits``."""
    if logits.ndim != 2:
        raise ValueError(f"need logits (N, K), got shape {tuple(logits.shape)}")
    if logits.shape[0] < splits:
        raise TooFewSamplesError(
            f"{logits.shape[0]} samples cannot fill {splits} Inception Score splits"
        )
    log_p = logits.double().log_softmax(dim=1)
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        p = chunk.exp()
        log_marginal = p.mean(0).log()
        terms = torch.where(p > 0, p * (chunk - log_marginal), torch.zeros_like(p))  # 0 log 0 = 0
        kl = terms.sum(1).mean()
        scores.append(math.exp(float(kl)))
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False))


@torch.no_grad()
def evaluate_samples(
    samples: Any,
    extractor: FeatureExtractor,
    reference: Any | None = None,
    isc: bool = True,
    isc_splits: int = 10,
    cache: StatsCache | str | bool | None = True,
    batch_size: int = 100,
) -> dict[str, float]:
    """``{"fid", "is_mean", "is_std", "num_samples"}`` of an image source ``samples`` (tensor,
    folder, ADM ``.npz``, data set); FID against ``reference`` (image source or ADM statistics;
    its statistics cached), IS when ``isc`` and the extractor has logits."""
    use_logits = isc and isinstance(extractor, FeatureExtractor)
    features, logits = extractor.extract(image_batches(samples, batch_size), logits=use_logits)
    out: dict[str, float] = {"num_samples": float(features.shape[0])}
    if reference is not None:
        ref = reference_stats(reference, extractor, cache=cache, batch_size=batch_size)
        out["fid"] = frechet_distance(feature_stats(features), ref)
    if logits is not None:
        out["is_mean"], out["is_std"] = inception_score(logits, isc_splits)
    return out


@torch.no_grad()
def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of (N, C, H, W) images in [-1, 1] (clamped), measured on [0, 1]."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    y = (reconstructions.float().clamp(-1, 1) + 1) / 2
    mse = F.mse_loss(y, x, reduction="none").flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def reconstruction_metrics(
    images: torch.Tensor, reconstructions: torch.Tensor, lpips: torch.nn.Module | None = None
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (on [0, 1], data range 1) and, with an
    :class:`~dmvae_lightning.losses.reconstruction.LPIPS` module (local weights), LPIPS of
    reconstructions vs images, both (N, C, H, W) in [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = (images.float().clamp(-1, 1) + 1) / 2
    y = (reconstructions.float().clamp(-1, 1) + 1) / 2
    out = {
        "psnr": psnr(images, reconstructions),
        "ssim": float(structural_similarity_index_measure(y, x, data_range=1.0)),
    }
    if lpips is not None:
        out["lpips"] = float(lpips(reconstructions.float(), images.float()).mean())
    return out


def _reference_source(value: str) -> Any:
    """``fashion_mnist:SPLIT`` -> that data set; anything else is a path."""
    if value.startswith("fashion_mnist:"):
        from dmvae_lightning.data.images import FashionMNIST

        return FashionMNIST(split=value.split(":", 1)[1])
    return value


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m dmvae_lightning.metrics.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--samples", required=True, help="folder of images or ADM samples .npz")
    parser.add_argument(
        "--reference",
        help="folder, ADM .npz (mu/sigma statistics or arr_0 images), or fashion_mnist:SPLIT",
    )
    parser.add_argument("--extractor", choices=("inception", "domain"), default="inception")
    parser.add_argument("--weights_path", help="TF-Inception weights file (inception)")
    parser.add_argument("--checkpoint", help="fid_net ClassifierModule checkpoint (domain)")
    parser.add_argument("--no_isc", action="store_true", help="skip the Inception Score")
    parser.add_argument("--isc_splits", type=int, default=10)
    parser.add_argument(
        "--cache_dir", help="statistics cache (default $TORCH_HOME/dmvae_fid_stats)"
    )
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    for flag, value in (("--samples", args.samples), ("--reference", args.reference)):
        if value and not value.startswith("fashion_mnist:") and not Path(value).exists():
            parser.error(f"{flag} {value}: no such file or folder")
    if args.isc_splits < 1:
        parser.error(f"--isc_splits must be >= 1, got {args.isc_splits}")
    if args.extractor == "inception":
        extractor = InceptionFeatures(args.weights_path, option="--weights_path")
    elif args.checkpoint is None:
        parser.error("--extractor domain needs --checkpoint (the fid_net.yaml checkpoint)")
    else:
        extractor = DomainFeatures(args.checkpoint, option="--checkpoint")
    extractor = extractor.to(args.device)
    try:
        result = evaluate_samples(
            args.samples,
            extractor,
            reference=_reference_source(args.reference) if args.reference else None,
            isc=not args.no_isc,
            isc_splits=args.isc_splits,
            cache=args.cache_dir or True,
            batch_size=args.batch_size,
        )
    except TooFewSamplesError as err:
        parser.error(f"{err}: lower --isc_splits {args.isc_splits}, or pass --no_isc")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
