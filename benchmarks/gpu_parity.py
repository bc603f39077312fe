"""Numeric parity of the accelerated path: bf16 autocast on a device (compiled or not) against
fp32 eager on the CPU, for the three computations the flagship trains with.

* ``dit_forward``: the velocity of a DiT (XL/1 on 16x16x32 latents, batch 4; weights N(0, 0.02)
  so that adaLN-Zero does not make it 0);
* ``dmd_gradient``: the gradient w.r.t. the latents of :class:`DMDLoss` (``"dmd"``, CFG 5) with
  a DiT-B/1 real model and a fake model perturbed from it, at fixed ``t`` and noise;
* ``align_step``: one alignment (VAE) step of :class:`DMVAEModule` at the ImageNet shapes
  (DINOv2-L/16 at 256, decoder ch 128, DiT-B/1 score models, batch 2): the generator loss
  (L1 + 10 x DMD, t and noise fixed; no GAN term: a randomly initialised PatchGAN with
  batch-statistics BatchNorm on 2 images has an ill-conditioned input gradient that would
  dominate the comparison) and its gradient w.r.t. every tokenizer parameter, plus the fake model's
  flow-matching loss and its gradient.

Every random input is drawn on the CPU with fixed seeds and copied, so both sides compute the
same function; only precision, kernels and (with ``--compile``) compilation differ. Figures per
check: relative L2 error ``|a - b| / |a|`` and cosine similarity of the flattened outputs or
gradients, relative error of loss values, each against a stated tolerance (``TOLERANCES``; the
``--small`` CPU run, bf16 autocast on the CPU, uses the looser ``CPU_TOLERANCES``). Writes one
JSON object (``--json``) with ``passed`` and every figure::

    python benchmarks/gpu_parity.py --device cuda --compile --json parity.json
    python benchmarks/gpu_parity.py --small --json parity.json     # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402

from dmvae_lightning import flow  # noqa: E402
from dmvae_lightning.losses.matching import DMDLoss  # noqa: E402
from dmvae_lightning.nets.dit import DIT_CONFIGS, DiT  # noqa: E402
from dmvae_lightning.utils.compile import compile_module  # noqa: E402

# bf16 keeps 8 significant bits (relative rounding 2^-9); sums accumulate in fp32. The DMD
# gradient is a difference of two guided (CFG 5) predictions divided by a residual, so its
# relative error is an order of magnitude above the forward's, and gradients through a deep
# encoder + decoder in bf16 differ by ~10% in L2 (the --small CPU run: 0.125).
# rel_l2 and loss_rel: upper bounds; cos: lower bounds.
TOLERANCES: dict[str, dict[str, float]] = {
    "dit_forward": {"rel_l2": 0.02, "cos": 0.999},
    "dmd_gradient": {"rel_l2": 0.15, "cos": 0.99},
    "align_step": {"loss_rel": 0.02, "rel_l2": 0.25, "cos": 0.97},
}
# bf16 autocast on the CPU (the --small run): tiny models, fewer ops autocast to bf16, looser.
CPU_TOLERANCES: dict[str, dict[str, float]] = {
    "dit_forward": {"rel_l2": 0.05, "cos": 0.998},
    "dmd_gradient": {"rel_l2": 0.3, "cos": 0.95},
    "align_step": {"loss_rel": 0.05, "rel_l2": 0.35, "cos": 0.94},
}

FULL = {
    "dit": DIT_CONFIGS["XL"],
    "dit_batch": 4,
    "score": DIT_CONFIGS["B"],
    "dmd_batch": 4,
    "align": {**bench.FULL, "score": DIT_CONFIGS["B"], "align_batch": 2},
}
SMALL = {
    "dit": {"depth": 2, "hidden_size": 64, "num_heads": 4},
    "dit_batch": 4,
    "score": {"depth": 2, "hidden_size": 64, "num_heads": 4},
    "dmd_batch": 4,
    "align": {**bench.SMALL},
}


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Relative L2 error, cosine similarity and max abs error of ``got`` against ``ref``."""
    a, b = ref.detach().double().flatten().cpu(), got.detach().double().flatten().cpu()
    err = (a - b).norm() / a.norm().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    return {
        "rel_l2": float(err),
        "cos": float(cos),
        "max_abs": float((a - b).abs().max()),
        "ref_norm": float(a.norm()),
    }


def judge(figures: dict[str, float], tol: dict[str, float]) -> bool:
    ok = True
    for key, bound in tol.items():
        value = figures[key]
        ok &= value >= bound if key == "cos" else value <= bound
    return bool(ok)


def init_dit(net: DiT, seed: int) -> DiT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def maybe_compile(module: torch.nn.Module, args: argparse.Namespace) -> None:
    if args.compile:
        compile_module(module, {"backend": args.compile_backend})


# ---------------------------------------------------------------------------------- checks
def check_dit_forward(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    c, h, w = cfg["latent"]
    net = init_dit(DiT(input_size=(h, w), in_channels=c, patch_size=1, **cfg["dit"]), 0).eval()
    g = torch.Generator().manual_seed(1)
    n = cfg["dit_batch"]
    x, t = torch.randn(n, c, h, w, generator=g), torch.rand(n, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    with torch.no_grad():
        ref = net(x, t, y)
        dev = copy.deepcopy(net).to(args.device)
        maybe_compile(dev, args)
        with autocast(args.device):
            got = dev(x.to(args.device), t.to(args.device), y.to(args.device)).float()
    return compare(ref, got)


def dmd_pair(cfg: dict[str, Any], c: int, h: int, w: int) -> DMDLoss:
    real = init_dit(DiT(input_size=(h, w), in_channels=c, patch_size=1, **cfg["score"]), 2)
    loss = DMDLoss(real, cfg_scale=5.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in loss.fake.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return loss


def check_dmd_gradient(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    c, h, w = cfg["latent"]
    loss = dmd_pair(cfg, c, h, w)
    g = torch.Generator().manual_seed(4)
    n = cfg["dmd_batch"]
    z = torch.randn(n, c, h, w, generator=g)
    t, eps = torch.rand(n, generator=g) * 0.9 + 0.05, torch.randn(n, c, h, w, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)

    def grad(module: DMDLoss, device: torch.device, bf16: bool) -> tuple[torch.Tensor, float]:
        zz = z.detach().clone().to(device).requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value, _ = module.loss(zz, y.to(device), t=t.to(device), eps=eps.to(device))
        value.backward()
        return zz.grad, float(value.detach())

    ref, ref_value = grad(loss, torch.device("cpu"), False)
    dev = copy.deepcopy(loss).to(args.device)
    for net in (dev.real, dev.fake):
        maybe_compile(net, args)
    got, got_value = grad(dev, args.device, True)
    out = compare(ref, got)
    out["loss_rel"] = abs(got_value - ref_value) / max(abs(ref_value), 1e-30)
    return out


def check_align_step(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    sizes = cfg["align"]
    ns = argparse.Namespace(vae_every=5, channels_last=False)
    module = bench.build_align_module(sizes, ns, compile=False, score_perturb=0.01)
    module.adversarial.diffaug_policy = ""  # random augmentations would differ per device
    module.adversarial.consistency_weight = 0.0
    # No GAN term: a random PatchGAN (BatchNorm on batch statistics of 2 images) makes its input
    # gradient ill-conditioned; with it the --small CPU bf16 gradient cosine was 0.43 (adaptive
    # weight) / 0.09 (fixed 0.5), i.e. the check would measure the discriminator, not us.
    module.adversarial.start_step = 2**62
    batch = sizes["align_batch"]
    s = sizes["image_size"]
    g = torch.Generator().manual_seed(5)
    x = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
    y = torch.randint(0, sizes["classes"], (batch,), generator=g)
    c = sizes["latent"][0]
    hz = s // sizes["encoder"]["patch_size"]
    t, eps = torch.rand(batch, generator=g) * 0.9 + 0.05, torch.randn(batch, c, hz, hz, generator=g)
    t_f, eps_f = torch.rand(batch, generator=g), torch.randn(batch, c, hz, hz, generator=g)

    def step(m: Any, device: torch.device, bf16: bool) -> dict[str, Any]:
        m.train()
        loss_fn = m.matching_loss
        xx, yy = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = m.encode(xx)
            x_rec = m.decode(z)
            gen, _ = m.generator_loss(xx, x_rec, z)
            dmd, _ = loss_fn.loss(loss_fn.normalize(z), yy, t=t.to(device), eps=eps.to(device))
            total = gen + m.hparams.matching_weight * dmd
        params = [p for p in m.tokenizer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            fake, _ = flow.velocity_loss(
                loss_fn.fake,
                loss_fn.normalize(z.detach()),
                yy,
                t=t_f.to(device),
                eps=eps_f.to(device),
            )
        fake_grads = torch.autograd.grad(fake, list(loss_fn.fake.parameters()))
        flat = torch.cat([gr.float().flatten().cpu() for gr in grads])
        flat_fake = torch.cat([gr.float().flatten().cpu() for gr in fake_grads])
        return {
            "loss": float(total.detach()),
            "fake": float(fake.detach()),
            "grad": flat,
            "fake_grad": flat_fake,
        }

    ref = step(module, torch.device("cpu"), False)
    dev = copy.deepcopy(module).to(args.device)
    for part in (dev.tokenizer.encoder, dev.tokenizer.decoder):
        maybe_compile(part, args)
    for net in (dev.matching_loss.real, dev.matching_loss.fake):
        maybe_compile(net, args)
    got = step(dev, args.device, True)
    out = compare(ref["grad"], got["grad"])
    out["loss_rel"] = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    fake = compare(ref["fake_grad"], got["fake_grad"])
    out["fake_grad_rel_l2"], out["fake_grad_cos"] = fake["rel_l2"], fake["cos"]
    out["fake_loss_rel"] = abs(got["fake"] - ref["fake"]) / max(abs(ref["fake"]), 1e-30)
    # The stated bounds apply to the tokenizer gradient and, worst of both, the loss values.
    out["loss_rel"] = max(out["loss_rel"], out["fake_loss_rel"])
    out["rel_l2"] = max(out["rel_l2"], fake["rel_l2"])
    out["cos"] = min(out["cos"], fake["cos"])
    return out


CHECKS = {
    "dit_forward": check_dit_forward,
    "dmd_gradient": check_dmd_gradient,
    "align_step": check_align_step,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, seconds on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="compile the device side")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    cfg = dict(SMALL if args.small else FULL)
    cfg["latent"] = cfg["align"]["latent"] if args.small else bench.FULL["latent"]
    tolerances = TOLERANCES if args.device.type == "cuda" else CPU_TOLERANCES
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        "reference": "fp32 eager on CPU",
        "candidate": f"bf16 autocast on {args.device.type}"
        + (f", compiled ({args.compile_backend})" if args.compile else ", eager"),
        "torch": torch.__version__,
        "tolerances": tolerances,
        "checks": {},
    }
    passed = True
    for name in [c for c in args.checks.split(",") if c]:
        torch._dynamo.reset()
        start = time.perf_counter()
        figures = CHECKS[name](cfg, args)
        figures["passed"] = judge(figures, tolerances[name])
        figures["seconds"] = time.perf_counter() - start
        passed &= figures["passed"]
        result["checks"][name] = figures
        shown = ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if isinstance(v, float))
        print(f"{name}: {'ok' if figures['passed'] else 'FAILED'} ({shown})")
    result["passed"] = bool(passed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
