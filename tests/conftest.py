"""Shared fixtures: every test runs offline with a private TORCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import checkpoints

from dmvae_lightning.cli import main
from dmvae_lightning.data.images import FASHION_MNIST_DEFAULT_ROOT

# huggingface_hub reads this when first imported (e.g. by timm inside a test module), which
# happens before any fixture runs; without it every missing file costs ~30 s of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access, and torch.hub / download caches under this test's tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """Folder with the real Fashion-MNIST idx files (Debian package `dataset-fashion-mnist`)."""
    root = Path(FASHION_MNIST_DEFAULT_ROOT)
    missing = [name for name in FASHION_MNIST_FILES if not (root / name).is_file()]
    if missing:
        pytest.skip(
            f"Fashion-MNIST missing {missing} in {root}: apt-get install dataset-fashion-mnist"
        )
    return root


@pytest.fixture(scope="session")
def stage_ckpts(tmp_path_factory, fashion_mnist_root) -> dict[str, str]:
    """Stage-1 tokenizer (tests/configs/tokenizer_tiny.yaml, latents 4 x 16 x 16) and stage-2
    reference model (tests/configs/diffusion_tiny.yaml) checkpoints, trained once per session for
    the alignment tests: ``{"tokenizer": path, "reference": path}``."""
    configs = Path(__file__).resolve().parent / "configs"
    root = tmp_path_factory.mktemp("stages")
    common = ["--trainer.max_epochs", "1", "--trainer.logger", "false"]
    main(
        ["fit", "--config", str(configs / "tokenizer_tiny.yaml")]
        + ["--trainer.default_root_dir", str(root / "tok"), *common]
    )
    tokenizer = str(checkpoints(root / "tok")[-1])
    main(
        ["fit", "--config", str(configs / "diffusion_tiny.yaml")]
        + ["--trainer.default_root_dir", str(root / "ref"), *common]
        + ["--model.init_args.tokenizer_ckpt", tokenizer]
    )
    return {"tokenizer": tokenizer, "reference": str(checkpoints(root / "ref")[-1])}
