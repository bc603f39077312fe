"""The package's layers run one way and its modules import each other without cycles.

Imports are read with ``ast`` from every source file, function-level and ``TYPE_CHECKING``
imports included (a lazy import is still a dependency), so the rule holds for what a reader of
the code sees, not only for what Python happens to run first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dmvae_lightning

ROOT = Path(dmvae_lightning.__file__).parent
PACKAGE = "dmvae_lightning"

#: Layer of each top-level name (a module or subpackage); a module may import its own layer or a
#: lower one. 0: torch-only helpers; 1: networks; 2: reading checkpoints into networks; 3: what
#: takes plain modules and tensors (data, losses, metrics, latent caches); 4: Lightning modules,
#: callbacks and what builds them; 5: entry points.
LAYERS = {
    "utils": 0,
    "flow": 0,
    "distributed": 0,
    "ema": 0,
    "plots": 0,
    "nonfinite": 0,
    "nets": 1,
    "checkpoints": 2,
    "data": 3,
    "losses": 3,
    "metrics": 3,
    "latents": 3,
    "modules": 4,
    "callbacks": 4,
    "strategies": 4,
    "sampling": 4,
    "interop": 4,
    "convert": 5,
    "cli": 5,
    "demo": 5,
    "toy2d": 5,
    "study": 5,
    "": 6,  # the package's __init__: the public API, imports everything
}
#: What the issue tracker's rule forbids outright (independent of the numbers above).
FORBIDDEN = {
    "nets": {"modules", "callbacks", "cli"},
    "flow": {"modules", "callbacks", "cli"},
    "losses": {"modules", "callbacks", "cli"},
    "metrics": {"modules", "callbacks", "cli"},
    "data": {"modules", "callbacks", "cli"},
}


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (``from pkg import mod`` counts as ``mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    found.discard(name)
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({_top(m) for m in _modules()} - set(LAYERS))
    assert not unplaced, f"give these a layer in tests/test_layers.py: {unplaced}"


def test_imports_run_one_way():
    graph = _graph()
    upward = [
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if LAYERS[_top(dst)] > LAYERS[_top(src)] or _top(dst) in FORBIDDEN.get(_top(src), ())
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The parser catches what the rule is about: a lazy import inside a function, and a
    relative import, both resolved to project modules."""
    pkg = tmp_path / PACKAGE / "losses"
    pkg.mkdir(parents=True)
    file = pkg / "x.py"
    file.write_text(
        "from ..nets import dit\n"
        "def f():\n    from dmvae_lightning.modules.dmvae import DMVAEModule\n    return 1\n"
    )
    known = {f"{PACKAGE}.nets.dit", f"{PACKAGE}.modules.dmvae", f"{PACKAGE}.losses.x"}
    found = _imports(f"{PACKAGE}.losses.x", file, known)
    assert found == {f"{PACKAGE}.nets.dit", f"{PACKAGE}.modules.dmvae"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_name_no_lightning_module_package(layer):
    """The issue's grep: no text import of ``dmvae_lightning.modules`` and no
    ``from dmvae_lightning import`` in nets, flow, losses, metrics or data."""
    paths = [ROOT / f"{layer}.py"] if (ROOT / f"{layer}.py").exists() else []
    paths += sorted((ROOT / layer).rglob("*.py")) if (ROOT / layer).is_dir() else []
    assert paths
    for path in paths:
        text = path.read_text()
        assert "dmvae_lightning.modules" not in text, path
        assert "from dmvae_lightning import" not in text, path
