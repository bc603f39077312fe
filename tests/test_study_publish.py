"""Publishing study results into the docs (``python -m dmvae_lightning.study.publish``): the
committed tables are what the committed results render, and a runs folder's arms merge in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmvae_lightning.study import publish
from dmvae_lightning.study.report import arm_table, budget_table, budgets

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_tables_are_the_committed_results_rendered():
    rows = publish.load_rows(ROOT / publish.RESULTS)
    assert {r["table"] for r in rows} == {1, 2}
    page = (ROOT / publish.DOC).read_text()
    assert publish.render(page, rows) == page, (
        "docs/reference-study.md's tables differ from docs/study_results.json: run "
        "python -m dmvae_lightning.study.publish"
    )
    rerun = publish.load_rows(ROOT / publish.RERUN)
    assert rerun, "docs/study_rerun_results.json holds the one-command Table 1 rerun"
    assert publish.render_rerun(page, rows, rerun) == page
    assert {r["key"] for r in rerun} <= {r["key"] for r in rows}
    # the budget table is the committed budget rows rendered; an arm published at 600 steps
    # has its 600-step row from the same folder as its longer budgets beside them
    budget = publish.load_rows(ROOT / publish.BUDGETS)
    assert publish.replace_block(page, *publish.BUDGET_MARKERS, budget_table(budget), "") == page
    published = {r["key"] for r in rows}
    for key, by_steps in budgets(budget).items():
        assert any(n != 600 for n in by_steps), key
        assert 600 in by_steps or key not in published, key
    # every row's mean ± std is the mean and sample std of its per-seed gFIDs (each rounded
    # to 0.01 in the docs, so the mean of the rounded seeds is off by up to 0.01)
    for row in rows:
        gfids = [g["gfid"] for g in row["generators"]]
        mean = sum(gfids) / len(gfids)
        std = (sum((g - mean) ** 2 for g in gfids) / (len(gfids) - 1)) ** 0.5
        assert row["summary"]["gfid_mean"] == pytest.approx(mean, abs=0.0101), row["key"]
        assert row["summary"]["gfid_std"] == pytest.approx(std, abs=0.02), row["key"]


def _row(key: str, gfids: list[float], table: int = 2, order: int = 0) -> dict:
    mean = sum(gfids) / len(gfids)
    return {
        "key": key,
        "title": f"old title of {key}",
        "table": table,
        "order": order,
        "reference": "supervised",
        "tokenizer": {"psnr": 22.0, "rfid": 0.5, "probe_acc": 0.84, "checkpoint": "/x/t.ckpt"},
        "generators": [
            {"seed": i, "gfid": g, "is": 2.6, "fm_loss": 0.47} for i, g in enumerate(gfids)
        ],
        "summary": {"gfid_mean": mean, "gfid_std": 0.05, "is_mean": 2.6, "is_std": 0.0},
        "stage_seconds": 100.0,
    }


@pytest.fixture
def docs_root(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    page = "# study\n\n<!-- study-table-2 -->\nold\n<!-- /study-table-2 -->\n\nafter\n"
    (tmp_path / publish.DOC).write_text(page)
    rows = [_row("cfg3", [2.9, 2.8, 3.0]), _row("dmd_w1", [3.1, 3.0, 2.9])]
    (tmp_path / publish.RESULTS).write_text(json.dumps(rows))
    return tmp_path


def test_publish_merges_finished_arms_and_redraws_tables_and_figures(docs_root: Path):
    runs = docs_root / "runs"
    (runs / "arms" / "cfg3").mkdir(parents=True)
    (runs / "arms" / "cfg3" / "result.json").write_text(
        json.dumps(_row("cfg3", [2.71, 2.72, 2.73]) | {"timings": {"cfg3/0_align": 5.0}})
    )
    rows = publish.main(["--root", str(docs_root), "--runs", str(runs), "--arms", "cfg3"])
    by_key = {r["key"]: r for r in rows}
    assert [g["gfid"] for g in by_key["cfg3"]["generators"]] == [2.71, 2.72, 2.73]  # replaced
    assert [g["gfid"] for g in by_key["dmd_w1"]["generators"]] == [3.1, 3.0, 2.9]  # kept
    assert "checkpoint" not in by_key["cfg3"]["tokenizer"] and "timings" not in by_key["cfg3"]
    # titles and order come from the arm files: dmd_w1 comes before cfg3 in table 2
    assert [r["key"] for r in rows] == ["dmd_w1", "cfg3"]
    assert by_key["cfg3"]["title"] == "CFG 3 inside DMD (supervised reference, dmd 10)"
    saved = json.loads((docs_root / publish.RESULTS).read_text())
    assert saved == rows
    page = (docs_root / publish.DOC).read_text()
    table = "\n".join(arm_table(rows, 2))
    assert f"<!-- study-table-2 -->\n{table}\n<!-- /study-table-2 -->\n\nafter\n" in page
    assert "| 2.71, 2.72, 2.73 |" in page and "old\n" not in page
    for name, figure in publish.FIGURES.items():
        if name in ("steps", "budgets"):  # no arm on a curve, no other budget: not drawn
            assert not (docs_root / figure).exists()
        else:
            assert (docs_root / figure).stat().st_size > 1000
    # publishing again changes nothing
    publish.main(["--root", str(docs_root), "--no_figures"])
    assert (docs_root / publish.DOC).read_text() == page


def test_publish_names_what_is_missing(docs_root: Path):
    with pytest.raises(FileNotFoundError, match="arm 'gaussian' has not finished"):
        publish.publish(docs_root, docs_root / "runs", ["gaussian"], figures=False)
    rows = [_row("kl_vae", [3.3, 3.2], table=1)]
    with pytest.raises(ValueError, match="no <!-- study-table-1 -->"):
        publish.render("no markers here\n", rows)
    with pytest.raises(SystemExit):
        publish.main(["--arms", "cfg3"])  # --arms without --runs


def test_publish_cli_errors_name_the_runs_folder_and_the_arm(docs_root: Path, capsys):
    """A --runs folder where no study ran, and an arm that has not finished there, are argparse
    errors (exit 2) naming them, and the published rows stay as they were."""
    before = (docs_root / publish.RESULTS).read_text()
    root = ["--root", str(docs_root), "--no_figures"]
    missing = docs_root / "runs_typo"
    (docs_root / "runs" / "arms").mkdir(parents=True)
    for argv, words in [
        (["--runs", str(missing)], [f"--runs {missing}", "no arms/ folder"]),
        (["--runs", str(docs_root / "runs"), "--arms", "gaussian"], ["'gaussian' has not"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            publish.main(root + argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words), err
    assert (docs_root / publish.RESULTS).read_text() == before


def test_publish_rerun_compares_without_touching_the_published_rows(docs_root: Path):
    page = docs_root / publish.DOC
    page.write_text(page.read_text() + "<!-- study-rerun -->\n<!-- /study-rerun -->\nend\n")
    runs = docs_root / "runs"
    (runs / "arms" / "cfg3").mkdir(parents=True)
    (runs / "arms" / "cfg3" / "result.json").write_text(
        json.dumps(
            _row("cfg3", [2.71, 2.72, 2.73]) | {"summary": {"gfid_mean": 2.72, "gfid_std": 0.01}}
        )
    )
    before = (docs_root / publish.RESULTS).read_text()
    rows = publish.main(["--root", str(docs_root), "--runs", str(runs), "--rerun", "--no_figures"])
    assert {r["key"]: r["summary"]["gfid_mean"] for r in rows} == pytest.approx(
        {"cfg3": 2.9, "dmd_w1": 3.0}
    )
    saved = json.loads((docs_root / publish.RESULTS).read_text())
    assert saved == rows and [r["key"] for r in json.loads(before)] == ["cfg3", "dmd_w1"]
    rerun = json.loads((docs_root / publish.RERUN).read_text())
    assert [r["key"] for r in rerun] == ["cfg3"] and "checkpoint" not in rerun[0]["tokenizer"]
    text = page.read_text()
    # published 2.90 ± 0.05, rerun 2.72 ± 0.01: -0.18 against twice the larger std, 0.10
    line = "| `cfg3` | 2.90 ± 0.05 | 2.72 ± 0.01 | -0.18 | 0.10 | 22.00 / 22.00 | n/a |"
    assert f"<!-- study-rerun -->\n{publish.rerun_table(rows, rerun)[0]}" in text
    assert line in text and text.endswith("<!-- /study-rerun -->\nend\n")
    # a plain publish keeps the comparison; a page without the block is an error naming it
    publish.main(["--root", str(docs_root), "--no_figures"])
    assert page.read_text() == text
    with pytest.raises(ValueError, match="study-rerun"):
        publish.render_rerun("no block\n", rows, rerun)


def test_curves_pool_the_seeds_of_every_arm_at_one_length_and_sort_by_steps():
    """Two alignment seeds at 2900 steps pool into one point (mean and sample std of all six
    generator seeds, PSNR averaged); rows without a curve stay off the figure."""
    from dmvae_lightning.study.report import curves, steps_figure

    rows = [
        _row("long_seed1", [2.0, 2.2, 2.4]),
        _row("short", [3.0, 3.1, 3.2]),
        _row("long", [2.1, 2.3, 2.5]),
        _row("kl", [2.6, 2.8, 2.7]),
        _row("off_curve", [9.0, 9.0, 9.0]),
    ]
    for row, steps, series in (
        (rows[0], 2900, "dmvae"),
        (rows[1], 850, "dmvae"),
        (rows[2], 2900, "dmvae"),
        (rows[3], 2900, "kl"),
    ):
        row["curve"] = {"series": series, "vae_steps": steps}
    rows[0]["tokenizer"]["psnr"] = 23.0
    rows[2]["tokenizer"]["psnr"] = 24.0
    out = curves(rows)
    assert sorted(out) == ["dmvae", "kl"]
    short, long = out["dmvae"]
    assert (short["vae_steps"], long["vae_steps"]) == (850, 2900)
    assert short["gfid_mean"] == pytest.approx(3.1) and short["n"] == 3
    pooled = [2.0, 2.2, 2.4, 2.1, 2.3, 2.5]
    mean = sum(pooled) / 6
    std = (sum((g - mean) ** 2 for g in pooled) / 5) ** 0.5
    assert long["gfid_mean"] == pytest.approx(mean) and long["gfid_std"] == pytest.approx(std)
    assert long["n"] == 6 and long["psnr"] == pytest.approx(23.5)
    assert sorted(long["arms"]) == ["long", "long_seed1"]
    fig = steps_figure(rows)
    ax_g = fig.axes[0]
    assert [t.get_text() for t in ax_g.get_legend().get_texts()] == ["dmvae", "kl"]


def test_publish_takes_each_rows_curve_from_its_arm_file():
    """The shipped step-matched arms carry a curve; merging re-reads it from the arm files, so
    a row whose arm lost its curve loses it too."""
    rows = publish.merge(
        [_row("kl_vae_narrow_kl1e5_xxlong", [2.5, 2.4, 2.6]), _row("cfg3", [2.9, 3.0, 2.8])],
        [],
        {a.key: a for a in publish.load_arms(ROOT / publish.ARMS_DIR)},
    )
    by_key = {r["key"]: r for r in rows}
    assert by_key["kl_vae_narrow_kl1e5_xxlong"]["curve"]["vae_steps"] == 2900
    assert "curve" not in by_key["cfg3"]


def _budget_row(key: str, gfids: list[float], steps: int, fm_loss: float) -> dict:
    row = _row(key, gfids)
    mean = sum(gfids) / len(gfids)
    std = (sum((g - mean) ** 2 for g in gfids) / (len(gfids) - 1)) ** 0.5
    row["summary"] = {"gfid_mean": mean, "gfid_std": std, "fm_loss_mean": fm_loss}
    return row | {"generator_steps": steps}


def test_publish_at_another_generator_budget_keeps_the_published_rows(docs_root: Path):
    """Results at 1500 and 3000 generator steps go to the budget rows, one per arm and budget,
    with the same folder's 600-step result (the same tokenizer) beside them, not the
    published row; the published rows and tables do not change."""
    page = docs_root / publish.DOC
    page.write_text(page.read_text() + "<!-- study-budgets -->\n<!-- /study-budgets -->\nend\n")
    runs = docs_root / "runs"
    arm = runs / "arms" / "cfg3"
    arm.mkdir(parents=True)
    (arm / "result.json").write_text(json.dumps(_budget_row("cfg3", [2.5, 2.6, 2.7], 600, 0.4)))
    (arm / "result_steps1500.json").write_text(
        json.dumps(_budget_row("cfg3", [1.4, 1.5, 1.6], 1500, 0.30))
    )
    (arm / "result_steps3000.json").write_text(
        json.dumps(_budget_row("cfg3", [1.1, 1.2], 3000, 0.25))
    )
    base = ["--root", str(docs_root), "--runs", str(runs)]
    publish.main([*base, "--generator_steps", "1500", "--no_figures"])
    rows = publish.main([*base, "--generator_steps", "3000"])
    assert publish.load_rows(docs_root / publish.RESULTS) == rows
    assert {r["key"]: [g["gfid"] for g in r["generators"]] for r in rows} == {
        "cfg3": [2.9, 2.8, 3.0],
        "dmd_w1": [3.1, 3.0, 2.9],
    }
    budget = publish.load_rows(docs_root / publish.BUDGETS)
    assert [(r["key"], r["generator_steps"]) for r in budget] == [
        ("cfg3", 600),
        ("cfg3", 1500),
        ("cfg3", 3000),
    ]
    assert all("checkpoint" not in r["tokenizer"] for r in budget)
    text = page.read_text()
    header = "| arm | PSNR (dB) | gFID, 600 steps | gFID, 1500 steps | gFID, 3000 steps |"
    line = (
        "| CFG 3 inside DMD (supervised reference, dmd 10) (`cfg3`) | 22.00 | 2.60 ± 0.10 (3) "
        "| 1.50 ± 0.10 (3) | 1.15 ± 0.07 (2) | 0.40 / 0.30 / 0.25 |"
    )
    assert f"<!-- study-budgets -->\n{header}" in text and line in text
    assert text.endswith("<!-- /study-budgets -->\nend\n")
    assert publish.render(text, rows) == text  # the 600-step tables as they were
    # the figure: one line per arm along the budgets
    from dmvae_lightning.study.report import budget_figure

    assert (docs_root / publish.FIGURES["budgets"]).stat().st_size > 1000
    fig = budget_figure(budget + [_budget_row("kl_vae", [1.7, 1.8], 1500, 0.4) | {"table": 1}])
    assert [ax.get_title()[:7] for ax in fig.axes] == ["Table 1", "Table 2"]  # one per table
    ax = fig.axes[1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cfg3"]
    assert list(ax.lines[0].get_xdata()) == [600, 1500, 3000]
    # a new 1500-step result replaces that budget's row only
    (arm / "result_steps1500.json").write_text(
        json.dumps(_budget_row("cfg3", [1.3, 1.3, 1.3], 1500, 0.29))
    )
    publish.main([*base, "--generator_steps", "1500", "--no_figures"])
    budget = publish.load_rows(docs_root / publish.BUDGETS)
    assert [r["summary"]["gfid_mean"] for r in budget] == pytest.approx([2.6, 1.3, 1.15])
    # errors name the budget; --rerun compares with the 600-step rows only
    with pytest.raises(FileNotFoundError, match="--generator_steps 1500"):
        publish.publish(docs_root, runs, ["dmd_w1"], figures=False, generator_steps=1500)
    with pytest.raises(SystemExit):
        publish.main([*base, "--generator_steps", "1500", "--rerun"])
