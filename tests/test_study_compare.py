"""``python -m dmvae_lightning.study.compare``: the study's decision rule (better by more than
twice the larger seed std) and Welch's t, checked against numbers worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from dmvae_lightning.study.compare import Comparison, compare, load_gfids, main


def test_rule_and_welch_match_the_hand_computed_values():
    # means 2 and 5, both std 1: gap 3 > 2; t = 3 / sqrt(1/3 + 1/3); df = 4
    c = Comparison((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert c.gap == pytest.approx(3.0) and c.threshold == pytest.approx(2.0)
    assert c.a_beats_b and not c.b_beats_a
    assert c.welch_t == pytest.approx(3.0 / math.sqrt(2.0 / 3.0))
    assert c.welch_df == pytest.approx(4.0)
    # unequal sizes and variances: var_a = 2 (n 2), var_b = 3 (n 4)
    # df = (1 + 0.75)^2 / (1^2 / 1 + 0.75^2 / 3) = 3.0625 / 1.1875
    u = Comparison((0.0, 2.0), (0.0, 0.0, 3.0, 3.0))
    assert u.welch_t == pytest.approx(0.5 / math.sqrt(1.75))
    assert u.welch_df == pytest.approx(3.0625 / 1.1875)


def test_a_gap_inside_twice_the_spread_is_level_either_way_round():
    near = Comparison((1.0, 2.0, 3.0), (2.5, 3.5, 4.5))  # gap 1.5 < 2
    assert not near.a_beats_b and not near.b_beats_a and "level" in near.verdict()
    far = Comparison((4.0, 5.0, 6.0), (1.0, 2.0, 3.0))  # B lower by 3 > 2
    assert far.b_beats_a and not far.a_beats_b and far.welch_t < 0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Comparison((1.0,), (1.0, 2.0))


def _rows(tmp_path):
    rows = [
        {"key": k, "generators": [{"seed": i, "gfid": v} for i, v in enumerate(vals)]}
        for k, vals in {
            "dmd": [2.0, 2.1, 1.9],
            "dmd_seed1": [2.2, 2.3, 2.1],
            "ctl": [3.0, 3.1, 2.9],
            "ctl_seed1": [2.3, 2.4, 2.2],
        }.items()
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    return path, rows


def test_pooled_and_pairwise_from_published_rows_and_from_a_runs_folder(tmp_path, capsys):
    path, rows = _rows(tmp_path)
    gfids = load_gfids(["dmd", "dmd_seed1", "ctl", "ctl_seed1"], results=path)
    pooled, pairs = compare(["dmd", "dmd_seed1"], ["ctl", "ctl_seed1"], gfids)
    assert pooled.a == (2.0, 2.1, 1.9, 2.2, 2.3, 2.1)
    assert pooled.gap == pytest.approx(2.65 - 2.1)
    # seed 0: 1.0 ahead (> 0.2): beyond; seed 1: 0.1 ahead (< 0.2): level
    assert [(x, y, c.a_beats_b) for x, y, c in pairs] == [
        ("dmd", "ctl", True),
        ("dmd_seed1", "ctl_seed1", False),
    ]
    # the same numbers from a runs folder's result.json files
    for row in rows:
        (tmp_path / "runs" / "arms" / row["key"]).mkdir(parents=True)
        (tmp_path / "runs" / "arms" / row["key"] / "result.json").write_text(json.dumps(row))
    assert load_gfids(["dmd", "ctl"], runs=tmp_path / "runs") == {
        "dmd": [2.0, 2.1, 1.9],
        "ctl": [3.0, 3.1, 2.9],
    }
    out = main(["dmd,dmd_seed1", "ctl,ctl_seed1", "--results", str(path)])
    assert out.a_beats_b == pooled.a_beats_b
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[2].startswith("A 2.100")
    assert "level by the rule" in printed[4]


def test_missing_arms_are_errors_naming_the_option(tmp_path, capsys):
    path, _ = _rows(tmp_path)
    with pytest.raises(SystemExit):
        main(["dmd", "nope", "--results", str(path)])
    assert "'nope' has no row in --results" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dmd", "ctl", "--runs", str(tmp_path / "empty")])
    assert "has not finished in --runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two sources of numbers: one would be ignored
        main(["dmd", "ctl", "--results", str(path), "--runs", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_another_generator_budget_reads_its_own_results(tmp_path, capsys):
    """``--generator_steps 1500`` reads ``result_steps1500.json`` from a runs folder and the
    1500-step rows of a published budget file, never the 600-step numbers."""
    _, rows = _rows(tmp_path)
    for row in rows:
        arm = tmp_path / "runs" / "arms" / row["key"]
        arm.mkdir(parents=True)
        (arm / "result.json").write_text(json.dumps(row))
        longer = row | {
            "generator_steps": 1500,
            "generators": [{"gfid": g["gfid"] / 2} for g in row["generators"]],
        }
        (arm / "result_steps1500.json").write_text(json.dumps(longer))
    runs = tmp_path / "runs"
    assert load_gfids(["dmd"], runs=runs, generator_steps=1500) == {"dmd": [1.0, 1.05, 0.95]}
    assert load_gfids(["dmd"], runs=runs) == {"dmd": [2.0, 2.1, 1.9]}
    budget = tmp_path / "budget.json"
    budget.write_text(
        json.dumps(
            [
                json.loads((runs / "arms" / r["key"] / "result_steps1500.json").read_text())
                for r in rows
            ]
            + [rows[0] | {"generator_steps": 3000, "generators": [{"gfid": 0.5}, {"gfid": 0.6}]}]
        )
    )
    assert load_gfids(["ctl"], results=budget, generator_steps=1500) == {"ctl": [1.5, 1.55, 1.45]}
    assert load_gfids(["dmd"], results=budget, generator_steps=3000) == {"dmd": [0.5, 0.6]}
    with pytest.raises(SystemExit):
        main(["dmd", "ctl", "--results", str(budget), "--generator_steps", "3000"])
    err = capsys.readouterr().err
    assert "'ctl' has no row in --results" in err and "--generator_steps 3000" in err
    out = main(["dmd", "ctl", "--runs", str(runs), "--generator_steps", "1500"])
    assert out.mean_a == pytest.approx(1.0) and out.mean_b == pytest.approx(1.5)
