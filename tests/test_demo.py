"""`make demo`'s driver end to end on the shipped Fashion-MNIST configs, shrunk to a few batches
each: every stage runs once and is skipped when its checkpoint exists, and the results table,
sample and reconstruction grids are written with finite, sane numbers."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

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


def test_demo_runs_every_stage_skips_and_reports(tmp_path, capsys, monkeypatch, fashion_mnist_root):
    monkeypatch.chdir(tmp_path)  # demo.main changes directory; restored after the test
    src = REPO / "configs" / "fashion_mnist"
    for path in src.rglob("*.yaml"):
        out = tmp_path / "configs" / "fashion_mnist" / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(shrink(yaml.safe_load(path.read_text()))))

    demo.main(["--root", str(tmp_path), "--eval_images", "40"])
    for stage in demo.STAGES:
        assert (tmp_path / stage.checkpoint).is_file(), stage.name
    out = tmp_path / "runs" / "fashion_mnist" / "demo"
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "PSNR" not in line]
    metrics = [line.split("|")[2:7] for line in rows[: len(demo.VARIANTS)]]
    assert len(metrics) == len(demo.VARIANTS)
    for psnr, rfid, gfid, mmd, swd in metrics:
        assert 5.0 < float(psnr) < 60.0
        assert all(math.isfinite(float(v)) and float(v) >= -1e-6 for v in (rfid, gfid, swd))
        assert math.isfinite(float(mmd))
    for name in ("reconstructions.png", *(f"samples_{v.key}.png" for v in demo.VARIANTS)):
        assert (out / name).stat().st_size > 0

    first = (tmp_path / demo.STAGES[0].checkpoint).stat().st_mtime_ns
    capsys.readouterr()
    demo.main(["--root", str(tmp_path), "--eval_images", "40"])
    assert capsys.readouterr().out.count("exists, skipping") == len(demo.STAGES)
    assert (tmp_path / demo.STAGES[0].checkpoint).stat().st_mtime_ns == first
