"""The decoder's x2 upsampling, two ways side by side:

* ``resize``: nearest-neighbour x2, then the 3x3 convolution (how ``Upsample`` computed it
  before, and how the public DMVAE / LDM decoders do);
* ``transposed``: what ``Upsample`` does now: one stride-2 transposed convolution with the 4x4
  kernel that :func:`~dmvae_lightning.nets.decoder.upsample_conv_weight` builds from the same
  3x3 weight (the same function up to float rounding, 4/9 of the multiply-adds).

Two decoder shapes, each with the same weights under both forms:

* ``study``: the Fashion-MNIST tokenizers' decoder (``configs/fashion_mnist/tokenizer.yaml``:
  ch 16, mult 1 2 2, 4x8x8 latents -> 1x32x32): a training forward + backward at batch 64 (what
  every tokenizer step does, in the study's KL-VAE, plain-AE and DMVAE arms alike) and the no-grad
  decoding of 500 latents (the study's evaluation decodes in chunks of 500);
* ``flagship``: the ImageNet decoder (``configs/imagenet/tokenizer.yaml``: ch 128, mult 1 2 4 4,
  2 blocks, mid attention, input upsample, 32x16x16 latents -> 3x256x256): forward + backward
  at ``--flagship_batch``.

For each it prints ms (median over ``--rounds`` rounds, order rotated per round, of the mean
over ``--steps`` calls after one warm-up), the ratio, the bytes autograd saves for the backward
pass (counted exactly with ``torch.autograd.graph.saved_tensors_hooks``: activation memory), and
the largest difference between the two forms' outputs relative to the output's largest value::

    python benchmarks/bench_decoder.py --threads 1
    python benchmarks/bench_decoder.py --device cuda --flagship_batch 32 --steps 10 --precision bf16

``--flagship_batch 0`` skips the flagship (seconds on a CPU; the test calls :func:`main` so);
``--json FILE`` also writes the figures (the GPU check does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from bench_align import rotated, time_steps

from dmvae_lightning.nets.decoder import Decoder, Upsample
from dmvae_lightning.utils.malloc import tune_malloc

STUDY = {
    "z_channels": 4,
    "out_channels": 1,
    "ch": 16,
    "ch_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "mid_attention": False,
}
FLAGSHIP = {
    "z_channels": 32,
    "out_channels": 3,
    "ch": 128,
    "ch_mult": (1, 2, 4, 4),
    "num_res_blocks": 2,
    "mid_attention": True,
    "input_upsample": True,
}


def resize_forward(self: Upsample, x: torch.Tensor) -> torch.Tensor:
    """``Upsample``'s former forward: the 3x3 convolution of the nearest-x2 upsampled input."""
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def upsampling(form: str) -> contextlib.AbstractContextManager:
    """Run ``Upsample`` modules in ``form`` ("resize" or "transposed") inside the block."""
    if form == "transposed":
        return contextlib.nullcontext()
    return mock.patch.object(Upsample, "forward", resize_forward)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``fn()`` (parameters
    included once each, since they are saved by reference)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def compare(name: str, decoder: Decoder, z: torch.Tensor, train: bool, args) -> dict:
    """Time ``decoder`` on ``z`` (forward + backward when ``train``, else no-grad forward) under
    both forms, print one table row per form and return the figures."""
    device = z.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def call() -> None:
        with autocast:
            if train:
                decoder(z).float().square().mean().backward()
            else:
                with torch.no_grad():
                    decoder(z)

    forms = ["resize", "transposed"]
    ms: dict[str, list[float]] = {f: [] for f in forms}
    for r in range(args.rounds):
        for form in rotated(forms, r):
            with upsampling(form):
                call()  # warm-up
                ms[form].append(time_steps(call, args.steps, device))
    outputs, memory = {}, {}
    for form in forms:
        with upsampling(form), torch.no_grad(), autocast:
            outputs[form] = decoder(z).float()
        if train:
            with upsampling(form), autocast:
                memory[form] = saved_bytes(lambda: decoder(z))
    scale = outputs["resize"].abs().max().clamp_min(1e-12)
    diff = ((outputs["transposed"] - outputs["resize"]).abs().max() / scale).item()
    base = statistics.median(ms["resize"])
    for form in forms:
        t = statistics.median(ms[form])
        mem = f"{memory[form] / 2**20:10.1f}" if train else f"{'-':>10}"
        ratio = f"{memory[form] / memory['resize']:.2f}" if train else "-"
        print(f"{name:<34} {form:<11} {t:10.2f} {t / base:7.2f} {mem} {ratio:>9}")
    print(f"{'':<34} max |transposed - resize| / max |resize| = {diff:.1e}")
    return {
        "ms": {f: statistics.median(ms[f]) for f in forms},
        "ratio": statistics.median(ms["transposed"]) / base,
        "saved_bytes": memory or None,
        "relative_difference": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flagship_batch", type=int, default=1, help="0 skips the flagship")
    parser.add_argument("--flagship_steps", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tune_malloc()  # as the dmvae command and the study's processes do
    torch.manual_seed(0)
    print(
        f"decoder x2 upsampling, {device.type}, {torch.get_num_threads()} threads, "
        f"{args.precision}; ms: median of {args.rounds} rounds; saved: MiB kept for backward"
    )
    print(f"{'shape':<34} {'form':<11} {'ms':>10} {'ratio':>7} {'saved MiB':>10} {'ratio':>9}")
    study = Decoder(**STUDY).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    z_train = torch.randn(64, 4, 8, 8, generator=g).to(device)
    z_decode = torch.randn(500, 4, 8, 8, generator=g).to(device)
    results = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "study_train": compare("study train, batch 64", study, z_train, True, args),
        "study_decode": compare("study decode, 500 latents", study, z_decode, False, args),
    }
    if args.flagship_batch > 0:
        flagship = Decoder(**FLAGSHIP).to(device)
        z = torch.randn(args.flagship_batch, 32, 16, 16, generator=g).to(device)
        args.steps = args.flagship_steps
        name = f"flagship train, batch {args.flagship_batch}"
        results["flagship_train"] = compare(name, flagship, z, True, args)
        results["flagship_batch"] = args.flagship_batch
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
