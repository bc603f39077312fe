"""`make demo`'s driver end to end on the shipped Fashion-MNIST configs, shrunk to a few batches
each: every stage runs once and is skipped when its checkpoint exists, and the results table,
sample and reconstruction grids are written with finite, sane numbers."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import run_notebook

from dmvae_lightning import demo

REPO = Path(__file__).resolve().parents[1]


def shrink(config: dict) -> dict:
    """A shipped config cut to seconds: a few small batches, tiny data subsets."""
    trainer = config.setdefault("trainer", {})
    if "max_epochs" in trainer:  # base configs (overlays only rename outputs)
        trainer.update(max_epochs=1, limit_train_batches=5, limit_val_batches=1)
        trainer.update(enable_progress_bar=False, enable_model_summary=False)
    data = config.get("data", {}).get("init_args")
    if data is not None:
        data.update(batch_size=8, val_batch_size=16, num_workers=0)
        data.update(train_subset=80, val_subset=16)
    model = config.get("model", {}).get("init_args", {})
    if "stats_batches" in model:
        model["stats_batches"] = 2
    return config


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, fashion_mnist_root) -> Path:
    """The demo run once on shrunk copies of the shipped configs (restores the working dir)."""
    root = tmp_path_factory.mktemp("demo")
    src = REPO / "configs" / "fashion_mnist"
    for path in src.rglob("*.yaml"):
        out = root / "configs" / "fashion_mnist" / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(shrink(yaml.safe_load(path.read_text()))))
    cwd = os.getcwd()
    try:
        demo.main(["--root", str(root), "--eval_images", "40", "--scale", "1"])
    finally:
        os.chdir(cwd)
    return root


def test_demo_runs_every_stage_skips_and_reports(demo_root, capsys, monkeypatch):
    for stage in demo.STAGES:
        assert (demo_root / stage.checkpoint).is_file(), stage.name
    out = demo_root / "runs" / "fashion_mnist" / "demo"
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "PSNR" not in line]
    metrics = [line.split("|")[2:7] for line in rows[: len(demo.VARIANTS)]]
    assert len(metrics) == len(demo.VARIANTS)
    for variant, (psnr, rfid, gfid, mmd, swd) in zip(demo.VARIANTS, metrics, strict=True):
        assert 5.0 < float(psnr) < 60.0
        assert all(math.isfinite(float(v)) and float(v) >= -1e-6 for v in (rfid, gfid))
        if variant.aligned_space:
            assert math.isfinite(float(mmd)) and float(swd) >= 0
        else:  # the KL-VAE's latents share no coordinates with the reference
            assert mmd.strip() == swd.strip() == "n/a"
    for name in ("reconstructions.png", *(f"samples_{v.key}.png" for v in demo.VARIANTS)):
        assert (out / name).stat().st_size > 0

    monkeypatch.chdir(demo_root)  # demo.main changes directory; restored after the test
    first = (demo_root / demo.STAGES[0].checkpoint).stat().st_mtime_ns
    capsys.readouterr()
    demo.main(["--root", str(demo_root), "--eval_images", "40", "--scale", "1"])
    assert capsys.readouterr().out.count("exists, skipping") == len(demo.STAGES)
    assert (demo_root / demo.STAGES[0].checkpoint).stat().st_mtime_ns == first
    # a checkpoint trained at another scale is not silently reused
    with pytest.raises(RuntimeError, match="trained at --scale 1, this run asks for 0.1"):
        demo.main(["--root", str(demo_root), "--eval_images", "40"])


def test_demo_scales_every_stage_but_the_fid_net(tmp_path, monkeypatch):
    """Each stage runs the shipped configs with their budget times the demo scale as a last
    overlay (the CLI replaced by a stand-in that records its arguments and writes the
    checkpoint); the scale is recorded, and a checkpoint of another scale is refused."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    calls: dict[str, list[str]] = {}
    current: list[demo.Stage] = []

    def fake_fit(args: list[str]) -> None:
        assert args[0] == "fit" and args[1::2] == ["--config"] * (len(args) // 2)
        ckpt = tmp_path / current[-1].checkpoint
        calls[current[-1].checkpoint] = args[2::2]
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"")

    monkeypatch.setattr(demo, "cli_main", fake_fit)
    for stage in demo.STAGES:
        current.append(stage)
        demo.run_stage(stage, tmp_path, 0.1)
    budgets = {}
    for stage in demo.STAGES:
        ckpt = tmp_path / stage.checkpoint
        overlays = calls[stage.checkpoint]
        assert overlays[: len(stage.configs)] == [str(tmp_path / c) for c in stage.configs]
        if Path(stage.checkpoint).name != "fid_net.ckpt":  # the FID instrument is not scaled
            assert overlays[-1] == str(ckpt.with_suffix(".budget.yaml"))
            budgets[ckpt.name] = yaml.safe_load(Path(overlays[-1]).read_text())["trainer"]
        else:
            assert len(overlays) == len(stage.configs)
        assert float(ckpt.with_suffix(".scale").read_text()) == 0.1
    assert budgets["classifier.ckpt"] == {"limit_train_batches": 20}  # 200 x 0.1
    assert budgets["kl_vae.ckpt"] == {"limit_train_batches": 85}  # the overlay's 850, not 500
    assert budgets["align.ckpt"] == {"limit_train_batches": 100}
    assert budgets["diffusion_kl_vae.ckpt"] == {"max_steps": 120}
    with pytest.raises(RuntimeError, match="--scale 0.1"):
        demo.run_stage(demo.STAGES[0], tmp_path, 0.3)


def test_stage_budgets_of_the_shipped_configs():
    """What `--scale 1` trains, read from the shipped configs (later files of a stack win)."""
    stages = {Path(stage.checkpoint).name: stage for stage in demo.STAGES}
    budget = {name: demo.stage_budget(stage, REPO) for name, stage in stages.items()}
    assert budget["align.ckpt"] == {"limit_train_batches": 1000}
    assert budget["kl_vae.ckpt"] == {"limit_train_batches": 850}  # the overlay's, not 500
    assert budget["diffusion_kl_vae.ckpt"] == {"max_steps": 1200}
    assert demo.scaled_budget(stages["kl_vae.ckpt"], REPO, 0.3) == {"limit_train_batches": 255}
    assert demo.scaled_budget(stages["fid_net.ckpt"], REPO, 0.3) == {}
    assert demo.scaled_budget(stages["align.ckpt"], REPO, 1.0) == {}


def test_quickstart_notebook_runs_on_the_demo_checkpoints(demo_root, monkeypatch, capsys):
    """Every code cell of notebooks/quickstart.ipynb, in order, on the demo's checkpoints."""
    monkeypatch.setenv("DMVAE_ROOT", str(demo_root))
    monkeypatch.chdir(demo_root)
    run_notebook(REPO / "notebooks" / "quickstart.ipynb")
    printed = capsys.readouterr().out
    assert "-> latents (16, 4, 8, 8)" in printed
    assert "| tokenizer | PSNR (dB)" in printed


def test_a_stage_killed_after_an_epoch_end_save_is_resumed_not_reused(tmp_path, monkeypatch):
    """The ModelCheckpoint of a multi-epoch stage writes the stage's checkpoint at every epoch
    end: a demo killed then leaves a checkpoint that is not the finished stage. The next run
    resumes it with ``--ckpt_path`` (its ``.running`` marker says it never finished), at the
    scale it was started with; a finished stage is skipped."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    stage = demo.STAGES[0]
    ckpt = tmp_path / stage.checkpoint
    calls: list[list[str]] = []

    def killed_after_one_epoch(args: list[str]) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "cli_main", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        demo.run_stage(stage, tmp_path, 0.1)
    assert ckpt.is_file() and not ckpt.with_suffix(".scale").exists()
    with pytest.raises(RuntimeError, match="started at --scale 0.1, this run asks for 0.3"):
        demo.run_stage(stage, tmp_path, 0.3)

    def finishes(args: list[str]) -> None:
        calls.append(args)
        ckpt.write_bytes(b"finished")

    monkeypatch.setattr(demo, "cli_main", finishes)
    demo.run_stage(stage, tmp_path, 0.1)
    assert calls[-1][-2:] == ["--ckpt_path", str(ckpt)]
    assert float(ckpt.with_suffix(".scale").read_text()) == 0.1
    assert not ckpt.with_suffix(".running").exists()
    assert demo.run_stage(stage, tmp_path, 0.1) == 0.0 and len(calls) == 1  # finished: skipped
