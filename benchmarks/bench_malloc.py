"""glibc's default malloc thresholds against :func:`dmvae_lightning.utils.malloc.tune_malloc`,
side by side in one run, on the work of a study arm at the study's sizes (one thread):

* ``sample``: the generator evaluation's sampler: 500 class-conditional latents (4x8x8), 50
  Euler steps of the study's DiT (patch 4, width 128, depth 4; random weights);
* ``decode``: the KL-VAE tokenizer's decoder (ch 16) on those 500 latents;
* ``encode``: its conv encoder (ch 16) on 500 images (what the latent cache does per batch);
* ``train``: its training step (``benchmarks/bench_kl_vae.py``'s, encoder ch 16, batch 64,
  discriminator on), under ``lightning.Trainer``.

Each variant runs in a fresh process (the thresholds are process-wide, and glibc's default
ones move with what the process has freed), rounds rotate the order. Prints ms (median over
rounds of the median of ``--repeats`` calls after a warm-up), the ratio tuned / default, and
each process's peak resident memory::

    python benchmarks/bench_malloc.py             # ~4 minutes on 2 cores
    python benchmarks/bench_malloc.py --rounds 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_align import rotated

VARIANTS = ("default", "tuned")
WORKLOADS = ("sample", "decode", "encode", "train")


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(repeats: int, steps: int) -> dict[str, float]:
    """ms of every workload in this process."""
    from bench_align import RandomImages, timed_fit
    from bench_kl_vae import build
    from torch.utils.data import DataLoader

    from dmvae_lightning.modules.diffusion import LatentDiffusionModule
    from dmvae_lightning.modules.dmvae import DMVAEModule

    torch.manual_seed(0)
    gen = LatentDiffusionModule(
        latent_shape=[4, 8, 8],
        num_classes=10,
        dit={"preset": "tiny", "patch_size": 4, "hidden_size": 128, "depth": 4, "num_heads": 4},
        latent_mean=0.0,
        latent_scale=1.0,
    ).eval()
    labels = torch.arange(500) % 10
    g = torch.Generator().manual_seed(0)
    tokenizer = build(DMVAEModule, 16).tokenizer.eval()
    z = torch.randn(500, 4, 8, 8, generator=g)
    x = torch.rand(500, 1, 32, 32, generator=g) * 2 - 1
    out = {
        "sample": median_ms(lambda: gen.sample(labels, generator=g), repeats),
        "decode": median_ms(lambda: tokenizer.decode(z), repeats),
        "encode": median_ms(lambda: tokenizer.encode(x), repeats),
    }
    with torch.enable_grad():
        warmup = 3
        loader = DataLoader(RandomImages((warmup + steps + 1) * 64), batch_size=64)
        ends = timed_fit(build(DMVAEModule, 16), loader)
        out["train"] = (ends[warmup - 1 + steps] - ends[warmup - 1]) / steps * 1e3
    return out


def child(variant: str, args: argparse.Namespace) -> None:
    from dmvae_lightning.utils.malloc import tune_malloc

    if variant == "tuned" and not tune_malloc():
        raise SystemExit("tune_malloc() did not apply (not glibc, or DMVAE_TUNE_MALLOC=0)")
    torch.set_num_threads(args.threads)
    result = measure(args.repeats, args.steps)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.pop("DMVAE_TUNE_MALLOC", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--steps", str(args.steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, variant order rotated")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per workload")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in rotated(list(VARIANTS), r):
            runs[variant].append(run_variant(variant, args))
    med = {v: {k: statistics.median(d[k] for d in runs[v]) for k in runs[v][0]} for v in VARIANTS}
    print(
        f"glibc malloc thresholds, {args.threads} thread(s); median of {args.rounds} rounds "
        f"(fresh process per variant and round)"
    )
    print(f"  {'workload':<28} {'default':>10} {'tuned':>10}  tuned/default")
    names = {
        "sample": "sample 500 (50 Euler steps)",
        "decode": "decode 500 latents",
        "encode": "encode 500 images",
        "train": "KL-VAE train step (b 64)",
    }
    for key in WORKLOADS:
        d, t = med["default"][key], med["tuned"][key]
        print(f"  {names[key]:<28} {d:8.1f} ms {t:8.1f} ms  {t / d:.3f}")
    d, t = med["default"]["max_rss_mib"], med["tuned"]["max_rss_mib"]
    print(f"  {'peak RSS':<28} {d:7.0f} MiB {t:7.0f} MiB  {t / d:.3f}")


if __name__ == "__main__":
    main()
