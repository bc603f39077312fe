"""Sample-set losses side by side: our SWD vs POT, our MMD vs torchmetrics' KID kernel.

On the same inputs (n samples per set, d features; defaults n = 2048, d = 512, the scale of a
flattened latent batch), in one run:

* ``SlicedWassersteinLoss`` vs ``ot.sliced_wasserstein_distance`` (POT, torch backend) with the
  same projection matrix; POT returns SW_p, ours SW_p^p, so the check compares ours with POT^p;
* ``MMDLoss(kernel="poly")`` vs ``torchmetrics.image.kid.poly_mmd`` (KID's cubic kernel and
  unbiased estimator; must agree to float precision);
* our RBF / IMQ multi-bandwidth and linear-time MMD for reference (no counterpart).

Each variant is timed forward only and forward + backward (gradient w.r.t. x); the median of
``--repeats`` runs after ``--warmup`` runs is printed with the ratio other / ours (> 1: ours is
faster)::

    OMP_NUM_THREADS=1 python benchmarks/bench_matching.py --threads 1
    python benchmarks/bench_matching.py --device cuda

POT is optional (``pip install pot``); without it the SWD comparison is skipped and says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchmetrics.image.kid import poly_mmd

from dmvae_lightning.losses.matching import MMDLoss, SlicedWassersteinLoss

try:
    import ot
except ImportError:  # optional
    ot = None


def timed(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    backward: bool,
    warmup: int,
    repeats: int,
) -> tuple[float, float]:
    """(median milliseconds, value) of ``fn(x, y)`` (+ backward into x)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times, value = [], float("nan")
    for i in range(warmup + repeats):
        xx = x.detach().requires_grad_(backward)
        sync()
        start = time.perf_counter()
        out = fn(xx, y)
        if backward:
            out.backward()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        value = float(out.detach())
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--projections", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=gen).to(device)
    y = (torch.randn(args.n, args.d, generator=gen) + 0.1).to(device)
    theta = torch.randn(args.d, args.projections, generator=gen)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(device)
    print(
        f"n={args.n} d={args.d} projections={args.projections} device={device} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} "
        f"POT={getattr(ot, '__version__', 'not installed')}"
    )
    rows: list[tuple[str, str, float, float, float, float]] = []

    def compare(name: str, ours, other, other_name: str, power: float = 1.0) -> None:
        for backward in (False, True):
            t_ours, v_ours = timed(ours, x, y, backward, args.warmup, args.repeats)
            if other is None:
                t_other, v_other = float("nan"), float("nan")
            else:
                t_other, v_other = timed(other, x, y, backward, args.warmup, args.repeats)
                v_other = v_other**power
            mode = "fwd+bwd" if backward else "fwd"
            rows.append((f"{name} [{mode}]", other_name, t_ours, t_other, v_ours, v_other))

    swd = SlicedWassersteinLoss(num_projections=args.projections, gather=False)
    if ot is None:
        print("POT is not installed (pip install pot): SWD vs POT skipped")
        pot_fixed = pot_drawn = None
    else:

        def pot_fixed(a, b):
            return ot.sliced_wasserstein_distance(a, b, p=2, projections=theta)

        def pot_drawn(a, b):
            return ot.sliced_wasserstein_distance(a, b, n_projections=args.projections, p=2)

    compare(
        "SWD_2^2 fixed projections",
        lambda a, b: swd.loss(a, b, projections=theta),
        pot_fixed,
        "POT",
        power=2.0,
    )
    compare("SWD_2^2 drawn per call", swd.loss, pot_drawn, "POT", power=2.0)
    compare("MMD^2 poly (KID kernel)", MMDLoss(kernel="poly", gather=False).loss, poly_mmd, "tm")
    for kernel in ("rbf", "imq"):
        mmd = MMDLoss(kernel=kernel, gather=False)
        compare(f"MMD^2 {kernel} x5 bandwidths", mmd.loss, None, "-")
    linear = MMDLoss(estimator="linear", gather=False)
    compare("MMD^2 rbf linear-time", linear.loss, None, "-")

    header = f"{'loss':38s} {'ours ms':>9s} {'other':>6s} {'other ms':>9s} {'ratio':>7s}"
    print(header + f"  {'ours value':>12s} {'other value':>12s}")
    for name, other_name, t_ours, t_other, v_ours, v_other in rows:
        ratio = t_other / t_ours if t_other == t_other else float("nan")
        print(
            f"{name:38s} {t_ours:9.2f} {other_name:>6s} {t_other:9.2f} {ratio:7.2f}"
            f"  {v_ours:12.6g} {v_other:12.6g}"
        )
    print("ratio = other ms / ours ms (> 1: ours faster); 'drawn per call' values differ by design")


if __name__ == "__main__":
    main()
