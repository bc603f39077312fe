"""Putting a study's numbers into the documentation: ``python -m dmvae_lightning.study.publish``.

A runs folder is scratch: gigabytes of checkpoints, run over several sessions, easy to lose. The
numbers the documentation quotes therefore live in the repository, in ``docs/study_results.json``:
one row per arm in the format of ``study.json``'s ``arms`` (tokenizer metrics, every generator
seed's gFID, mean ± std), without checkpoint paths. The two tables of
``docs/reference-study.md`` (between ``<!-- study-table-1 -->`` / ``<!-- /study-table-1 -->``
and the same for table 2) and the figures ``docs/study_gfid.png`` and
``docs/study_psnr_vs_gfid.png`` are drawn from those rows, so they cannot drift apart (a test
renders the tables from the JSON and compares them with the page).

``--runs runs/study`` first merges the finished arms of a runs folder (their
``arms/<arm>/result.json``; ``--arms`` picks some) into the rows, replacing rows of the same
arm. Each row's title, table and order are taken from its arm file when it exists, so the
tables follow ``configs/fashion_mnist/study``. The latent-PCA figure needs the checkpoints and
is not redrawn here (``runs/study/figures/latent_pca.png`` is the study's own).

``--rerun`` merges the arms into ``docs/study_rerun_results.json`` instead: an independent
rerun of arms already published (e.g. the whole of Table 1 in one command, every shared stage
retrained), kept beside the published rows, not mixed into them. The page's block between
``<!-- study-rerun -->`` and ``<!-- /study-rerun -->`` compares the two, arm by arm.

``--generator_steps N`` (N other than the study's 600) merges the arms' results at that
generator budget (``arms/<arm>/result_steps<N>.json``), and their 600-step ``result.json`` from
the same folder (the same tokenizers, which the published rows need not be: a lost folder's
arms were rerun), into ``docs/study_budget_results.json``, one row per arm and budget: the
page's block between ``<!-- study-budgets -->`` and ``<!-- /study-budgets -->`` puts each arm's
gFID at every budget side by side, and ``docs/study_budgets.png`` draws gFID against the
budget.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmvae_lightning.study.arms import (
    ARMS_DIR,
    DEFAULT_GENERATOR_STEPS,
    budget_suffix,
    load_arms,
    result_name,
)
from dmvae_lightning.study.report import (
    arm_table,
    budget_figure,
    budget_table,
    gfid_figure,
    psnr_gfid_figure,
    row_steps,
    steps_figure,
)

RESULTS = Path("docs/study_results.json")
RERUN = Path("docs/study_rerun_results.json")
RERUN_MARKERS = ("<!-- study-rerun -->", "<!-- /study-rerun -->")
BUDGETS = Path("docs/study_budget_results.json")
BUDGET_MARKERS = ("<!-- study-budgets -->", "<!-- /study-budgets -->")
DOC = Path("docs/reference-study.md")
FIGURES = {
    "gfid": Path("docs/study_gfid.png"),
    "psnr_vs_gfid": Path("docs/study_psnr_vs_gfid.png"),
    "steps": Path("docs/study_steps.png"),
    "budgets": Path("docs/study_budgets.png"),
}
#: the parts of an arm's result.json that the docs keep (no paths, no per-stage timings)
ROW_KEYS = (
    "key",
    "title",
    "table",
    "order",
    "reference",
    "seeds",
    "generator_steps",
    "tokenizer",
    "generators",
    "summary",
    "stage_seconds",
    "seconds_note",
)


def slim(result: dict[str, Any]) -> dict[str, Any]:
    """The row the docs keep of an arm's ``result.json``: :data:`ROW_KEYS`, the tokenizer's
    metrics without its checkpoint path."""
    row = {k: result[k] for k in ROW_KEYS if k in result}
    row["tokenizer"] = {k: v for k, v in result["tokenizer"].items() if k != "checkpoint"}
    return row


def merge(
    rows: list[dict[str, Any]], new: Sequence[dict[str, Any]], arms: dict[str, Any]
) -> list[dict[str, Any]]:
    """``rows`` with each of ``new`` replacing the row of the same ``key`` and generator budget
    (or added); a row whose arm is in ``arms`` (key -> :class:`~dmvae_lightning.study.arms.Arm`)
    takes its title, table, order and ``curve`` (dropped when the arm has none) from it. Sorted
    by (table, order, budget)."""
    by_key = {(r["key"], row_steps(r)): r for r in rows}
    for row in new:
        by_key[(row["key"], row_steps(row))] = row
    for (key, _), row in by_key.items():
        if (arm := arms.get(key)) is not None:
            row.update(title=arm.title, table=arm.table, order=arm.order)
            row.pop("curve", None)
            if arm.curve is not None:
                row["curve"] = dict(arm.curve)
    return sorted(by_key.values(), key=lambda r: (r["table"], r["order"], row_steps(r) or 0))


def replace_block(text: str, start: str, end: str, lines: list[str], what: str) -> str:
    """``text`` with the lines between markers ``start`` and ``end`` replaced by ``lines``;
    raises ValueError naming the markers and ``what`` the block is for when one is missing."""
    if start not in text or end not in text:
        raise ValueError(f"the page has no {start} ... {end} block for {what}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(lines)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render(text: str, rows: list[dict[str, Any]]) -> str:
    """``text`` (a markdown page) with the lines between ``<!-- study-table-N -->`` and
    ``<!-- /study-table-N -->`` replaced by table N of ``rows``, for every N the rows have.
    Raises ValueError naming a missing marker."""
    for table in sorted({r["table"] for r in rows}):
        start, end = f"<!-- study-table-{table} -->", f"<!-- /study-table-{table} -->"
        text = replace_block(text, start, end, arm_table(rows, table), f"table {table}")
    return text


def rerun_table(published: list[dict[str, Any]], rerun: list[dict[str, Any]]) -> list[str]:
    """Markdown lines comparing each ``rerun`` row with the ``published`` row of the same arm
    (rerun rows without one are left out): gFID mean ± std of both, their difference against
    twice the larger std, PSNR and the MMD² to the reference of both."""
    lines = [
        "| arm | gFID, published | gFID, rerun | rerun - published | 2 x larger std "
        "| PSNR (dB), published / rerun | MMD² to ref, published / rerun |",
        "|" + "---|" * 7,
    ]
    by_key = {r["key"]: r for r in published}
    for row in rerun:
        if (old := by_key.get(row["key"])) is None:
            continue
        a, b = old["summary"], row["summary"]

        def both(key: str, fmt: str, a=old["tokenizer"], b=row["tokenizer"]) -> str:
            if key not in a or key not in b:
                return "n/a"
            return f"{a[key]:{fmt}} / {b[key]:{fmt}}"

        lines.append(
            f"| `{row['key']}` | {a['gfid_mean']:.2f} ± {a['gfid_std']:.2f} "
            f"| {b['gfid_mean']:.2f} ± {b['gfid_std']:.2f} "
            f"| {b['gfid_mean'] - a['gfid_mean']:+.2f} "
            f"| {2 * max(a['gfid_std'], b['gfid_std']):.2f} "
            f"| {both('psnr', '.2f')} | {both('mmd', '.4f')} |"
        )
    return lines


def render_rerun(text: str, published: list[dict[str, Any]], rerun: list[dict[str, Any]]) -> str:
    """``text`` with the block between :data:`RERUN_MARKERS` replaced by :func:`rerun_table`;
    raises ValueError when the page has no such block."""
    return replace_block(text, *RERUN_MARKERS, rerun_table(published, rerun), "the rerun")


def arm_result(
    runs: Path, arm: str, generator_steps: int | None = DEFAULT_GENERATOR_STEPS
) -> dict[str, Any]:
    """A finished arm's ``<runs>/arms/<arm>/result.json`` (``result_steps<N>.json`` at another
    generator budget); FileNotFoundError naming the arm and the budget when it has not finished
    there."""
    file = runs / "arms" / arm / result_name(generator_steps)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: arm {arm!r} has not finished in --runs {runs} with "
            f"--generator_steps {generator_steps or 0} (run the study for it, or leave it out "
            "of --arms)"
        )
    return json.loads(file.read_text())


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (``[]`` when it does not exist yet)."""
    return json.loads(path.read_text()) if path.is_file() else []


def publish(
    root: Path,
    runs: Path | None = None,
    arms: Sequence[str] | None = None,
    figures: bool = True,
    rerun: bool = False,
    generator_steps: int | None = DEFAULT_GENERATOR_STEPS,
) -> list[dict[str, Any]]:
    """Merge the finished arms of ``runs`` (all, or ``arms``) into ``root/docs/
    study_results.json`` (``rerun``: into ``study_rerun_results.json``; ``generator_steps``
    other than the default: their results at that budget into ``study_budget_results.json``),
    then write the page's tables, its rerun comparison and its budget table (when there are
    such rows) and the figures from them. Returns the published rows. Raises FileNotFoundError
    for a named arm with no result, ValueError for ``rerun`` at another budget."""
    other_budget = budget_suffix(generator_steps) != ""
    if rerun and other_budget:
        raise ValueError(
            "--rerun compares with the published rows, which are at the default "
            f"generator budget ({DEFAULT_GENERATOR_STEPS}); drop --generator_steps"
        )
    results = root / RESULTS
    rows = load_rows(results)
    rerun_rows = load_rows(root / RERUN)
    budget_rows = load_rows(root / BUDGETS)
    new: list[dict[str, Any]] = []
    if runs is not None:
        if not arms:
            name = result_name(generator_steps)
            arms = [f.parent.name for f in sorted((runs / "arms").glob(f"*/{name}"))]
        new = [slim(arm_result(runs, arm, generator_steps)) for arm in arms]
    arm_files = {a.key: a for a in load_arms(root / ARMS_DIR)}
    if rerun:
        rerun_rows = merge(rerun_rows, new, arm_files)
        (root / RERUN).write_text(json.dumps(rerun_rows, indent=1, ensure_ascii=False) + "\n")
        new = []
    if other_budget:
        for row in new:  # rows written before results named their budget
            row.setdefault("generator_steps", generator_steps)
        for arm in arms if runs is not None else []:  # the same tokenizers' default budget
            try:
                new.append(slim(arm_result(runs, arm)))
            except FileNotFoundError:  # not run at the default budget there
                continue
        budget_rows = merge(budget_rows, new, arm_files)
        (root / BUDGETS).write_text(json.dumps(budget_rows, indent=1, ensure_ascii=False) + "\n")
        new = []
    rows = merge(rows, new, arm_files)
    results.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    page = root / DOC
    text = render(page.read_text(), rows)
    if rerun_rows:
        text = render_rerun(text, rows, rerun_rows)
    if budget_rows:
        text = replace_block(text, *BUDGET_MARKERS, budget_table(budget_rows), "the budget table")
    page.write_text(text)
    if figures:
        from dmvae_lightning.plots import save_figure

        save_figure(gfid_figure(rows), root / FIGURES["gfid"])
        save_figure(psnr_gfid_figure(rows), root / FIGURES["psnr_vs_gfid"])
        if any("curve" in r for r in rows):
            save_figure(steps_figure(rows), root / FIGURES["steps"])
        if budget_rows:
            save_figure(budget_figure(budget_rows), root / FIGURES["budgets"])
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m dmvae_lightning.study.publish",
        description="Merge a study's finished arms into docs/study_results.json and redraw the "
        "tables of docs/reference-study.md and the docs' study figures from it.",
    )
    parser.add_argument("--runs", type=Path, help="a study's runs folder to merge arms from")
    parser.add_argument("--arms", help="comma-separated arms of --runs (default: every finished)")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root")
    parser.add_argument("--no_figures", action="store_true", help="tables and JSON only")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help=f"merge --runs into {RERUN} (an independent rerun, compared with the published "
        "rows on the page) instead of the published rows",
    )
    parser.add_argument(
        "--generator_steps",
        type=int,
        default=DEFAULT_GENERATOR_STEPS,
        help=f"the generator budget of the results to merge (default {DEFAULT_GENERATOR_STEPS}; "
        f"another goes to {BUDGETS} and the page's budget table; 0: diffusion.yaml's)",
    )
    args = parser.parse_args(argv)
    if args.arms and args.runs is None:
        parser.error("--arms names arms of a runs folder: give --runs too")
    if args.runs is not None and not (args.runs / "arms").is_dir():
        parser.error(f"--runs {args.runs}: no arms/ folder there, so no study ran in it")
    try:
        rows = publish(
            args.root.resolve(),
            args.runs.resolve() if args.runs else None,
            args.arms.split(",") if args.arms else None,
            figures=not args.no_figures,
            rerun=args.rerun,
            generator_steps=args.generator_steps or None,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(
        f"[publish] {len(rows)} arms -> {RESULTS}, {DOC}, {', '.join(map(str, FIGURES.values()))}"
    )
    return rows


if __name__ == "__main__":
    main()
