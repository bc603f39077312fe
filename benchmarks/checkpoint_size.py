"""Alignment checkpoint size with the DMD real score model stored by reference (now) and by
value (before: its tensors under ``matching_loss.real.*``).

* ``--shape fashion_mnist``: measured. Stand-in stage-1 / stage-2 checkpoints with random
  weights from the shipped configs, 5 alignment batches (one VAE step) of
  ``configs/fashion_mnist/align.yaml`` through ``dmvae fit``, then the same file with the real
  model's tensors added back.
* ``--shape imagenet``: computed from parameter counts (meta device, no weights, fp32): state
  dict (tokenizer, its EMA, discriminator, fake DiT) plus AdamW moments of everything trained,
  with and without the frozen real DiT.

    python benchmarks/checkpoint_size.py --shape fashion_mnist --classifier runs/fashion_mnist/checkpoints/classifier.ckpt
    python benchmarks/checkpoint_size.py --shape imagenet
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB, GIB = 2**20, 2**30


def init_args(config: str) -> dict:
    return yaml.safe_load((REPO / config).read_text())["model"]["init_args"]


def fashion_mnist(classifier: str) -> None:
    from dmvae_lightning.cli import main
    from dmvae_lightning.modules import DMVAEModule, LatentDiffusionModule

    classifier = str(Path(classifier).resolve())
    out = Path(tempfile.mkdtemp(prefix="ckpt_size_"))
    tok_args = init_args("configs/fashion_mnist/tokenizer.yaml")
    tok_args["encoder"]["weights_path"] = classifier
    tok = DMVAEModule(**tok_args)
    state = {"state_dict": tok.state_dict(), "hyper_parameters": dict(tok.hparams)}
    torch.save(state, out / "tokenizer.ckpt")
    ref_args = init_args("configs/fashion_mnist/reference.yaml")
    ref_args.pop("tokenizer_ckpt", None)
    ref_args.update(latent_shape=[4, 8, 8], num_classes=10, latent_mean=0.1, latent_scale=0.9)
    ref = LatentDiffusionModule(**ref_args)
    state = {"state_dict": ref.state_dict(), "hyper_parameters": dict(ref.hparams)}
    torch.save(state, out / "reference.ckpt")
    os.chdir(out)  # the config writes runs/fashion_mnist/checkpoints/align.ckpt
    main(
        ["fit", "--config", str(REPO / "configs/fashion_mnist/align.yaml")]
        + ["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "1"]
        + ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        + ["--model.init_args.init_from", str(out / "tokenizer.ckpt")]
        + ["--model.init_args.encoder.weights_path", classifier]
        + ["--model.init_args.matching_loss.init_args.real_model", str(out / "reference.ckpt")]
    )
    file = out / "runs/fashion_mnist/checkpoints/align.ckpt"
    ckpt = torch.load(file, weights_only=True)
    assert not any(k.startswith("matching_loss.real.") for k in ckpt["state_dict"])
    real = {
        f"matching_loss.real.{k[4:]}": v
        for k, v in ref.state_dict().items()
        if k.startswith("dit.")
    }
    before = dict(ckpt, state_dict={**ckpt["state_dict"], **real})
    buffer = io.BytesIO()
    torch.save(before, buffer)
    values = sum(v.numel() for v in real.values())
    print(
        f"Fashion-MNIST align checkpoint (measured): before {buffer.tell() / MIB:.2f} MiB, "
        f"after {file.stat().st_size / MIB:.2f} MiB (real DiT {values / 1e6:.3f} M values)"
    )


def imagenet() -> None:
    from dmvae_lightning.checkpoints import build_tokenizer
    from dmvae_lightning.nets.discriminator import PatchDiscriminator
    from dmvae_lightning.nets.dit import DiT

    a = init_args("configs/imagenet/align.yaml")
    r = init_args("configs/imagenet/reference.yaml")
    with torch.device("meta"):
        encoder = dict(a["encoder"], pretrained=False)
        encoder.pop("weights_path", None)
        tok = build_tokenizer(
            a.get("image_channels", 3),
            a["latent_channels"],
            encoder,
            a.get("bottleneck_hidden", 256),
            False,
            a.get("decoder"),
        )
        disc = PatchDiscriminator(in_channels=3, **(a.get("discriminator") or {}))
        spec = dict(r.get("dit") or {})
        preset = spec.pop("preset", "tiny")
        shape = r.get("latent_shape") or [a["latent_channels"], 16, 16]
        dit = DiT.from_preset(
            preset,
            input_size=tuple(shape[1:]),
            in_channels=shape[0],
            num_classes=r.get("num_classes") or 1000,
            **spec,
        )

    def count(module: torch.nn.Module) -> tuple[int, int]:
        return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())

    (tp, tb), (dp, db), (rp, rb) = count(tok), count(disc), count(dit)
    after = 4 * ((tp + tb) + tp + (dp + db) + (rp + rb) + 2 * (tp + dp + rp))
    before = after + 4 * (rp + rb)
    print(
        f"tokenizer {tp / 1e6:.1f} M parameters, discriminator {dp / 1e6:.2f} M, "
        f"DiT {rp / 1e6:.1f} M (+{rb / 1e6:.2f} M buffer values)"
    )
    print(
        f"ImageNet align checkpoint (from parameter counts, fp32): before {before / GIB:.2f} GiB, "
        f"after {after / GIB:.2f} GiB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("fashion_mnist", "imagenet"), default="imagenet")
    parser.add_argument("--classifier", default="runs/fashion_mnist/checkpoints/classifier.ckpt")
    args = parser.parse_args()
    fashion_mnist(args.classifier) if args.shape == "fashion_mnist" else imagenet()
