"""The DiT block's elementwise work, two ways side by side:

* ``written``: how the blocks computed it before: RMSNorm as ``x * rsqrt(mean(x^2) + eps) *
  weight`` (four passes over the tokens), the adaLN modulation as ``x * (1 + scale) + shift``
  and the gated residuals as ``x + gate * h`` (two passes each);
* ``fused``: what they do now: ``F.rms_norm`` (one kernel) for fp32 inputs and ``torch.addcmul``
  for the modulation and the gates (one pass each).

Both forms run the same weights, the study's generator DiT (``configs/fashion_mnist/
diffusion.yaml``: preset tiny, width 128, depth 4, 4 heads, patch 4 on 4x8x8 latents, 10
classes). Prints ms (median over ``--rounds`` rounds, order rotated per round, of the mean over
``--steps`` calls after one warm-up) for one sampler step on ``--sample_batch`` latents (no
grad: the study's evaluation samples 5000 latents in chunks of 500, 50 Euler steps each) and one
training forward + backward at ``--train_batch``, the ratios, and the largest difference of the
two forms' sampler outputs::

    python benchmarks/bench_dit_ops.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import torch
from bench_align import rotated, time_steps

import dmvae_lightning.nets.dit as dit
from dmvae_lightning.utils.malloc import tune_malloc


def written_rms_norm(self: dit.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def written_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor):
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def written_block(self: dit.DiTBlock, x: torch.Tensor, c: torch.Tensor, rope):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
        6, dim=1
    )
    h = self.attn(dit._modulate(self.norm1(x), shift_msa, scale_msa), rope)
    x = x + gate_msa.unsqueeze(1) * h
    h = self.mlp(dit._modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x + gate_mlp.unsqueeze(1) * h


@contextlib.contextmanager
def form(name: str):
    """Run the DiT's norms, modulation and gates in ``name`` ("written" or "fused")."""
    with contextlib.ExitStack() as stack:
        if name == "written":
            stack.enter_context(mock.patch.object(dit.RMSNorm, "forward", written_rms_norm))
            stack.enter_context(mock.patch.object(dit, "_modulate", written_modulate))
            stack.enter_context(mock.patch.object(dit.DiTBlock, "forward", written_block))
        yield


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--sample_batch", type=int, default=500)
    parser.add_argument("--train_batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()  # as the study's processes do
    torch.manual_seed(0)
    model = dit.DiT.from_preset(
        "tiny", input_size=8, in_channels=4, patch_size=4, hidden_size=128, depth=4,
        num_heads=4, num_classes=10,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.randn(n, 4, 8, 8, generator=g),
            torch.rand(n, generator=g),
            torch.arange(n) % 10,
        )

    sample_in, train_in = batch(args.sample_batch), batch(args.train_batch)

    def sample() -> torch.Tensor:
        with torch.no_grad():
            return model(*sample_in)

    def train() -> None:
        model(*train_in).square().mean().backward()
        model.zero_grad(set_to_none=True)

    forms = ["written", "fused"]
    ms: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name in rotated(forms, r):
            with form(name):
                for task, fn in (("sample", sample), ("train", train)):
                    fn()  # warm-up
                    ms.setdefault((task, name), []).append(time_steps(fn, args.steps))
    outputs = {}
    for name in forms:
        with form(name):
            outputs[name] = sample()
    diff = (outputs["fused"] - outputs["written"]).abs().max().item()
    print(
        f"study DiT (1.3 M parameters), {torch.get_num_threads()} threads, fp32; "
        f"median of {args.rounds} rounds x {args.steps} calls"
    )
    print(f"{'call':<38} {'written ms':>11} {'fused ms':>9} {'fused / written':>16}")
    results: dict = {"max_abs_difference": diff}
    for task, label in (
        ("sample", f"sampler step, {args.sample_batch} latents"),
        ("train", f"training fwd + bwd, batch {args.train_batch}"),
    ):
        a, b = statistics.median(ms[(task, "written")]), statistics.median(ms[(task, "fused")])
        results[task] = {"written_ms": a, "fused_ms": b, "ratio": b / a}
        print(f"{label:<38} {a:11.2f} {b:9.2f} {b / a:16.3f}")
    print(f"max |fused - written| over the sampler outputs: {diff:.1e}")
    return results


if __name__ == "__main__":
    main()
