"""``dmvae study`` / ``python -m dmvae_lightning.study`` / ``make study``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmvae_lightning.study.arms import ARMS_DIR, DEFAULT_GENERATOR_STEPS, DEFAULT_SEEDS, load_arms
from dmvae_lightning.study.driver import Study
from dmvae_lightning.study.report import study_markdown
from dmvae_lightning.utils.malloc import tune_malloc


def seed_list(text: str) -> list[int]:
    """``--seeds``: distinct comma-separated integers, e.g. ``0,1,2``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"each seed once (a repeat would count twice), got {text}")
    return seeds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the arms, print the tables; returns the study's JSON ({} for --list)."""
    parser = argparse.ArgumentParser(
        prog="dmvae study",
        description="The reference-distribution study: the paper's Tables 1 and 2 at CPU scale, "
        "with seeds (arms: configs/fashion_mnist/study/*.yaml).",
    )
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument(
        "--table",
        type=int,
        choices=(1, 2),
        default=None,
        help="only the arms of the paper's Table 1 (references) or 2 (ablations)",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=list(DEFAULT_SEEDS),
        help=f"generator seeds, comma-separated (default {','.join(map(str, DEFAULT_SEEDS))})",
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long stages (tests)")
    parser.add_argument(
        "--generator_steps",
        type=int,
        default=DEFAULT_GENERATOR_STEPS,
        help=f"steps per generator (default {DEFAULT_GENERATOR_STEPS}; 0: diffusion.yaml's); "
        "another budget's files are named apart (generator_steps<N>_seed<s>.json, "
        "result_steps<N>.json, study_steps<N>.md), on the same tokenizers and caches",
    )
    parser.add_argument("--runs", default="runs/study", help="output folder")
    parser.add_argument("--root", default=".", help="repository root (holds configs/)")
    parser.add_argument("--list", action="store_true", help="list the arms and exit")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes run at once (shared stages, arm tokenizers and generator seeds "
        "in parallel, each after what it needs; logs in <runs>/logs); 1: all in this process",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (0: torch's default; with --jobs N: cores / N, and a "
        "unit that starts with nothing else ready takes the free cores; N: exactly N each)",
    )
    parser.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # a --jobs worker
    args = parser.parse_args(argv)
    tune_malloc()  # every worker process too: they run this main (--unit)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.generator_steps < 0:
        parser.error(
            f"--generator_steps must be >= 0 (0: diffusion.yaml's), got {args.generator_steps}"
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = args.arms.split(",") if args.arms else None
    arms_dir = Path(args.root) / ARMS_DIR
    if not any(arms_dir.glob("*.yaml")):
        parser.error(f"no arm files (*.yaml) in {arms_dir}: --root must be the repository root")
    try:
        arms = load_arms(arms_dir, names=names)
    except ValueError as err:  # an --arms name without a file (or an arm file's mistake)
        parser.error(str(err))
    if names:  # run in the order given (the report keeps the table order)
        arms.sort(key=lambda a: names.index(a.key))
    if args.table is not None:
        arms = [arm for arm in arms if arm.table == args.table]
        if not arms:
            parser.error(f"--table {args.table}: none of the selected arms is in that table")
    if args.list:
        for arm in arms:
            print(f"{arm.key:28s} table {arm.table}  {arm.title}")
        return {}
    try:
        study = Study(
            args.runs,
            root=args.root,
            seeds=args.seeds,
            quick=args.quick,
            generator_steps=args.generator_steps or None,
        )
    except ValueError as err:  # a --quick study's folder given to a full one, or the reverse
        parser.error(str(err))
    if args.unit:  # one unit of a parallel study (dmvae_lightning.study.parallel)
        from dmvae_lightning.study.parallel import run_unit

        run_unit(study, args.unit)
        return {}
    report = study.run(arms, jobs=args.jobs, threads=args.threads or None)
    print("\n" + study_markdown(report))
    print(
        f"[study] {study.runs / f'study{study.suffix}.md'}, {study.runs / f'figures{study.suffix}'}, "
        f"tensorboard --logdir {study.runs / 'tb'}"
    )
    return report
