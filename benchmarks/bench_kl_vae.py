"""The per-sample-KL VAE's training step (the study's ``kl_vae`` arm), two ways side by side:

* ``reuse``: what ``DMVAEModule`` does now: the Gaussian KL reads the posterior of the encoder
  features that produced the batch's latents (one encoder pass per VAE step);
* ``recompute``: what it did before: the KL term ran the encoder on the images a second time
  (forward and backward), at the same value and gradients.

Sizes of ``configs/fashion_mnist/tokenizer.yaml`` + ``kl_vae/tokenizer.yaml`` (conv encoder
ch 32 (1, 2, 2) at 32x32, Gaussian MLP bottleneck to 4x8x8, decoder ch 16, PatchGAN ch 32,
KL weight 1e-9), batch 64, the discriminator on from the first step (as after ``disc_start``);
random images held in memory, ``lightning.Trainer`` as ``dmvae fit``. Prints ms per step
(median over ``--rounds`` rounds, order rotated per round, of the mean over ``--steps`` steps
after ``--warmup``) and the ratio::

    python benchmarks/bench_kl_vae.py
    python benchmarks/bench_kl_vae.py --threads 1

``--widths 32,16`` compares encoder widths instead (the study's ``kl_vae`` and
``kl_vae_narrow`` arms): the training step (``reuse``) and the no-grad encoding of 500 images
(what the study's latent cache does per batch) at each ``ch``, with their ratios to the first::

    python benchmarks/bench_kl_vae.py --threads 1 --widths 32,16

``--channels_last`` compares memory formats instead: the training step with every conv weight
(encoder, decoder, discriminator) stored NCHW against NHWC (``channels_last``), at ``--ch``::

    python benchmarks/bench_kl_vae.py --threads 1 --channels_last --ch 16

``--compile`` compares eager with ``torch.compile`` (inductor) at ``--ch``: the encoder and
decoder compiled (the module's ``compile`` option), then the discriminator too. Each variant
reports its steady step time and the seconds of its ``--warmup`` steps, whose excess over the
eager warm-up is compilation (cold: inductor's graph cache on disk is off); from these it prints
the steps after which compiling pays::

    python benchmarks/bench_kl_vae.py --threads 1 --compile --ch 32 --warmup 3 --steps 10 --rounds 1

``--before`` times the step at ``--ch`` as it is now against three exact rewrites undone, one
at a time and all together: the decoder's upsampling as resize + 3x3 conv instead of one
transposed convolution (``benchmarks/bench_decoder.py``); the adaptive GAN term
back-propagating the discriminator twice (once for the weight, once in the loss's backward)
instead of once; and the latents in channels-last memory (the MLP bottleneck's permuted view,
which every decoder convolution and the discriminator kept, with CPU GroupNorm several times
slower on it) instead of contiguous NCHW::

    python benchmarks/bench_kl_vae.py --threads 1 --before --ch 16 --warmup 3 --steps 10 --rounds 3
    python benchmarks/bench_kl_vae.py --threads 1 --before --only now,layout --ch 16 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from bench_align import RandomImages, rotated, timed_fit
from bench_decoder import upsampling
from torch.utils.data import DataLoader

from dmvae_lightning.losses.adversarial import (
    AdversarialLoss,
    adaptive_weight,
    generator_adv_loss,
)
from dmvae_lightning.losses.matching import GaussianKLLoss
from dmvae_lightning.modules.dmvae import DMVAEModule
from dmvae_lightning.nets.decoder import Decoder
from dmvae_lightning.nets.encoders import MLPBottleneck
from dmvae_lightning.utils.compile import compile_module


class TwoPassAdversarial(AdversarialLoss):
    """The former generator term: the adaptive weight's gradient through the discriminator,
    then the loss's own backward through it again."""

    def generator_loss(self, disc, x_rec, rec_loss, last_layer, generator=None):
        g_adv = generator_adv_loss(disc(self.augment(x_rec, generator)).float())
        weight = adaptive_weight(rec_loss, g_adv, last_layer, max_weight=self.max_adaptive_weight)
        return self.disc_weight * weight * g_adv, {"g_adv": g_adv.detach()}


class TwoPassGAN(DMVAEModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adversarial.__class__ = TwoPassAdversarial


def permuted_mlp(self: MLPBottleneck, x: torch.Tensor) -> torch.Tensor:
    """The bottleneck's former output on feature maps: a channels-last view."""
    return self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def layout_keeping_forward(self: Decoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder's former forward: the latent's memory layout as given."""
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    for i in reversed(range(len(self.up))):
        for block in self.up[i].block:
            h = block(h)
        if i != 0:
            h = self.up[i].upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


@contextlib.contextmanager
def latent_layout(layout: str):
    """``"nchw"``: as now; ``"channels_last"``: the bottleneck and decoder as before."""
    with contextlib.ExitStack() as stack:
        if layout == "channels_last":
            stack.enter_context(mock.patch.object(MLPBottleneck, "_mlp", permuted_mlp))
            stack.enter_context(mock.patch.object(Decoder, "forward", layout_keeping_forward))
        yield


class RecomputeKL(DMVAEModule):
    """The former behaviour: the KL's posterior from a second encoder pass."""

    def posterior_features(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encoder(x)


def build(cls: type[DMVAEModule], ch: int = 32, compile: bool = False) -> DMVAEModule:
    """The KL-VAE of the study's arm with a conv encoder of width ``ch`` (encoder and decoder
    compiled with ``compile``)."""
    torch.manual_seed(0)
    return cls(
        compile=compile,
        stage="pretrain",
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": ch, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
        bottleneck_hidden=128,
        bottleneck_gaussian=True,
        decoder={"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
        discriminator={"ch": 32, "n_layers": 2},
        l2_weight=1.0,
        disc_start=0,
        diffaug="translation",
        consistency_weight=1.0,
        lr=2e-3,
        warmup_steps=0,
        ema_decay=0.999,
        matching_loss=GaussianKLLoss(),
        matching_weight=1e-9,
    )


def run(
    cls: type[DMVAEModule],
    args: argparse.Namespace,
    ch: int = 32,
    nhwc: bool = False,
    compile: str = "",
    warmup_seconds: list[float] | None = None,
) -> float:
    """ms per step of ``args.steps`` steps after ``args.warmup``; appends the warm-up's seconds
    (from ``trainer.fit``'s call to the end of the last warm-up step) to ``warmup_seconds``.
    ``compile``: "" eager, "tokenizer" encoder and decoder, "all" the discriminator too."""
    module = build(cls, ch, compile=bool(compile))
    if compile == "all":
        compile_module(module.discriminator, True, "discriminator")
    if nhwc:
        for part in (module.tokenizer.encoder, module.tokenizer.decoder, module.discriminator):
            part.to(memory_format=torch.channels_last)
    total = args.warmup + args.steps + 1
    loader = DataLoader(RandomImages(total * args.batch_size), batch_size=args.batch_size)
    start = time.perf_counter()
    ends = timed_fit(module, loader)
    a = args.warmup - 1
    if warmup_seconds is not None:
        warmup_seconds.append(ends[a] - start)
    return (ends[a + args.steps] - ends[a]) / args.steps * 1e3


@torch.no_grad()
def encode_ms(ch: int, repeats: int = 4) -> float:
    """ms to encode one batch of 500 images (eval mode, no grad) with encoder width ``ch``."""
    tokenizer = build(DMVAEModule, ch).tokenizer.eval()
    x = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokenizer.encode(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        tokenizer.encode(x)
    return (time.perf_counter() - start) / repeats * 1e3


def compare_widths(widths: list[int], args: argparse.Namespace) -> None:
    step: dict[int, list[float]] = {w: [] for w in widths}
    enc: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(args.rounds):
        for w in rotated(widths, r):
            step[w].append(run(DMVAEModule, args, w))
            enc[w].append(encode_ms(w))
    print(
        f"KL-VAE encoder widths, batch {args.batch_size}, {torch.get_num_threads()} threads; "
        f"median of {args.rounds} rounds"
    )
    base = widths[0]
    s0, e0 = statistics.median(step[base]), statistics.median(enc[base])
    for w in widths:
        s, e = statistics.median(step[w]), statistics.median(enc[w])
        print(
            f"  ch {w:<3} train step {s:8.1f} ms ({s / s0:.3f}x)   "
            f"encode 500 images {e:8.1f} ms ({e / e0:.3f}x)"
        )


def compare_formats(args: argparse.Namespace) -> None:
    samples: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for nhwc in rotated([False, True], r):
            samples[nhwc].append(run(DMVAEModule, args, args.ch, nhwc=nhwc))
    nchw, nhwc = (statistics.median(samples[k]) for k in (False, True))
    print(
        f"KL-VAE training step, encoder ch {args.ch}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds"
    )
    print(f"  NCHW (contiguous)     {nchw:8.1f} ms / step")
    print(f"  NHWC (channels_last)  {nhwc:8.1f} ms / step")
    print(f"  channels_last / contiguous : {nhwc / nchw:.3f}")


def compare_compile(args: argparse.Namespace) -> None:
    names = {"eager": "", "compiled encoder + decoder": "tokenizer", "compiled all": "all"}
    step: dict[str, list[float]] = {n: [] for n in names}
    warm: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in rotated(list(names), r):
            torch._dynamo.reset()  # every compiled variant compiles afresh,
            torch._inductor.config.fx_graph_cache = False  # without inductor's cache on disk
            step[name].append(
                run(DMVAEModule, args, args.ch, compile=names[name], warmup_seconds=warm[name])
            )
    print(
        f"KL-VAE training step, encoder ch {args.ch}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds"
    )
    s0, w0 = statistics.median(step["eager"]), statistics.median(warm["eager"])
    for name in names:
        s, w = statistics.median(step[name]), statistics.median(warm[name])
        extra = w - w0 - args.warmup * (s - s0) / 1e3
        line = f"  {name:<27} {s:8.1f} ms / step ({s / s0:.3f}x)   warm-up {w:6.1f} s"
        if name != "eager":
            gain = (s0 - s) / 1e3
            pays = f"pays after {extra / gain:.0f} steps" if gain > 0 else "never pays"
            line += f"   compilation ~{extra:.0f} s, {pays}"
        print(line)


def compare_before(args: argparse.Namespace) -> None:
    variants = {
        "now": (DMVAEModule, "transposed", "nchw"),
        "upsampling as before": (DMVAEModule, "resize", "nchw"),
        "GAN backward as before": (TwoPassGAN, "transposed", "nchw"),
        "latent layout as before": (DMVAEModule, "transposed", "channels_last"),
        "all three as before": (TwoPassGAN, "resize", "channels_last"),
    }
    if args.only:  # e.g. "now,layout": the variants whose names contain one of the words
        words = args.only.split(",")
        variants = {n: v for n, v in variants.items() if any(w in n for w in words)}
    step: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        for name in rotated(list(variants), r):
            cls, form, layout = variants[name]
            with upsampling(form), latent_layout(layout):
                step[name].append(run(cls, args, args.ch))
    print(
        f"KL-VAE training step, encoder ch {args.ch}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds"
    )
    base_name = list(variants)[-1]
    base = statistics.median(step[base_name])
    for name in variants:
        s = statistics.median(step[name])
        print(f"  {name:<24} {s:8.1f} ms / step ({s / base:.3f}x of {base_name})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variant order rotated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--widths", default=None, help="comma-separated encoder widths to compare instead"
    )
    parser.add_argument("--channels_last", action="store_true", help="compare memory formats")
    parser.add_argument("--compile", action="store_true", help="compare eager and compiled")
    parser.add_argument("--before", action="store_true", help="compare with the rewrites undone")
    parser.add_argument("--only", default="", help="--before: variants named with these words")
    parser.add_argument(
        "--ch", type=int, default=32, help="encoder width (--channels_last, --compile, --before)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.channels_last:
        compare_formats(args)
        return
    if args.compile:
        compare_compile(args)
        return
    if args.before:
        compare_before(args)
        return
    if args.widths:
        compare_widths([int(w) for w in args.widths.split(",")], args)
        return
    variants = {"reuse": DMVAEModule, "recompute": RecomputeKL}
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            samples[name].append(run(variants[name], args))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    print(
        f"KL-VAE training step, batch {args.batch_size}, {torch.get_num_threads()} threads; "
        f"median of {args.rounds} rounds"
    )
    for name, value in ms.items():
        print(f"  {name:<10} {value:8.1f} ms / step")
    print(f"  reuse / recompute : {ms['reuse'] / ms['recompute']:.3f}")


if __name__ == "__main__":
    main()
