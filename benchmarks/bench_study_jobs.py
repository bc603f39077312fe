"""Throughput of the study's worker processes (``dmvae study --jobs N``), side by side in one run.

The same units of the study run twice:

* ``sequential``: one unit after another, each process with every usable core as torch threads
  (what ``--jobs 1`` does, plus one process start per unit; and what ``--jobs N`` gives a unit
  that starts with nothing else ready);
* ``parallel``: ``--jobs`` units at once, each process with cores / jobs threads;
* ``alone`` (only with ``--modes``): one unit after another, each with cores / jobs threads:
  what ``--jobs N`` gave a unit that ran alone before such a unit took the free cores.

The figure of merit is the wall time of all units: sequential / parallel is the speed-up of
running units side by side, alone / sequential that of a lone unit taking every core. Units
(``--kind``):

* ``seed`` (default): generators of arm ``--arm`` (``seed:<arm>:<s>``: train a 600-step
  generator DiT on the arm's latent cache, then sample and score 5000 images, as ``make study``
  does; about 60 % of a DMVAE arm's compute). The arm must have its tokenizer, its evaluation
  and its latent cache in ``--runs`` (``make study ARMS=ablation`` gets one); the units use
  seeds 1000, 1001, ...
* ``arm``: the tokenizer units of ``--arms`` (``arm:<arm>``: alignment, decoder fine-tune,
  tokenizer evaluation, latent cache) on the shared stages of ``--runs``, which must be done;
  arms without an ablation, or whose ablation is among them.

Each mode works in a scratch copy of the runs folder (links to its shared stages, and for seed
units to the arm's tokenizer and cache; removed afterwards), so the study is left as it was.

    python benchmarks/bench_study_jobs.py --runs runs/study --arm ablation         # ~10 min
    python benchmarks/bench_study_jobs.py --kind arm --arms ablation_align_seed1,ablation_align_seed2
    python benchmarks/bench_study_jobs.py --modes alone,sequential --units 1     # a lone unit
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dmvae_lightning.study.arms import DEFAULT_GENERATOR_STEPS
from dmvae_lightning.study.driver import usable_cores
from dmvae_lightning.study.parallel import Unit, run_units, worker_command, worker_env


def scratch_copy(runs: Path, dest: Path, arm: str | None = None) -> None:
    """``dest``: a runs folder whose ``shared/`` links to that of ``runs``; with ``arm``, also
    that arm's tokenizer checkpoints and latent cache, and its evaluation copied with its
    checkpoint path moved to ``dest`` (so units read it back instead of evaluating again)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "shared").symlink_to((runs / "shared").resolve())
    if arm is None:
        return
    src = runs / "arms" / arm
    tok_file = src / "tokenizer.json"
    if not tok_file.is_file() or not (src / "latents").is_dir():
        raise SystemExit(
            f"--arm {arm}: {src} has no tokenizer.json / latents; run the study for that arm "
            f"first (make study ARMS={arm}) or pick another --arm"
        )
    arm_dir = dest / "arms" / arm
    arm_dir.mkdir(parents=True)
    (arm_dir / "latents").symlink_to((src / "latents").resolve())
    for path in src.glob("tokenizer_*"):
        (arm_dir / path.name).symlink_to(path.resolve())
    evaluation = json.loads(tok_file.read_text())
    evaluation["checkpoint"] = str(arm_dir / Path(evaluation["checkpoint"]).name)
    (arm_dir / "tokenizer.json").write_text(json.dumps(evaluation))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/study", help="a study's runs folder")
    parser.add_argument("--kind", choices=("seed", "arm"), default="seed", help="units to time")
    parser.add_argument("--arm", default="ablation", help="seed units: an arm with its cache")
    parser.add_argument("--units", type=int, default=2, help="seed units: generators per mode")
    parser.add_argument("--arms", default="", help="arm units: comma-separated arms")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (parallel mode)")
    parser.add_argument("--generator_steps", type=int, default=DEFAULT_GENERATOR_STEPS)
    parser.add_argument("--root", default=".", help="repository root (holds configs/)")
    parser.add_argument(
        "--modes", default="sequential,parallel", help="comma-separated: sequential,parallel,alone"
    )
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    if not (runs / "shared").is_dir():
        raise SystemExit(f"--runs {runs}: no shared/ folder; run the study first")
    cores = usable_cores()
    seeds = [1000 + i for i in range(args.units)]
    if args.kind == "seed":
        names = [f"seed:{args.arm}:{s}" for s in seeds]
        what = f"generator units of arm {args.arm} ({args.generator_steps} steps + evaluation)"
    elif args.arms:
        names = [f"arm:{a}" for a in args.arms.split(",")]
        what = "tokenizer units (" + ", ".join(names) + ")"
    else:
        raise SystemExit("--kind arm needs --arms a,b")
    share = max(1, cores // args.jobs)
    known = {"sequential": (1, cores), "parallel": (args.jobs, share), "alone": (1, share)}
    unknown = sorted(set(args.modes.split(",")) - set(known))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {sorted(known)}")
    modes = {mode: known[mode] for mode in args.modes.split(",")}
    wall: dict[str, float] = {}
    per_unit: dict[str, float] = {}
    for mode, (jobs, threads) in modes.items():
        with tempfile.TemporaryDirectory(dir=runs.parent, prefix=f".bench_jobs_{mode}_") as tmp:
            dest = Path(tmp)
            scratch_copy(runs, dest, args.arm if args.kind == "seed" else None)
            argv_unit = ["--runs", str(dest), "--root", str(Path(args.root).resolve())]
            argv_unit += ["--seeds", ",".join(map(str, seeds))]
            argv_unit += ["--generator_steps", str(args.generator_steps)]
            start = time.perf_counter()
            seconds = run_units(
                [Unit(name) for name in names],
                worker_command(argv_unit),
                jobs,
                dest / "logs",
                env=worker_env,
                threads=threads,
                log=lambda line, mode=mode: print(f"  {mode}: {line}", flush=True),
            )
            wall[mode] = time.perf_counter() - start
            per_unit[mode] = sum(seconds.values()) / len(seconds)
    print(f"\n{len(names)} {what}, {cores} usable cores:")
    print("| mode | jobs | threads each | wall s | s per unit (its process) | units / hour |")
    print("|---|---|---|---|---|---|")
    for mode, (jobs, threads) in modes.items():
        print(
            f"| {mode} | {jobs} | {threads} | {wall[mode]:.0f} | {per_unit[mode]:.0f} | "
            f"{3600 * len(names) / wall[mode]:.1f} |"
        )
    out = {f"{m}_s": w for m, w in wall.items()}
    if "sequential" in wall and "parallel" in wall:
        out["speedup"] = wall["sequential"] / wall["parallel"]
        print(f"\nparallel speed-up (sequential wall / parallel wall): {out['speedup']:.2f}x")
    if "sequential" in wall and "alone" in wall:
        out["lone_speedup"] = wall["alone"] / wall["sequential"]
        print(f"lone unit on every core (alone wall / sequential wall): {out['lone_speedup']:.2f}x")
    return out


if __name__ == "__main__":
    main()
