"""`make demo`'s driver: runs each stage once, skips stages whose checkpoint exists, writes the
results table and the reconstruction grid."""

from __future__ import annotations

from pathlib import Path

import yaml

from dmvae_lightning import demo

TINY = Path(__file__).resolve().parent / "configs" / "tokenizer_tiny.yaml"


def test_demo_runs_skips_and_reports(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "logs")
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "tokenizer"},
        }
    ]
    cfg = tmp_path / "tokenizer.yaml"
    cfg.write_text(yaml.safe_dump(config))
    stage = demo.Stage("tokenizer", str(cfg), str(tmp_path / "ckpt" / "tokenizer.ckpt"))
    monkeypatch.setattr(demo, "STAGES", (stage,))

    demo.main(["--root", str(tmp_path), "--runs", "out"])
    ckpt = Path(stage.checkpoint)
    assert ckpt.is_file()
    first_mtime = ckpt.stat().st_mtime_ns
    table = (tmp_path / "out" / "fashion_mnist" / "demo" / "results.md").read_text()
    psnr = float(next(line for line in table.splitlines() if "val/psnr" in line).split("|")[2])
    assert 5.0 < psnr < 60.0
    assert (tmp_path / "out" / "fashion_mnist" / "demo" / "reconstructions.png").stat().st_size > 0

    capsys.readouterr()
    demo.main(["--root", str(tmp_path), "--runs", "out"])
    assert "exists, skipping" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == first_mtime
