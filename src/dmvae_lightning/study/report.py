"""The study's report: mean +- std over seeds, the markdown tables of ``study.md`` and the
figures (gFID per arm, PSNR vs gFID, gFID and PSNR against training length, latent PCA). Works
on the JSON rows only."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from dmvae_lightning.study.arms import DEFAULT_GENERATOR_STEPS


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (n - 1; 0 for one seed) over seeds of every generator metric (not of
    the seed number or the evaluation's wall time)."""
    out: dict[str, float] = {}
    keys = [k for k in per_seed[0] if k not in ("seed", "eval_seconds")] if per_seed else []
    for key in keys:
        values = torch.tensor([float(r[key]) for r in per_seed], dtype=torch.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
    return out


def short_metrics(values: dict[str, Any]) -> str:
    """``"gfid 3.04, is 2.61"``: the float entries of ``values`` for a progress line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))


def _pm(summary: dict[str, float], key: str, digits: int = 2) -> str:
    if f"{key}_mean" not in summary:
        return "n/a"
    return f"{summary[key + '_mean']:.{digits}f} ± {summary[key + '_std']:.{digits}f}"


def _per_seed(row: dict[str, Any], key: str, digits: int = 2) -> str:
    return ", ".join(f"{g[key]:.{digits}f}" for g in row["generators"] if key in g)


def _num(values: dict[str, Any], key: str, fmt: str) -> str:
    return format(values[key], fmt) if key in values else "n/a"


TABLE_HEADER = (
    "| arm | reference | PSNR (dB) | rFID | gFID | gFID per seed | IS (domain) | FM loss | MMD² to ref "
    "(ablation) | SW2² to ref (ablation) | probe acc | seconds |"
)


def _seconds(row: dict[str, Any]) -> str:
    if "seconds_note" in row:  # seconds that are not comparable, said in words
        return str(row["seconds_note"])
    return f"{row.get('stage_seconds', row.get('seconds', math.nan)):.0f}"


def arm_table(rows: list[dict[str, Any]], table: int) -> list[str]:
    """The markdown lines (header, rule, one line per arm) of paper table ``table`` (1 or 2)
    for the arm ``rows`` of a study's JSON (``study.json``'s ``arms``), in the rows' order."""
    lines = [TABLE_HEADER, "|" + "---|" * 12]
    for row in (r for r in rows if r["table"] == table):
        t, s = row["tokenizer"], row["summary"]

        def dist(key: str, t=t) -> str:
            if key not in t:
                return "n/a"
            abl = f" ({t['ablation_' + key]:.4f})" if f"ablation_{key}" in t else ""
            return f"{t[key]:.4f}{abl}"

        lines.append(
            f"| {row['title']} (`{row['key']}`) | {row['reference'] or '-'} "
            f"| {_num(t, 'psnr', '.2f')} | {_num(t, 'rfid', '.2f')} | {_pm(s, 'gfid')} "
            f"| {_per_seed(row, 'gfid')} "
            f"| {_pm(s, 'is')} "
            f"| {_pm(s, 'fm_loss', 3)} | {dist('mmd')} | {dist('swd')} "
            f"| {_num(t, 'probe_acc', '.3f')} | {_seconds(row)} |"
        )
    return lines


def study_markdown(report: dict[str, Any]) -> str:
    """The tables of ``study.md``: one per paper table, mean ± std over the generator seeds."""
    sizes = report["sizes"]
    lines = [
        f"Seeds {report['seeds']} (generator; mean ± sample std); generators "
        f"{report.get('generator_steps') or 1200} steps on cached latents. gFID / IS: "
        f"{sizes['gen_samples']} class-balanced samples (50-step Euler, no CFG) vs "
        f"{sizes['eval_images']} test images, domain FID net. PSNR / rFID on the same test images. "
        f"Latent distances in the reference model's normalised space ({sizes['distance']} "
        "samples); in brackets the same for the arm's ablation (matching weight 0). Probe: linear "
        f"classifier on the latents ({sizes['probe_train']} training images). FM loss: the "
        "generator's flow-matching loss on the test latents. Seconds: the arm's own training "
        "stages and evaluations (shared stages below)."
        + (" QUICK RUN: numbers are meaningless." if report.get("quick") else ""),
    ]
    for table in sorted({r["table"] for r in report["arms"]}):
        lines += ["", f"### Table {table}", "", *arm_table(report["arms"], table)]
    refs = report.get("references") or {}
    if refs:
        lines += [
            "",
            "Reference score models (the DMD real score): flow-matching loss on the stage-1 "
            "latents of the test images (same t and noise draws for each; lower fits better): "
            + ", ".join(
                f"{name} {q['fm_loss']:.4f} ({q['steps']} steps)" for name, q in refs.items()
            )
            + ".",
        ]
    shared = report.get("shared_seconds") or {}
    if shared:
        lines += [
            "",
            "Shared stages (seconds): " + ", ".join(f"{k[7:]} {v:.0f}" for k, v in shared.items()),
        ]
    lines.append(
        f"\nThis invocation: {report['seconds']:.0f} s (finished arms and stages are read back, "
        "not redone; the seconds column keeps each arm's own time)."
    )
    return "\n".join(lines) + "\n"


def row_steps(row: dict[str, Any]) -> int | None:
    """A row's generator budget: its ``generator_steps``; rows written before the key existed
    were all at the study's default (600)."""
    return row.get("generator_steps", DEFAULT_GENERATOR_STEPS)


def budgets(budget_rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per arm of ``budget_rows`` (rows of one arm's tokenizer at several generator budgets),
    in their order: ``{steps: row}`` sorted by the budget (None, the config's, counts as 0)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for row in budget_rows:
        out.setdefault(row["key"], {})[row_steps(row) or 0] = row
    return {key: dict(sorted(steps.items())) for key, steps in out.items()}


def budget_table(budget_rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one line per arm of ``budget_rows`` (:func:`budgets`) with its gFID
    (mean ± sample std, number of generator seeds) at every generator budget of the table and
    its generators' flow-matching loss on the test latents at each (how far they still are
    from fitting the latents)."""
    table = budgets(budget_rows)
    steps = sorted({n for arm in table.values() for n in arm})
    lines = [
        "| arm | PSNR (dB) | "
        + " | ".join(f"gFID, {n} steps" for n in steps)
        + " | FM loss at each budget |",
        "|" + "---|" * (len(steps) + 3),
    ]
    for key, arm in table.items():
        any_row = next(iter(arm.values()))
        cells = []
        for n in steps:
            if (row := arm.get(n)) is None:
                cells.append("-")
            else:
                cells.append(f"{_pm(row['summary'], 'gfid')} ({len(row['generators'])})")
        fm = " / ".join(_num(r["summary"], "fm_loss_mean", ".2f") for r in arm.values())
        lines.append(
            f"| {any_row['title']} (`{key}`) | {_num(any_row['tokenizer'], 'psnr', '.2f')} | "
            + " | ".join(cells)
            + f" | {fm} |"
        )
    return lines


# --------------------------------------------------------------------------------- figures
def _fig(**kwargs: Any):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def gfid_figure(rows: list[dict[str, Any]]):
    """gFID per arm: mean ± std over seeds (a point with error bars; Table 1 blue, Table 2
    orange) and each seed (small dots beside it), on a log axis. Points, not bars from zero, so
    that differences of 0.1 between arms stay visible."""
    fig = _fig(figsize=(max(6, 0.45 * len(rows) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        s = row["summary"]
        color = "#4c72b0" if row["table"] == 1 else "#dd8452"
        ax.errorbar(i, s["gfid_mean"], yerr=s["gfid_std"], fmt="o", color=color, capsize=3)
        seeds = [g["gfid"] for g in row["generators"]]
        ax.scatter([i + 0.25] * len(seeds), seeds, s=6, c="k", zorder=3)
    ax.set_xticks(range(len(rows)), [r["key"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")  # an outlier arm (diffusion noise) would squash the rest
    ax.yaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_minor_formatter("{x:g}")
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_ylabel("gFID (domain net, log scale)")
    ax.set_title("gFID per arm (mean ± std over seeds; dots: seeds)", fontsize=9)
    return fig


def psnr_gfid_figure(rows: list[dict[str, Any]]):
    fig = _fig(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        s = row["summary"]
        ax.errorbar(
            row["tokenizer"]["psnr"], s["gfid_mean"], yerr=s["gfid_std"], fmt="o", capsize=3
        )
        ax.annotate(
            row["key"],
            (row["tokenizer"]["psnr"], s["gfid_mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("PSNR (dB)")
    ax.set_ylabel("gFID")
    ax.set_title("reconstruction vs generation", fontsize=9)
    return fig


def curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training-length curves of ``rows`` (those with a ``curve``): per series, one point
    per ``vae_steps`` in increasing order, pooling every generator seed of the arms there
    (alignment or tokenizer seeds): ``{"vae_steps", "gfid_mean", "gfid_std"`` (sample std of
    the pooled seeds), ``"n"`` (seeds), ``"psnr"`` (mean over the arms' tokenizers),
    ``"arms"}``."""
    groups: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        if (curve := row.get("curve")) is not None:
            series = groups.setdefault(curve["series"], {})
            series.setdefault(curve["vae_steps"], []).append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, by_steps in groups.items():
        points = []
        for steps in sorted(by_steps):
            arms = by_steps[steps]
            pooled = [g for r in arms for g in r["generators"]]
            summary = summarize(pooled)
            points.append(
                {
                    "vae_steps": steps,
                    "gfid_mean": summary["gfid_mean"],
                    "gfid_std": summary["gfid_std"],
                    "n": len(pooled),
                    "psnr": statistics.fmean(r["tokenizer"]["psnr"] for r in arms),
                    "arms": [r["key"] for r in arms],
                }
            )
        out[name] = points
    return out


def steps_figure(rows: list[dict[str, Any]]):
    """gFID (mean ± std over the pooled seeds) and PSNR against the tokenizer's VAE training
    steps, one line per ``curve`` series (:func:`curves`): which family gains from training
    longer, compared at equal steps."""
    fig = _fig(figsize=(10, 4), layout="constrained")
    ax_g, ax_p = fig.subplots(1, 2)
    for name, points in curves(rows).items():
        x = [p["vae_steps"] for p in points]
        line = ax_g.errorbar(
            x,
            [p["gfid_mean"] for p in points],
            yerr=[p["gfid_std"] for p in points],
            fmt="o-",
            capsize=3,
            label=name,
        )
        for p in points:
            ax_g.annotate(
                f"n {p['n']}",
                (p["vae_steps"], p["gfid_mean"]),
                fontsize=6,
                xytext=(4, -8),
                textcoords="offset points",
            )
        ax_p.plot(x, [p["psnr"] for p in points], "o-", color=line.lines[0].get_color())
    ax_g.set_xlabel("tokenizer VAE steps (all stages)")
    ax_g.set_ylabel("gFID (mean ± std over pooled seeds)")
    ax_g.grid(alpha=0.3)
    ax_g.legend(fontsize=7)
    ax_g.set_title("generation against training length", fontsize=9)
    ax_p.set_xlabel("tokenizer VAE steps (all stages)")
    ax_p.set_ylabel("PSNR (dB)")
    ax_p.grid(alpha=0.3)
    ax_p.set_title("reconstruction against training length", fontsize=9)
    return fig


def budget_figure(budget_rows: list[dict[str, Any]]):
    """gFID (mean ± std over generator seeds) against the generator's training steps, one line
    per arm of ``budget_rows`` (:func:`budgets`), one panel per paper table (log axes): whether
    an ordering at one budget holds at another."""
    from matplotlib import colormaps

    table_of = {r["key"]: r["table"] for r in budget_rows}
    tables = sorted(set(table_of.values()))
    by_arm = budgets(budget_rows)
    fig = _fig(figsize=(6 * len(tables), 5.5), layout="constrained")
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    colors = colormaps["tab20"].colors
    markers = "osD^v<>p"
    for ax, table in zip(axes, tables, strict=True):
        arms = [(k, a) for k, a in by_arm.items() if table_of[k] == table]
        for i, (key, arm) in enumerate(arms):
            ax.errorbar(
                list(arm),
                [r["summary"]["gfid_mean"] for r in arm.values()],
                yerr=[r["summary"]["gfid_std"] for r in arm.values()],
                fmt=markers[i % len(markers)] + "-",
                color=colors[i % len(colors)],
                markersize=4,
                capsize=2,
                label=key,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        steps = sorted({n for _, arm in arms for n in arm})
        ax.set_xticks(steps, [str(n) for n in steps], minor=False)
        ax.xaxis.set_minor_formatter("")
        ax.yaxis.set_major_formatter("{x:g}")
        ax.yaxis.set_minor_formatter("{x:g}")
        ax.tick_params(which="both", labelsize=7)
        ax.set_xlabel("generator training steps (log scale)")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
        ax.set_title(f"Table {table}: gFID against the generator's budget", fontsize=9)
    axes[0].set_ylabel("gFID (mean ± std over seeds, log scale)")
    return fig


def pca_figure(
    latents: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    titles: dict[str, str],
):
    """Per arm: the first two principal components of its latents (coloured by class) and of its
    reference's samples (grey), both in the reference model's normalised space."""
    n = len(latents)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _fig(figsize=(3 * cols, 3 * rows), layout="constrained")
    for i, (key, (z, y, ref)) in enumerate(latents.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        flat = z.flatten(1).double()
        center = flat.mean(0)
        _, _, v = torch.pca_lowrank(flat - center, q=2, center=False)
        if ref is not None:
            r = (ref.flatten(1).double() - center) @ v
            ax.scatter(r[:, 0], r[:, 1], s=2, c="#9aa5b1", alpha=0.5, linewidths=0)
        p = (flat - center) @ v
        ax.scatter(p[:, 0], p[:, 1], s=2, c=y.numpy(), cmap="tab10", linewidths=0)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=6)
    return fig
