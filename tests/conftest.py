"""Shared fixtures: every test runs offline, with a private TORCH_HOME, in its own working
directory (relative paths of shipped configs, e.g. ``runs/...``, land under tmp_path). The session
fails when it leaves new files in the repository tree (``git status --ignored`` before / after;
untracked and ignored entries only).
"""

from __future__ import annotations

import os
import subprocess
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


REPO = Path(__file__).resolve().parent.parent
# written by Python and the tools themselves, not by the code under test
_TOOL_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")
_STATUS_KEY = pytest.StashKey[set | None]()


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access, torch.hub / download caches under this test's tmp_path, and the working
    directory there too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


def _repo_status() -> set[str] | None:
    """``git status --porcelain --ignored`` lines of the repository (None outside a git
    checkout), without the tool caches."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "--untracked-files=all"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {  # new files only (untracked "??" or ignored "!!"): edits made during a run are not
        line  # the tests' doing
        for line in out.stdout.splitlines()
        if line[:2] in ("??", "!!")
        and not any(part in line for part in _TOOL_CACHES)
        and not line.endswith(".venv/")
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STATUS_KEY] = _repo_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_STATUS_KEY, None)
    after = _repo_status() if before is not None else None
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "tests wrote into the repository tree (git status): " + ", ".join(new), red=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
