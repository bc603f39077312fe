"""The paper's 2-D toy study end to end (PAPER.md section 2, Figure 3).

    python -m dmvae_lightning.toy2d                     # full study into runs/toy2d/
    python -m dmvae_lightning.toy2d --points 512 --batches 200 --real-steps 300   # reduced

1. Trains the real-score model (``configs/toy2d/real.yaml``: a single-token DiT on the
   S-shape) unless ``<out>/real/checkpoints/real.ckpt`` exists.
2. Runs every objective config ``configs/toy2d/<name>.yaml`` (``dmd``, ``loss_difference``,
   ``real_only``, ``fake_only``, ``score_l2``, ``mmd``, ``swd``) through the ``dmvae`` CLI
   in-process, with the real checkpoint, sizes and output folders overridden. Each run writes
   ``<out>/<name>/points_final.png``, ``field_final.png`` (DMDLoss objectives), ``metrics.json``,
   ``points.pt`` and TensorBoard logs under ``<out>/<name>/version_*``.
3. Writes ``<out>/table.md`` (the summary table, also printed), ``<out>/results.json`` and
   ``<out>/clouds.png`` (every final point cloud over the reference).

Rows of the table: each objective, plus "uniform start" (the initial points) and "S-shape
sample" (the mean over 8 fresh reference samples of the same size: the floor of the metrics at
this N; single draws vary, SW_2 by a factor ~2). Metrics
(:func:`~dmvae_lightning.metrics.distances.cloud_metrics`, against the module's fixed
evaluation reference of fresh S-shape samples): ``SW_2`` (256 directions), energy distance,
coverage and precision within the configs' ``coverage_radius`` (0.03).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dmvae_lightning.cli import main as dmvae
from dmvae_lightning.metrics.distances import cloud_metrics
from dmvae_lightning.modules.toy2d import PointAlignmentModule

__all__ = ["OBJECTIVES", "StudyResult", "format_table", "main", "run_study", "train_real"]

OBJECTIVES: tuple[str, ...] = (
    "dmd",
    "loss_difference",
    "real_only",
    "fake_only",
    "score_l2",
    "mmd",
    "swd",
)
_FLOOR_SALT = 0x6A_11C0_FFEE  # the "S-shape sample" row's draw


@dataclass
class StudyResult:
    """What :func:`run_study` measured.

    Attributes:
        rows: ``{row name: {"sw2", "energy", "coverage", "precision", "seconds"?, ...}}``.
        timings: seconds per stage (``"real"`` is 0.0 when the checkpoint was reused).
        table: the markdown table (:func:`format_table`).
        out: the output folder.
        points: ``{objective: (N, 2) final points}``.
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    table: str = ""
    out: Path = Path("runs/toy2d")
    points: dict[str, torch.Tensor] = field(default_factory=dict)

    def figure(self, name: str) -> Path:
        """Path of a PNG the study wrote: ``"clouds"`` or ``"<objective>/points_final"`` etc."""
        return self.out / f"{name}.png"


def _config(configs: Path, name: str) -> Path:
    path = configs / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"--configs: no {path} (the toy-study configs live in configs/toy2d/ of the "
            "repository; run from its root or pass --configs)"
        )
    return path


def _quiet() -> list[str]:
    return ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def train_real(
    out: Path,
    configs: Path,
    steps: int | None = None,
    extra_args: Sequence[str] = (),
    force: bool = False,
) -> tuple[Path, float]:
    """Train the real-score model into ``<out>/real/checkpoints/real.ckpt`` (skipped when the
    file exists and not ``force``). Returns ``(checkpoint, seconds)`` (0.0 when skipped)."""
    ckpt = out / "real" / "checkpoints" / "real.ckpt"
    if ckpt.is_file() and not force:
        return ckpt, 0.0
    if ckpt.is_file():
        ckpt.unlink()
    args = [
        "fit",
        "--config",
        str(_config(configs, "real")),
        "--trainer.default_root_dir",
        str(out / "real"),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.callbacks.init_args.dirpath",
        str(ckpt.parent),
        *_quiet(),
    ]
    if steps is not None:
        args += ["--trainer.limit_train_batches", str(int(steps))]
    start = time.perf_counter()
    dmvae([*args, *extra_args])
    seconds = time.perf_counter() - start
    if not ckpt.is_file():
        raise RuntimeError(f"training the real model wrote no checkpoint at {ckpt}")
    return ckpt, seconds


def run_objective(
    name: str,
    out: Path,
    configs: Path,
    real_ckpt: Path,
    points: int | None = None,
    batches: int | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[PointAlignmentModule, float]:
    """Fit ``configs/<name>.yaml`` with outputs under ``<out>/<name>``; ``batches`` is the total
    number of batches (spread over the config's epochs). Returns ``(module, seconds)``."""
    path = _config(configs, name)
    config = yaml.safe_load(path.read_text())
    model_args = config["model"]["init_args"]
    loss_path = str(model_args.get("loss", {}).get("class_path", ""))
    args = [
        "fit",
        "--config",
        str(path),
        "--trainer.default_root_dir",
        str(out / name),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--model.init_args.plot_dir",
        str(out / name),
        *_quiet(),
    ]
    if loss_path.endswith("DMDLoss"):
        args += ["--model.init_args.loss.init_args.real_model", str(real_ckpt)]
    if points is not None:
        args += ["--model.init_args.num_points", str(int(points))]
    if batches is not None:
        epochs = int(config.get("trainer", {}).get("max_epochs") or 1)
        per_epoch = max(1, -(-int(batches) // epochs))
        args += ["--model.init_args.batches_per_epoch", str(per_epoch)]
    start = time.perf_counter()
    cli = dmvae([*args, *extra_args])
    return cli.model, time.perf_counter() - start


def _baselines(module: PointAlignmentModule, floor_draws: int = 8) -> dict[str, dict[str, float]]:
    """Metrics of the module's initial points, and the mean metrics of ``floor_draws`` fresh
    reference samples of the same N (the floor; one draw alone varies by a factor ~2 in SW_2)."""
    hp = module.hparams
    start = PointAlignmentModule.uniform_points(hp.num_points, hp.init_range, hp.seed)
    reference, radius = module.eval_reference(), hp.coverage_radius
    floors = []
    for index in range(floor_draws):
        gen = torch.Generator().manual_seed((hp.seed ^ _FLOOR_SALT) + index)
        sample = module.draw_reference(hp.num_points, gen).reshape(-1, 2)
        floors.append(cloud_metrics(sample, reference, radius=radius))
    floor = {key: sum(m[key] for m in floors) / floor_draws for key in floors[0]}
    return {
        "uniform start": cloud_metrics(start.reshape(-1, 2), reference, radius=radius),
        f"S-shape sample (mean of {floor_draws})": floor,
    }


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: objective, SW_2, energy distance, coverage, precision, seconds."""
    lines = [
        "| objective | SW_2 (lower better) | energy distance | coverage | precision | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        seconds = f"{m['seconds']:.0f}" if "seconds" in m else ""
        lines.append(
            f"| {name} | {m['sw2']:.4f} | {m['energy']:.4f} | {m['coverage']:.3f} | "
            f"{m['precision']:.3f} | {seconds} |"
        )
    return "\n".join(lines)


def run_study(
    out: str | Path = "runs/toy2d",
    configs: str | Path = "configs/toy2d",
    objectives: Sequence[str] = OBJECTIVES,
    points: int | None = None,
    batches: int | None = None,
    real_steps: int | None = None,
    retrain_real: bool = False,
    threads: int | None = 1,
    real_args: Sequence[str] = (),
    objective_args: Sequence[str] = (),
    verbose: bool = True,
) -> StudyResult:
    """Run the study (module docstring) and return its :class:`StudyResult`.

    Args:
        out: output folder.
        configs: folder of ``real.yaml`` and the objective configs.
        objectives: config names to run, in order.
        points, batches: override the number of points and of batches per objective.
        real_steps: override the real model's training batches.
        retrain_real: train the real model even if its checkpoint exists.
        threads: ``torch.set_num_threads`` for the run (None: leave it).
        real_args, objective_args: extra ``dmvae fit`` arguments for the real model / every
            objective (e.g. ``["--model.init_args.dit.depth", "2"]``).
        verbose: print each stage's time and the final table.
    """
    out, configs = Path(out), Path(configs)
    unknown = [name for name in objectives if not (configs / f"{name}.yaml").is_file()]
    if unknown:
        raise FileNotFoundError(f"--objectives: no config for {unknown} in {configs}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    result = StudyResult(out=out)
    ckpt, seconds = train_real(out, configs, real_steps, real_args, force=retrain_real)
    result.timings["real"] = seconds
    if verbose:
        done = f"{seconds:.0f} s" if seconds else "reused"
        print(f"[toy2d] real-score model: {ckpt} ({done})", flush=True)
    module = None
    for name in objectives:
        module, seconds = run_objective(name, out, configs, ckpt, points, batches, objective_args)
        result.rows[name] = {**module.final_metrics, "seconds": seconds}
        result.timings[name] = seconds
        result.points[name] = module.points.detach().reshape(-1, 2).cpu()
        if verbose:
            m = module.final_metrics
            print(
                f"[toy2d] {name}: {seconds:.0f} s, SW_2 {m['sw2']:.4f}, "
                f"coverage {m['coverage']:.3f}",
                flush=True,
            )
    if module is not None:
        result.rows.update(_baselines(module))
        _write(result, module.eval_reference())
    result.timings["total"] = sum(result.timings.values())
    if verbose:
        print(result.table)
        print(f"[toy2d] total {result.timings['total']:.0f} s; outputs in {out}")
    return result


def _write(result: StudyResult, reference: torch.Tensor) -> None:
    from dmvae_lightning import plots

    result.table = format_table(result.rows)
    result.out.mkdir(parents=True, exist_ok=True)
    (result.out / "table.md").write_text(result.table + "\n")
    payload = {"rows": result.rows, "timings": result.timings}
    (result.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    fig = plots.clouds_figure(result.points, reference)
    plots.save_figure(fig, result.figure("clouds"))


def main(argv: Sequence[str] | None = None) -> StudyResult:
    """Command line of :func:`run_study` (``python -m dmvae_lightning.toy2d --help``)."""
    parser = argparse.ArgumentParser(prog="python -m dmvae_lightning.toy2d", description=__doc__)
    parser.add_argument("--out", default="runs/toy2d", help="output folder")
    parser.add_argument("--configs", default="configs/toy2d", help="folder of the YAML configs")
    parser.add_argument(
        "--objectives", default=",".join(OBJECTIVES), help="comma-separated config names"
    )
    parser.add_argument("--points", type=int, default=None, help="points (config: 1536)")
    parser.add_argument("--batches", type=int, default=None, help="batches per objective")
    parser.add_argument("--real-steps", type=int, default=None, help="real-model batches")
    parser.add_argument("--retrain-real", action="store_true", help="ignore an existing ckpt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave)")
    args = parser.parse_args(argv)
    objectives = [name.strip() for name in args.objectives.split(",") if name.strip()]
    return run_study(
        out=args.out,
        configs=args.configs,
        objectives=objectives,
        points=args.points,
        batches=args.batches,
        real_steps=args.real_steps,
        retrain_real=args.retrain_real,
        threads=args.threads or None,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
