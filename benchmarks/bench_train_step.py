"""One training step of each stage, eager vs ``torch.compile``, side by side in one run.

Stages (``--stages``, default all three) at the ImageNet shapes of ``configs/imagenet/``:

* ``dit-b`` / ``dit-xl``: a flow-matching step of LightningDiT-B/1 / -XL/1 on 16x16x32 latents
  (1000 classes): forward, loss, backward, grad-norm clip 1.0, AdamW (stages 2 and 5);
* ``align``: the DMD alignment step of stage 3 with the library's own module
  (:class:`~dmvae_lightning.modules.dmvae.DMVAEModule`): DINOv2-L/16 encoder at 256x256 (timm
  ``vit_large_patch14_dinov2`` at patch 16, random weights, nothing downloaded) -> MLP -> 32
  channels -> conv decoder (ch 128, mult 1 2 4 4) + PatchGAN; DMD with a frozen real and a
  trained fake DiT-XL/1 score model, CFG 5 (cond + null in one forward each). One timed *step*
  is a cycle of ``--vae_every`` (5) batches as in training: four batches that only encode and
  train the fake model, then one that also steps the VAE (L1 + adaptive GAN + 10 x DMD) and the
  discriminator, then the EMA. Times are per batch (the cycle's mean). LPIPS is left out: its VGG
  weights are not available offline (it would add a VGG16 forward + backward per VAE step).

``--eager_only align`` times a stage eager only (the GPU check does this for ``align``, whose
compilation had not finished after 235 s on an H200).

``compiled`` compiles what the modules' ``compile`` options compile: the DiT; the encoder, the
decoder and both score models (``--compile_mode`` / ``--dynamic`` pass through). Both variants
start from the same weights; each is warmed up (``--warmup`` steps: compilation happens there,
reported as "warm-up s"), then ``--rounds`` rounds alternate the variants (order rotated per
round), each round timing ``--steps`` steps; the figure is the median over rounds.

Model FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one eager step
(matmuls, convolutions, attention; forward and backward; elementwise work and the optimizer are
not counted), and MFU = FLOPs / time / peak. The peak is ``--peak_bf16`` (TFLOPS) under
``--precision bf16`` (autocast) and ``--peak_fp32`` under fp32; on CUDA they default to the
published dense H100/H200 SXM figures (989.4 bf16, 66.9 fp32 without tensor cores, 494.7 with
TF32 when ``--tf32``); on CPU no MFU is printed unless a peak is given.

    python benchmarks/bench_train_step.py --small                      # seconds-scale sizes
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --json bench.json
    python benchmarks/bench_train_step.py --stages dit-b --batch 4     # CPU, DiT-B/1 only

``--small`` shrinks everything (DiTs of width 64 / 96 and depth 2 on 4x8x8 latents, a
2-block width-64 ViT at patch 8 on 32x32 images, decoder ch 16, score DiTs of width 32) so that
the whole run takes seconds on a CPU (tests call :func:`main` with it). The size options below
override single sizes either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never reach a model hub

import torch  # noqa: E402
from bench_align import rotated, time_steps  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dmvae_lightning import flow  # noqa: E402
from dmvae_lightning.losses.matching import DMDLoss  # noqa: E402
from dmvae_lightning.modules.dmvae import DMVAEModule  # noqa: E402
from dmvae_lightning.nets.dit import DIT_CONFIGS, DiT  # noqa: E402
from dmvae_lightning.utils.compile import compile_module  # noqa: E402
from dmvae_lightning.utils.rng import step_rng  # noqa: E402

STAGES = ("dit-b", "dit-xl", "align")
# Published dense peaks of one H100 / H200 SXM (same GPU die and clocks), TFLOPS.
H100_PEAK = {"bf16": 989.4, "fp32": 66.9, "tf32": 494.7}

# Full (ImageNet) and --small sizes. "dit" maps a DiT stage to its width / depth / heads.
FULL: dict[str, Any] = {
    "latent": (32, 16, 16),
    "patch": 1,
    "classes": 1000,
    "dit": {"dit-b": DIT_CONFIGS["B"], "dit-xl": DIT_CONFIGS["XL"]},
    "dit_batch": 32,
    "align_batch": 16,
    "image_size": 256,
    "encoder": {"model_name": "vit_large_patch14_dinov2.lvd142m", "patch_size": 16},
    "bottleneck_hidden": 2048,
    "decoder": {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "mid_attention": True},
    "disc_ch": 64,
    "score": DIT_CONFIGS["XL"],
}
SMALL: dict[str, Any] = {
    "latent": (4, 8, 8),
    "patch": 1,
    "classes": 10,
    "dit": {
        "dit-b": {"depth": 2, "hidden_size": 64, "num_heads": 4},
        "dit-xl": {"depth": 2, "hidden_size": 96, "num_heads": 4},
    },
    "dit_batch": 4,
    "align_batch": 2,
    "image_size": 32,
    "encoder": {
        "model_name": "vit_large_patch14_dinov2.lvd142m",
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
    },
    "bottleneck_hidden": 64,
    "decoder": {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
    "disc_ch": 16,
    "score": {"depth": 1, "hidden_size": 32, "num_heads": 2},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args: argparse.Namespace) -> torch.autocast:
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def adamw(params: Any, args: argparse.Namespace, **kw: Any) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), fused on CUDA (issue 18 makes that the modules' default)."""
    fused = {"fused": True} if args.device.type == "cuda" else {}
    return torch.optim.AdamW(params, betas=(0.9, 0.95), **fused, **kw)


def compile_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"backend": args.compile_backend}
    if args.compile_mode:
        spec["mode"] = args.compile_mode
    if args.dynamic is not None:
        spec["dynamic"] = args.dynamic
    return spec


# ---------------------------------------------------------------------------------- stages
def build_dit(
    sizes: dict[str, Any], stage: str, args: argparse.Namespace, compiled: bool
) -> tuple[Callable[[], None], int]:
    """A DiT flow-matching training step (closure) and its batch size."""
    c, h, w = sizes["latent"]
    torch.manual_seed(0)
    net = DiT(
        input_size=(h, w),
        in_channels=c,
        patch_size=sizes["patch"],
        num_classes=sizes["classes"],
        **sizes["dit"][stage],
    ).to(args.device)
    net.train()
    opt = adamw(net.parameters(), args, lr=2e-4, weight_decay=0.0)
    if compiled:
        compile_module(net, compile_spec(args))
    batch = args.batch or sizes["dit_batch"]
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(batch, c, h, w, generator=g).to(args.device)
    y = torch.randint(0, sizes["classes"], (batch,), generator=g).to(args.device)
    params = list(net.parameters())

    def step() -> None:
        with autocast(args):
            loss, _ = flow.velocity_loss(net, x1, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, batch


def build_align_module(
    sizes: dict[str, Any], args: argparse.Namespace, compile: Any, score_perturb: float = 0.0
) -> DMVAEModule:
    """The stage-3 module at ``sizes`` (random weights; ``compile``: its ``compile`` options)."""
    c, _, _ = sizes["latent"]
    torch.manual_seed(0)
    score = dict(sizes["score"])
    patch = sizes["encoder"]["patch_size"]
    grid = sizes["image_size"] // patch
    real = DiT(input_size=grid, in_channels=c, patch_size=1, num_classes=sizes["classes"], **score)
    for p in real.parameters():  # adaLN-Zero init would make every velocity 0
        p.data.normal_(0, 0.02)
    loss = DMDLoss(real, cfg_scale=5.0, compile=compile)
    if score_perturb:
        with torch.no_grad():
            for p in loss.fake.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn_like(p), alpha=score_perturb)
    encoder = {"name": "timm", "pretrained": False, "frozen": False}
    encoder.update(sizes["encoder"])
    encoder["img_size"] = sizes["image_size"]
    return DMVAEModule(
        stage="pretrain",  # = the align step without a stage-1 checkpoint (see bench_align.py)
        image_channels=3,
        latent_channels=c,
        encoder=encoder,
        bottleneck_hidden=sizes["bottleneck_hidden"],
        decoder={**sizes["decoder"], "input_upsample": True},
        discriminator={"ch": sizes["disc_ch"], "n_layers": 3 if sizes["image_size"] >= 64 else 2},
        l1_weight=1.0,
        disc_weight=0.5,
        disc_start=0,
        diffaug="color,translation,cutout",
        consistency_weight=1.0,
        lr=2e-5,
        warmup_steps=0,
        ema_decay=0.9999,
        matching_loss=loss,
        matching_weight=10.0,
        vae_every=args.vae_every,
        compile=compile if getattr(args, "compile_tokenizer", True) else False,
        channels_last=args.channels_last,
    )


class AlignStep:
    """The alignment training step of :class:`DMVAEModule` written out without a Trainer (the
    same hooks, order and optimizers as its ``training_step``)."""

    def __init__(self, module: DMVAEModule, args: argparse.Namespace) -> None:
        self.module = module.to(args.device).train()
        self.args = args
        loss_fn = module.matching_loss
        self.gen = [p for p in module.tokenizer.parameters() if p.requires_grad]
        self.disc = list(module.discriminator.parameters())
        self.fake = list(loss_fn.fake_parameters())
        self.opt_g = adamw(self.gen, args, lr=2e-5, weight_decay=5e-3)
        self.opt_d = adamw(self.disc, args, lr=2e-5, weight_decay=5e-4)
        self.opt_f = adamw(self.fake, args, lr=2e-5, weight_decay=0.0)
        self.k = 0

    @staticmethod
    def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def vae_losses(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generator loss incl. matching_weight x DMD, latents, reconstructions)."""
        m = self.module
        x = batch["image"]
        with autocast(self.args):
            z = m.encode(x)
            x_rec = m.decode(z)
            loss, _ = m.generator_loss(x, x_rec, z)
            matching, _ = m.matching_term(x, z, batch)
        return loss + m.hparams.matching_weight * matching, z, x_rec

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        m = self.module
        x = batch["image"]
        with step_rng(0, self.k, 0, x.device):
            if m.is_vae_step(self.k):
                for p in self.disc + self.fake:
                    p.requires_grad_(False)
                loss, z, x_rec = self.vae_losses(batch)
                self._step(self.opt_g, loss, self.gen)
                for p in self.disc:
                    p.requires_grad_(True)
                with autocast(self.args):
                    d_loss, _ = m.discriminator_loss(x, x_rec.detach())
                self._step(self.opt_d, d_loss, self.disc)
                for p in self.fake:
                    p.requires_grad_(True)
                z = z.detach()
                m.ema.update(m.ema_target())
            else:
                with torch.no_grad(), autocast(self.args):
                    z = m.encode(x)
            with autocast(self.args):
                f_loss, _ = m.fake_loss(z, batch)
            self._step(self.opt_f, f_loss, self.fake)
        m.batch_count += 1
        self.k += 1


def build_align(
    sizes: dict[str, Any], args: argparse.Namespace, compiled: bool
) -> tuple[Callable[[], None], int]:
    """A cycle of ``vae_every`` alignment batches (closure) and its number of images."""
    module = build_align_module(sizes, args, compile_spec(args) if compiled else False)
    runner = AlignStep(module, args)
    batch = args.batch or sizes["align_batch"]
    g = torch.Generator().manual_seed(1)
    s = sizes["image_size"]
    data = {
        "image": (torch.rand(batch, 3, s, s, generator=g) * 2 - 1).to(args.device),
        "label": torch.randint(0, sizes["classes"], (batch,), generator=g).to(args.device),
    }
    if args.channels_last:
        data["image"] = data["image"].contiguous(memory_format=torch.channels_last)

    def cycle() -> None:
        for _ in range(args.vae_every):
            runner.batch(data)

    return cycle, batch * args.vae_every


# ---------------------------------------------------------------------------------- timing
def count_flops(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.precision == "bf16":
        given, default = args.peak_bf16, H100_PEAK["bf16"]
    else:
        given, default = args.peak_fp32, H100_PEAK["tf32" if args.tf32 else "fp32"]
    if given is not None:
        return given
    return default if args.device.type == "cuda" else None


def variants_of(stage: str, args: argparse.Namespace) -> list[str]:
    """The variants timed for ``stage``: ``--variants`` less "compiled" where ``--eager_only``
    names the stage."""
    return [v for v in args.variants if not (v == "compiled" and stage in args.eager_only)]


def run_stage(stage: str, sizes: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    build = build_align if stage == "align" else lambda s, a, c: build_dit(s, stage, a, c)
    steps: dict[str, Callable[[], None]] = {}
    warmup_s: dict[str, float] = {}
    images = 0
    flops = None
    variants = variants_of(stage, args)
    for variant in variants:
        step, images = build(sizes, args, variant == "compiled")
        sync(args.device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(args.device)
        warmup_s[variant] = time.perf_counter() - start
        if variant == "eager" and flops is None:
            flops = count_flops(step)
        steps[variant] = step
    if flops is None:  # only "compiled" asked for: count on a fresh eager build
        flops = count_flops(build(sizes, args, False)[0])
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name in rotated(variants, r):
            samples[name].append(time_steps(steps[name], args.steps, args.device))
    batches = args.vae_every if stage == "align" else 1
    peak = peak_tflops(args)
    out: dict[str, Any] = {"images_per_step": images, "flops_per_step": flops, "variants": {}}
    for name in variants:
        ms = statistics.median(samples[name])
        tflops = flops / (ms / 1e3) / 1e12
        out["variants"][name] = {
            "ms_per_step": ms,
            "ms_per_batch": ms / batches,
            "images_per_s": images / (ms / 1e3),
            "achieved_tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "warmup_s": warmup_s[name],
            "rounds_ms": samples[name],
        }
    if "eager" in samples and "compiled" in samples:
        e, c = out["variants"]["eager"], out["variants"]["compiled"]
        out["compiled_over_eager"] = c["ms_per_step"] / e["ms_per_step"]
        saved = e["ms_per_step"] - c["ms_per_step"]
        extra = c["warmup_s"] - e["warmup_s"]
        # Steps after which compilation has paid for itself (None: it never does).
        out["break_even_steps"] = extra / (saved / 1e3) if saved > 0 else None
    return out


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def describe(sizes: dict[str, Any], stage: str, args: argparse.Namespace) -> str:
    c, h, w = sizes["latent"]
    if stage != "align":
        d = sizes["dit"][stage]
        batch = args.batch or sizes["dit_batch"]
        return (
            f"DiT d{d['depth']} w{d['hidden_size']} h{d['num_heads']} patch {sizes['patch']} on "
            f"{c}x{h}x{w}, "
            f"batch {batch}"
        )
    e, d, s = sizes["encoder"], sizes["decoder"], sizes["score"]
    batch = args.batch or sizes["align_batch"]
    return (
        f"{e['model_name']} patch {e['patch_size']}"
        + "".join(f" {k} {e[k]}" for k in ("embed_dim", "depth") if k in e)
        + f" at {sizes['image_size']}px -> {c} ch, decoder ch {d['ch']} {d['ch_mult']}, "
        f"score DiTs d{s['depth']} w{s['hidden_size']}, CFG 5, batch {batch}, "
        f"vae_every {args.vae_every}"
        + ("" if args.compile_tokenizer else "; compiled = score models only")
    )


def name_list(
    parser: argparse.ArgumentParser, option: str, text: str, allowed: tuple[str, ...]
) -> list[str]:
    """``option``'s comma list of names; one not in ``allowed`` is a usage error naming the
    option."""
    names = [s for s in text.split(",") if s]
    for name in names:
        if name not in allowed:
            parser.error(f"{option}: unknown name {name!r}; expected some of {allowed}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="seconds-scale sizes (CPU, tests)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of " + str(STAGES))
    parser.add_argument("--variants", default="eager,compiled", help="eager,compiled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 autocast on CUDA, fp32 elsewhere")  # fmt: skip
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls/convs (CUDA)")
    parser.add_argument("--channels_last", action="store_true", help="decoder + discriminator")
    parser.add_argument("--batch", type=int, default=None, help="override the stage batch")
    parser.add_argument("--latent", default=None, help="C,H,W of the DiT stages' latents")
    parser.add_argument("--patch", type=int, default=None, help="DiT stages' patch size")
    parser.add_argument("--classes", type=int, default=None, help="number of classes")
    parser.add_argument("--dit", default=None, help="JSON {depth, hidden_size, num_heads} "
                        "for both DiT stages")  # fmt: skip
    parser.add_argument("--image_size", type=int, default=None, help="align: image side")
    parser.add_argument("--encoder", default=None, help="align: JSON timm encoder options")
    parser.add_argument("--decoder_ch", type=int, default=None, help="align: decoder width")
    parser.add_argument("--score", default=None, help="align: JSON score-DiT size or preset")
    parser.add_argument("--vae_every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument(
        "--eager_only",
        default="",
        help="comma list of stages timed eager only "
        "(e.g. align: its compilation outlasts the GPU check's budget)",
    )
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--no_compile_tokenizer", dest="compile_tokenizer", action="store_false",
                        help="align, compiled: compile the score models only")  # fmt: skip
    parser.add_argument("--compile_mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--dynamic", type=lambda s: s.lower() == "true", default=None)
    parser.add_argument("--peak_bf16", type=float, default=None, help="TFLOPS (CUDA: 989.4)")
    parser.add_argument("--peak_fp32", type=float, default=None, help="TFLOPS (CUDA: 66.9)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.stages = name_list(parser, "--stages", args.stages, STAGES)
    args.variants = name_list(parser, "--variants", args.variants, ("eager", "compiled"))
    args.eager_only = name_list(parser, "--eager_only", args.eager_only, STAGES)
    for stage in args.stages:
        if not variants_of(stage, args):
            parser.error(
                f"--eager_only {stage} with --variants compiled leaves {stage} nothing "
                "to time; drop it from one of them"
            )
    return args


def sizes_of(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {
        k: (dict(v) if isinstance(v, dict) else v)
        for k, v in (SMALL if args.small else FULL).items()
    }
    if args.latent:
        sizes["latent"] = tuple(int(v) for v in args.latent.split(","))
    if args.patch:
        sizes["patch"] = args.patch
    if args.classes:
        sizes["classes"] = args.classes
    if args.dit:
        spec = json.loads(args.dit)
        sizes["dit"] = {stage: spec for stage in ("dit-b", "dit-xl")}
    if args.image_size:
        sizes["image_size"] = args.image_size
    if args.encoder:
        sizes["encoder"] = {**sizes["encoder"], **json.loads(args.encoder)}
    if args.decoder_ch:
        sizes["decoder"] = {**sizes["decoder"], "ch": args.decoder_ch}
    if args.score:
        score = args.score
        sizes["score"] = DIT_CONFIGS[score] if score in DIT_CONFIGS else json.loads(score)
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 and args.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    sizes = sizes_of(args)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    result: dict[str, Any] = {
        "device": device_name,
        "precision": args.precision,
        "tf32": args.tf32,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load": load_average(),
        "flops": "FlopCounterMode on one eager step (matmul/conv/attention, fwd + bwd)",
        "peak_tflops": peak_tflops(args),
        "settings": {
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "compile": compile_spec(args),
            "eager_only": args.eager_only,
        },
        "stages": {},
    }
    print(
        f"train step, {device_name}, {args.precision}, {torch.get_num_threads()} threads; "
        f"median of {args.rounds} alternating rounds x {args.steps} steps after {args.warmup} "
        f"warm-up; load: {result['load']}"
    )
    for stage in args.stages:
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        res = run_stage(stage, sizes, args)
        res["sizes"] = describe(sizes, stage, args)
        result["stages"][stage] = res
        print(f"{stage}: {res['sizes']}; {res['flops_per_step'] / 1e9:.1f} GFLOP / step")
        for name, v in res["variants"].items():
            mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
            print(
                f"  {name:<9} {v['ms_per_step']:10.1f} ms/step {v['ms_per_batch']:10.1f} ms/batch "
                f"{v['images_per_s']:9.1f} img/s {v['achieved_tflops']:8.3f} TFLOPS  MFU {mfu}  "
                f"warm-up {v['warmup_s']:.1f} s"
            )
        if "compiled_over_eager" in res:
            be = res["break_even_steps"]
            print(
                f"  compiled / eager: {res['compiled_over_eager']:.3f}; compilation pays after "
                + ("never" if be is None else f"{be:.0f} steps")
            )
        if args.json:  # after every stage: a run cut short keeps the stages it finished
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
