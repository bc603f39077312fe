"""The reference study driver (``dmvae_lightning.study``): arms, shared stages, resume, report.

``--quick`` runs every stage for a few batches; the numbers are meaningless as results, but the
checks below are ones a broken pipeline fails: the KL arm's posterior KL is finite and positive,
an aligned arm's latents are closer to its reference than the weight-0 ablation's, every seed
trained its own generator, and a second run trains nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmvae_lightning import study
from dmvae_lightning.latents import LatentCache
from dmvae_lightning.study import driver
from dmvae_lightning.study.arms import QUICK_TRAINER
from dmvae_lightning.study.evaluation import CHUNK, in_chunks, linear_probe, seeded_indices

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_arm_loads_and_names_known_stages():
    arms = study.load_arms(ROOT / study.ARMS_DIR)
    keys = {a.key for a in arms}
    # the paper's Table 1 rows and Table 2 ablations are all there, each in its table
    table1 = {a.key for a in arms if a.table == 1}
    assert {"kl_vae_narrow", "ae_narrow", "stage1", "dmvae_supervised", "dmvae_ssl"} <= table1
    assert {"gaussian", "gmm", "sphere", "text", "diffusion_noise", "ablation"} <= table1
    assert {"dmd_w1", "dmd_w20", "cfg3", "cfg5", "scorenet_wide", "kl_vae", "ae"} <= keys - table1
    for arm in arms:
        assert arm.table in (1, 2)
        if arm.reference is not None:
            ref = study.REFERENCES[arm.reference]
            assert ref.tokenizer in study.SHARED and ref.model in study.SHARED
        if arm.ablation is not None:  # load_arms checks it exists and has the arm's seeds
            assert arm.ablation in keys
            assert next(a for a in arms if a.key == arm.ablation).stage_seeds == arm.stage_seeds
        for stage in arm.tokenizer:
            assert (ROOT / study.CONFIGS / stage["config"]).is_file()


def _arms_table_lists(rows: list[str], key: str) -> bool:
    """Whether a row of the docs' arms table names arm ``key``: as `` `key` ``, as its base arm
    with the seed suffix in the same row (`` `base` (and `_seed1`, `_seed2`) ``), or inside a
    range `` `base_seedA` ... `base_seedB` ``."""
    import re

    for row in rows:
        if f"`{key}`" in row:
            return True
        if (m := re.fullmatch(r"(.+)_seed(\d+)", key)) is None:
            continue
        base, n = m.group(1), int(m.group(2))
        if f"`{base}`" in row and f"`_seed{n}`" in row:
            return True
        for a, b in re.findall(
            rf"`{re.escape(base)}_seed(\d+)` \.\.\. `{re.escape(base)}_seed(\d+)`", row
        ):
            if int(a) <= n <= int(b):
                return True
    return False


def test_the_docs_arms_table_names_every_arm_file():
    """Every arm file has a row in docs/reference-study.md's arms table (arms added without
    one went unnoticed twice), and every arm the table names is a file."""
    import re

    text = (ROOT / "docs" / "reference-study.md").read_text()
    section = text.split("## The arms", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    keys = {a.key for a in study.load_arms(ROOT / study.ARMS_DIR)}
    missing = sorted(k for k in keys if not _arms_table_lists(rows, k))
    assert not missing, f"arms without a row in the docs' arms table: {missing}"
    named = {m for row in rows for m in re.findall(r"`([a-z0-9_]+)`", row.split(" | ")[0])}
    unknown = sorted(k for k in named if not k.startswith("_") and k not in keys)
    assert not unknown, f"the arms table names arms that have no file: {unknown}"
    assert not _arms_table_lists(
        ["| `cfg3_align_seed1` ... `cfg3_align_seed3` | x |"], "cfg3_align_seed4"
    )


def test_the_two_gmm_references_differ_only_in_tying_components_to_classes():
    """``gmm`` draws the image's class's component, ``gmm_free`` (the paper's, data-independent)
    one at random whatever the class; both are the same mixture (same centres)."""
    from dmvae_lightning.data.sources import Draw, build_source

    tied, free = (build_source(study.arms.SOURCES[k]) for k in ("gmm", "gmm_free"))
    assert torch.equal(tied.means, free.means)
    labels = torch.full((2000,), 3, dtype=torch.long)
    draws = {}
    for name, source in (("gmm", tied), ("gmm_free", free)):
        z, comp = source.draw(Draw(2000, torch.Generator().manual_seed(0), labels=labels))
        # nearest centre of each draw (centres ~ N(0, 1) in 256 dims, spread 0.5: unambiguous)
        nearest = torch.cdist(z.flatten(1), source.means.flatten(1)).argmin(1)
        assert torch.equal(nearest, comp)
        draws[name] = torch.bincount(nearest, minlength=10)
    assert draws["gmm"][3] == 2000
    # 10 equally likely components: each holds 200 +- 5 sd of its binomial count
    assert (draws["gmm_free"] - 200).abs().max() < 5 * math.sqrt(2000 * 0.1 * 0.9)
    assert study.REFERENCES["gmm_free"].model == "reference_gmm_free"


def test_arm_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nreference: nowhere\ntokenizer: []\n")
    with pytest.raises(ValueError, match="nowhere"):
        study.Arm.from_file(bad)
    bad.write_text("title: x\nreference: supervised\nmatching: 3\n")
    with pytest.raises(ValueError, match="unknown key"):
        study.Arm.from_file(bad)
    bad.write_text("title: x\nreference: null\ntokenizer: []\n")
    with pytest.raises(ValueError, match="from: scratch"):
        study.Arm.from_file(bad)
    bad.write_text(
        "title: x\nreference: supervised\ntokenizer:\n  - config: align.yaml\n"
        "    overlay: {seed_everything: 1}\n"
    )
    with pytest.raises(ValueError, match="model.init_args.seed and data.init_args.seed"):
        study.Arm.from_file(bad)
    for curve in ("{series: a}", "{series: a, vae_steps: 0}", "{series: '', vae_steps: 5}"):
        bad.write_text(f"title: x\nreference: supervised\ntokenizer: []\ncurve: {curve}\n")
        with pytest.raises(ValueError, match="curve is"):
            study.Arm.from_file(bad)
    with pytest.raises(ValueError, match="unknown arm"):
        study.load_arms(ROOT / study.ARMS_DIR, names=["no_such_arm"])
    bad.write_text("title: x\nreference: null\ntokenizer:\n  - config: tokenizer.yaml\n"
                   "    from: Scratch\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"tokenizer\[0\]\.from must be 'scratch'"):
        study.Arm.from_file(bad)


def _arm_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    """An arm folder laid out as configs/<data>/study/ (overlay and config files resolve
    against the real configs/fashion_mnist, linked beside it)."""
    data = tmp_path / "configs" / "fashion_mnist"
    data.mkdir(parents=True)
    for cfg in (ROOT / study.CONFIGS).glob("*.yaml"):
        (data / cfg.name).symlink_to(cfg)
    (data / "study").mkdir()
    for name, text in files.items():
        (data / "study" / f"{name}.yaml").write_text(text)
    return data / "study"


BASE_ARM = (
    'title: "base"\ntable: 2\norder: 1\nreference: supervised\nablation: ctl\ntokenizer:\n'
    "  - config: align.yaml\n    overlay: {model: {init_args: {matching_weight: 10.0}}}\n"
    "  - config: finetune.yaml\ngenerator: {steps: 5}\n"
)
CONTROL_ARM = (
    'title: "ctl"\ntable: 2\norder: 2\nreference: supervised\ntokenizer:\n'
    "  - config: align.yaml\n    overlay: {model: {init_args: {matching_weight: 0.0}}}\n"
    "  - config: finetune.yaml\n"
)


def test_extends_and_tokenizer_seed_give_the_same_arm_as_writing_it_out(tmp_path):
    """A seed arm written as ``extends`` + ``tokenizer_seed`` resolves to exactly the stages of
    the same arm written out by hand (the shipped seed arms are written the short way)."""
    folder = _arm_folder(
        tmp_path,
        {
            "base": BASE_ARM,
            "ctl": CONTROL_ARM,
            "base_seed4": 'extends: base\ntokenizer_seed: 4\ntitle: "seed 4"\nablation: ctl_seed4\n',
            "ctl_seed4": 'extends: ctl\ntokenizer_seed: 4\ntitle: "ctl 4"\norder: 3\n',
            "by_hand": (
                'title: "by hand"\ntable: 2\norder: 1\nreference: supervised\ntokenizer:\n'
                "  - config: align.yaml\n    overlay:\n"
                "      model: {init_args: {matching_weight: 10.0, seed: 4}}\n"
                "      data: {init_args: {seed: 4}}\n"
                "  - config: finetune.yaml\n"
                "    overlay: {model: {init_args: {seed: 4}}, data: {init_args: {seed: 4}}}\n"
                "generator: {steps: 5}\n"
            ),
        },
    )
    arms = {a.key: a for a in study.load_arms(folder)}
    short, by_hand = arms["base_seed4"], arms["by_hand"]
    assert short.tokenizer == by_hand.tokenizer
    assert short.stage_seeds == [(4, 4), (4, 4)]
    # inherited: table, order, reference, generator; replaced: title, ablation
    assert (short.table, short.order, short.reference) == (2, 1, "supervised")
    assert short.generator == {"steps": 5}
    assert (short.title, short.ablation) == ("seed 4", "ctl_seed4")
    assert arms["base"].stage_seeds == [(None, None), (None, None)]
    assert arms["ctl_seed4"].order == 3


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a": "extends: nowhere\n"}, "no nowhere.yaml beside it"),
        ({"a": "extends: b\n", "b": "extends: a\n"}, "circle: a -> b -> a"),
        ({"a": "tokenizer_seed: one\n"}, "tokenizer_seed is an integer"),
        (  # the overlay's own seed and tokenizer_seed disagree
            {"a": BASE_ARM.replace("matching_weight: 10.0", "seed: 2") + "tokenizer_seed: 3\n"},
            "disagree",
        ),
        (  # a seed arm that kept its base's title
            {"base": BASE_ARM, "ctl": CONTROL_ARM, "b": "extends: base\ntokenizer_seed: 1\n"},
            "title 'base' is also",
        ),
        (  # a seed arm that kept its base's seed-0 control
            {
                "base": BASE_ARM,
                "ctl": CONTROL_ARM,
                "b": "extends: base\ntokenizer_seed: 1\ntitle: b\n",
            },
            "its ablation 'ctl' under",
        ),
        ({"base": BASE_ARM}, "ablation 'ctl' is not an arm file"),
    ],
)
def test_arm_folder_errors_name_the_problem(tmp_path, files, message):
    folder = _arm_folder(tmp_path, files)
    with pytest.raises(ValueError, match=message):
        study.load_arms(folder)


def test_cli_table_selects_one_tables_arms(capsys):
    """``--list --table N`` prints exactly the arms whose files say ``table: N``; a selection
    with none of them is an error naming --table."""
    from dmvae_lightning.study.cli import main

    arms = study.load_arms(ROOT / study.ARMS_DIR)
    for table in (1, 2):
        main(["--root", str(ROOT), "--list", "--table", str(table)])
        listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        assert listed == [a.key for a in arms if a.table == table]
    main(["--root", str(ROOT), "--list", "--table", "1", "--arms", "cfg3,kl_vae_narrow"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["kl_vae_narrow"]
    with pytest.raises(SystemExit):
        main(["--root", str(ROOT), "--list", "--table", "2", "--arms", "kl_vae_narrow"])
    assert "--table 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--root", str(ROOT), "--list", "--generator_steps", "-5"])
    assert "--generator_steps must be >= 0" in capsys.readouterr().err


def test_cli_names_the_option_of_a_bad_arm_seed_or_root(capsys, tmp_path):
    """A misspelt arm, a seed that is not an integer or repeats, and a ``--root`` without arm
    files are argparse errors (exit 2) naming the option, not tracebacks or empty studies."""
    from dmvae_lightning.study.cli import main

    arms = ["--arms", "kl_vae,klvae_narow"]  # the error names the unknown one, with a match
    cases = [
        (arms, ["--arms", "'klvae_narow'", "kl_vae_narrow", "--list"], ["'kl_vae'"]),
        (["--seeds", "0,a"], ["--seeds", "'0,a'"], []),
        (["--seeds", "0,1,0"], ["--seeds", "each seed once"], []),
        (["--arms", "kl_vae", "--root", str(tmp_path)], ["--root", str(tmp_path)], []),
    ]
    for argv, words, absent in cases:
        argv = ["--root", str(ROOT), "--list", *argv]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words) and not any(w in err for w in absent), err
    main(["--root", str(ROOT), "--list", "--arms", "kl_vae", "--seeds", "3,1"])
    assert capsys.readouterr().out.split()[0] == "kl_vae"


def test_a_runs_folder_holds_a_quick_or_a_full_study_not_both(tmp_path, capsys):
    """A full study in a --quick study's folder would read back its 30-batch stages and
    256-image results as its own: refused (and the reverse), naming --runs."""
    from dmvae_lightning.study.cli import main

    study.Study(tmp_path / "q", root=ROOT, quick=True, log=lambda _: None)
    study.Study(tmp_path / "q", root=ROOT, quick=True, log=lambda _: None)  # same mode: fine
    with pytest.raises(ValueError, match="holds a --quick study and this is a full one"):
        study.Study(tmp_path / "q", root=ROOT, quick=False, log=lambda _: None)
    study.Study(tmp_path / "f", root=ROOT, log=lambda _: None)
    argv = ["--root", str(ROOT), "--runs", str(tmp_path / "f"), "--arms", "kl_vae", "--quick"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"--runs {tmp_path / 'f'} holds a full study" in capsys.readouterr().err


def test_summary_is_mean_and_sample_std():
    rows = [{"seed": s, "gfid": g, "eval_seconds": 60.0 + s} for s, g in enumerate([1.0, 2.0, 4.0])]
    s = study.summarize(rows)
    assert set(s) == {"gfid_mean", "gfid_std"}  # wall time and seed are not metrics
    assert s["gfid_mean"] == pytest.approx(7 / 3)
    assert s["gfid_std"] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    centers = torch.randn(3, 16, generator=g) * 3
    z = centers[y] + torch.randn(600, 16, generator=g)
    assert study.linear_probe(z[:400], y[:400], z[400:], y[400:]) > 0.95
    noise = torch.randn(600, 16, generator=g)
    assert study.linear_probe(noise[:400], y[:400], noise[400:], y[400:]) < 0.5


def test_quick_study_end_to_end_and_resume(tmp_path, fashion_mnist_root, monkeypatch):
    """The first run is parallel (two worker processes); the resume below is sequential."""
    arms = ["kl_vae_narrow", "gaussian", "ablation"]  # Table 1 rows
    runs = tmp_path / "study"
    report = study.main(
        ["--quick", "--runs", str(runs), "--root", str(ROOT), "--seeds", "0,1", "--jobs", "2"]
        + ["--arms", ",".join(arms)]
    )
    assert report["jobs"] == 2
    # every unit ran in its own worker, which logged its stages
    logs = {p.name for p in (runs / "logs").glob("*.log")}
    assert {
        "arm_kl_vae_narrow.log",
        "seed_gaussian_1.log",
        "shared_tokenizer_supervised.log",
    } <= logs
    assert "fit tokenizer.yaml" in (runs / "logs" / "arm_kl_vae_narrow.log").read_text()
    rows = {r["key"]: r for r in report["arms"]}
    assert list(rows) == arms  # table order
    for key, row in rows.items():
        gens = row["generators"]
        assert [g["seed"] for g in gens] == [0, 1]
        for g in gens:
            assert math.isfinite(g["gfid"]) and g["gfid"] > 0
            assert 1.0 - 1e-9 <= g["is"] <= 10.0  # Inception-style score over 10 classes
            assert math.isfinite(g["fm_loss"]) and g["fm_loss"] > 0
        assert gens[0]["gfid"] != gens[1]["gfid"]  # two generators, not one evaluated twice
        assert (runs / "arms" / key / "generator_seed1.ckpt").is_file()
        tok = row["tokenizer"]
        assert 0.0 <= tok["probe_acc"] <= 1.0 and tok["psnr"] > 5
    kl = rows["kl_vae_narrow"]["tokenizer"]["posterior_kl"]
    assert math.isfinite(kl) and kl > 0
    assert "posterior_kl" not in rows["ablation"]["tokenizer"]
    # the aligned arm sits closer to its reference than the weight-0 ablation's latents do
    tok = rows["gaussian"]["tokenizer"]
    assert tok["swd"] < tok["ablation_swd"] and tok["mmd"] < tok["ablation_mmd"], tok
    # stages shared between arms were trained once
    shared = sorted(p.name for p in (runs / "shared").glob("*.ckpt"))
    assert shared == [
        "classifier.ckpt",
        "fid_net.ckpt",
        "reference_gaussian.ckpt",
        "reference_supervised.ckpt",
        "tokenizer_supervised.ckpt",
    ]
    for name in shared:  # ... by one process: one TensorBoard run each (a second: version_1)
        assert [v.name for v in (runs / "tb" / "shared" / name[:-5]).iterdir()] == ["version_0"]
    md = (runs / "study.md").read_text()
    assert "### Table 1" in md and md.count("| DMVAE") == 1 and " ± " in md
    kl_line = next(line for line in md.splitlines() if "(`kl_vae_narrow`)" in line)
    seeds = [f"{g['gfid']:.2f}" for g in rows["kl_vae_narrow"]["generators"]]
    assert f"| {', '.join(seeds)} |" in kl_line  # the per-seed gFIDs next to mean ± std
    saved = json.loads((runs / "study.json").read_text())
    # every shared stage's wall time, also those trained before the arm that reports them
    assert set(saved["shared_seconds"]) == {f"shared/{name[:-5]}" for name in shared}
    assert min(saved["shared_seconds"].values()) > 0
    assert [r["key"] for r in saved["arms"]] == arms
    # the reference score model's fit on held-out stage-1 latents (data references only)
    assert set(saved["references"]) == {"supervised"}
    quality = saved["references"]["supervised"]
    assert math.isfinite(quality["fm_loss"]) and 0 < quality["fm_loss"] < 2.5
    assert quality["steps"] == QUICK_TRAINER["reference"]
    assert "Reference score models" in md and "supervised " in md
    for fig in ("gfid.png", "psnr_vs_gfid.png", "latent_pca.png"):
        assert (runs / "figures" / fig).stat().st_size > 1000
    assert any((runs / "tb" / "summary").iterdir())

    # resumable: a finished study trains nothing again; a lost seed result retrains one generator
    (runs / "arms" / "gaussian" / "result.json").unlink()
    (runs / "arms" / "gaussian" / "generator_seed1.json").unlink()
    (runs / "arms" / "gaussian" / "generator_seed1.ckpt").unlink()
    again = study.Study(runs, root=ROOT, seeds=[0, 1], quick=True)
    again.run(study.load_arms(ROOT / study.ARMS_DIR, names=arms))
    assert list(again.timings) == ["gaussian/generator_seed1"]
    # the FID statistics of the test images were computed by the workers once per FID net and
    # read back here: the same numbers as computing them again
    assert len(list((runs / "shared" / "fid_stats").glob("*.npz"))) == 1
    assert (again.stats_cache.hits, again.stats_cache.misses) == (1, 0)
    fresh = again.fid_features().stats(again.eval_set()[0])
    assert torch.equal(again.real_stats().mu, fresh.mu)
    assert torch.equal(again.real_stats().sigma, fresh.sigma)
    # the stages read back still count in the arm's time (their .seconds files)
    resumed = json.loads((runs / "arms" / "gaussian" / "result.json").read_text())
    assert {"gaussian/0_align", "gaussian/1_finetune", "gaussian/generator_seed0"} <= set(
        resumed["timings"]
    )
    assert resumed["stage_seconds"] >= sum(resumed["timings"].values()) > 0

    # another generator budget in the same folder trains generators only, on the same
    # tokenizer and caches, into files named by the budget; the default's stay as they were
    default_result = (runs / "arms" / "gaussian" / "result.json").read_text()
    longer = study.Study(runs, root=ROOT, seeds=[0], quick=True, generator_steps=1500)
    longer_report = longer.run(study.load_arms(ROOT / study.ARMS_DIR, names=["gaussian"]))
    assert list(longer.timings) == ["gaussian/generator_steps1500_seed0"]
    longer_row = json.loads((runs / "arms" / "gaussian" / "result_steps1500.json").read_text())
    assert longer_row["generator_steps"] == 1500 and longer_row["seeds"] == [0]
    assert longer_row["tokenizer"] == resumed["tokenizer"]
    assert [r["key"] for r in longer_report["arms"]] == ["gaussian"]
    assert (runs / "arms" / "gaussian" / "result.json").read_text() == default_result
    assert (runs / "study_steps1500.md").is_file() and (runs / "figures_steps1500").is_dir()
    assert json.loads((runs / "study.json").read_text())["generator_steps"] == 600

    # the diffusion-noise reference reads the stage-1 latents from a latent cache encoded once
    # (no encoder pass per batch): z_t = 0.5 z + 0.5 eps has mean 0.5 E[z], var 0.25 Var z + 0.25
    z_t = again.reference_samples("diffusion_noise")
    bank, _ = LatentCache(runs / "shared" / "latents_tokenizer_supervised").as_tensors()
    assert bank.shape[1:] == z_t.shape[1:] == (4, 8, 8)
    assert float(z_t.mean()) == pytest.approx(0.5 * float(bank.mean()), abs=0.02)
    assert float(z_t.var()) == pytest.approx(0.25 * float(bank.var()) + 0.25, rel=0.05)
    assert "shared/latents_tokenizer_supervised" in again.stage_seconds

    # the generator's FM loss reads the test latents from the arm's cache: same numbers as
    # encoding them again; a cache of another arm's tokenizer is refused
    gen_ckpt = runs / "arms" / "gaussian" / "generator_seed0.ckpt"
    cached = again.evaluate_generator(gen_ckpt, 0, runs / "arms" / "gaussian" / "latents" / "val")
    encoded = again.evaluate_generator(gen_ckpt, 0)
    assert cached["fm_loss"] == pytest.approx(encoded["fm_loss"], rel=1e-5)
    assert cached["fm_loss"] == pytest.approx(rows["gaussian"]["generators"][0]["fm_loss"])
    with pytest.raises(ValueError, match="is not the tokenizer"):
        again.evaluate_generator(gen_ckpt, 0, runs / "arms" / "ablation" / "latents" / "val")

    # the tokenizer evaluation reads the arm's latents from its cache (the evaluation images,
    # the probe's and the distances' training rows) instead of encoding the images again: no
    # pass of the arm's encoder, and the numbers of encoding them
    tok_ckpt = Path(rows["gaussian"]["tokenizer"]["checkpoint"])
    cache = runs / "arms" / "gaussian" / "latents"
    own_encodes: list[int] = []
    load = driver.load_tokenizer

    def counting_load(ckpt):
        tok = load(ckpt)
        if Path(ckpt) == tok_ckpt:
            encode = tok.encode
            tok.encode = lambda x: own_encodes.append(x.shape[0]) or encode(x)
        return tok

    monkeypatch.setattr(driver, "load_tokenizer", counting_load)
    result = again.evaluate_tokenizer(again.arm("gaussian"), tok_ckpt, cache)
    assert own_encodes == []
    tok = load(tok_ckpt)
    x, y = again.eval_set()
    z = in_chunks(tok.encode, x)
    torch.testing.assert_close(again.eval_latents(cache / "val", tok_ckpt), z)
    assert result["latent_std"] == pytest.approx(float(z.std()), rel=1e-5)
    train_x, train_y = again.images("train")
    picked = seeded_indices(len(LatentCache(cache / "train")), again.sizes["probe_train"], 7)
    probe = linear_probe(in_chunks(tok.encode, train_x[picked]), train_y[picked], z, y)
    assert result["probe_acc"] == pytest.approx(probe, abs=2 / len(y))
    picked = seeded_indices(len(LatentCache(cache / "train")), again.sizes["distance"], 99)
    distances = again.distances(in_chunks(tok.encode, train_x[picked]), "gaussian")
    assert result["mmd"] == pytest.approx(distances["mmd"], rel=1e-4)
    assert result["swd"] == pytest.approx(distances["swd"], rel=1e-4)
    # the training rows are taken by position: a cache of other images is refused
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "val").symlink_to(cache / "val")
    (swapped / "train").symlink_to(cache / "val")
    with pytest.raises(ValueError, match="is not of the training images"):
        again.evaluate_tokenizer(again.arm("gaussian"), tok_ckpt, swapped)


def test_chunked_passes_equal_one_batched_pass_bit_for_bit():
    """The study encodes and decodes in chunks of CHUNK rows (to keep a ch-32 encoder's
    activations under tune_malloc's mmap threshold); with one torch thread (a study worker's)
    its latents and reconstructions must be those of one call over all rows, to the last bit,
    so the chunk size moves no result. (With more threads oneDNN splits the work by batch
    size, and a few rows may differ in the last bits, as between thread counts.)"""
    from dmvae_lightning.modules.dmvae import DMVAEModule

    torch.manual_seed(0)
    tok = DMVAEModule(
        stage="pretrain",
        image_channels=1,
        latent_channels=4,
        encoder={"name": "conv", "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
        bottleneck_hidden=128,
        bottleneck_gaussian=True,
        decoder={"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "mid_attention": False},
    ).tokenizer.eval()
    x = torch.rand(CHUNK + 37, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            z = tok.encode(x)
            rec = tok.decode(z)
        assert CHUNK < len(x)  # two chunks, the second a partial one
        assert torch.equal(in_chunks(tok.encode, x), z)
        assert torch.equal(in_chunks(tok.decode, z), rec)
    finally:
        torch.set_num_threads(threads)


def test_latent_distances_grow_with_the_shift_and_leave_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 4, 2, 2, generator=g)
    same = torch.randn(400, 4, 2, 2, generator=g)
    state = torch.random.get_rng_state()
    near = study.latent_distances(same, ref)
    far = study.latent_distances(same + 1.0, ref)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert abs(near["mmd"]) < 0.01 and far["mmd"] > 10 * max(near["mmd"], 1e-3)
    # SW2^2 of a shift by 1 in every one of 16 coordinates: E[(theta . 1)^2] = 1 per direction
    assert 0.7 < far["swd"] - near["swd"] < 1.3
    assert study.latent_distances(same, ref) == near  # seeded: the same numbers again


def test_flow_matching_loss_of_the_optimal_velocity_is_the_closed_form_minimum():
    # data x ~ N(0, 1) per element, x_t = t x + (1 - t) eps, target v = x - eps: the best
    # predictor is E[v | x_t] = (2t - 1) / (t^2 + (1 - t)^2) x_t and its loss integrates
    # 2 - (2t - 1)^2 / (t^2 + (1 - t)^2) over t ~ U[0, 1]; a zero predictor scores 2
    import contextlib

    class Stub:
        def __init__(self, optimal: bool):
            self.optimal = optimal

        def ema_scope(self):
            return contextlib.nullcontext()

        def dit(self, x_t, t, y):
            t = t.view(-1, 1, 1, 1)
            gain = (2 * t - 1) / (t**2 + (1 - t) ** 2)
            return gain * x_t if self.optimal else torch.zeros_like(x_t)

    z = torch.randn(20000, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(20000, dtype=torch.long)
    grid = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    expected = float((2 - (2 * grid - 1) ** 2 / (grid**2 + (1 - grid) ** 2)).mean())
    best = study.flow_matching_loss(Stub(True), z, y)
    assert best == pytest.approx(expected, rel=0.02)
    assert study.flow_matching_loss(Stub(False), z, y) == pytest.approx(2.0, rel=0.02)
    assert best < 2.0 - 0.3  # the closed form is pi / 2: the check separates the two


def test_a_stage_checkpoint_without_its_seconds_is_resumed_not_taken_as_finished(
    tmp_path, monkeypatch
):
    """A multi-epoch stage's ModelCheckpoint writes the stage checkpoint at every epoch end, so
    a study killed mid-stage leaves one behind. Only ``<ckpt>.seconds`` (written when the fit
    has returned) marks a finished stage: without it the next run resumes the checkpoint with
    ``--ckpt_path``; with it the stage is skipped."""
    import dmvae_lightning.cli

    runs = tmp_path / "runs"
    s = study.Study(runs, root=ROOT, seeds=[0], quick=True, log=lambda _: None)
    ckpt = runs / "arms" / "x" / "tokenizer_0_align.ckpt"
    ckpt.parent.mkdir(parents=True)
    # an epoch-end save whose Timer state says 1000 s of training went into it
    torch.save({"callbacks": {"Timer": {"time_elapsed": {"train": 1000.0}}}}, ckpt)
    calls: list[list[str]] = []

    def fit(args: list[str]) -> None:
        calls.append(args)
        ckpt.write_bytes(b"finished")

    monkeypatch.setattr(dmvae_lightning.cli, "main", fit)
    seconds = s._fit("align.yaml", {}, ckpt, "arms/x/align", None)
    assert len(calls) == 1 and calls[0][-2:] == ["--ckpt_path", str(ckpt)]
    # the interrupted piece's seconds are added to this (instant) one's
    assert 1000.0 <= seconds < 1010.0
    assert float(s.seconds_file(ckpt).read_text()) == pytest.approx(seconds, abs=0.1)
    assert s._fit("align.yaml", {}, ckpt, "arms/x/align", None) == 0.0 and len(calls) == 1
    # a stage with no checkpoint yet starts from scratch
    fresh = ckpt.with_name("tokenizer_1_finetune.ckpt")

    def fit_fresh(args: list[str]) -> None:
        calls.append(args)
        fresh.write_bytes(b"done")

    monkeypatch.setattr(dmvae_lightning.cli, "main", fit_fresh)
    s._fit("finetune.yaml", {}, fresh, "arms/x/finetune", None)
    assert "--ckpt_path" not in calls[-1]


def test_trained_seconds_reads_lightnings_timer_from_a_real_checkpoint_and_adds_up_pieces(
    tmp_path,
):
    """The study's stages carry Lightning's ``Timer``; its state in an epoch-end checkpoint is
    what ``trained_seconds`` reads. A fit resumed from that checkpoint continues the count, so
    the second save holds both pieces' seconds."""
    import time

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from dmvae_lightning.study.driver import trained_seconds

    class Slow(Callback):  # 0.05 s per batch: elapsed seconds well above timer noise
        def on_train_batch_end(self, *args, **kwargs):
            time.sleep(0.05)

    def fit(epochs: int, ckpt_path: str | None) -> None:
        trainer = Trainer(
            max_epochs=epochs,
            limit_train_batches=4,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[
                ModelCheckpoint(dirpath=tmp_path, filename="stage", enable_version_counter=False),
                Timer(),
                Slow(),
            ],
        )
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)

    ckpt = tmp_path / "stage.ckpt"
    fit(1, None)
    first = trained_seconds(ckpt)
    assert first >= 4 * 0.05
    fit(2, str(ckpt))  # the second epoch, resumed
    both = trained_seconds(ckpt)
    assert both >= first + 4 * 0.05
    # a checkpoint written without the Timer reads as 0 s, not as an error
    torch.save({"callbacks": {}}, tmp_path / "old.ckpt")
    assert trained_seconds(tmp_path / "old.ckpt") == 0.0
