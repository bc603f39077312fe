"""Every shell command shown in README.md and docs/*.md is checked, so none can rot: ``dmvae``
lines parse (``--print_config`` / ``--help``, nothing runs), ``python -m`` modules and scripts
exist, ``pip install`` extras and paths exist, ``make`` targets exist, ``sbatch`` templates
exist. A command of a kind this file does not know fails the test: teach it the new kind."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import tomllib

from dmvae_lightning.cli import ALIASES, COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def commands(page: Path) -> list[tuple[int, str, Path]]:
    """``(line, command, working directory)`` of each command in the page's shell blocks:
    comments dropped, backslash continuations joined, ``cd`` followed."""
    found, inside, cwd, pending, start = [], False, REPO, "", 0
    for number, raw in enumerate(page.read_text().splitlines(), 1):
        if not inside:
            if FENCE.match(raw.strip()):
                inside, cwd = True, REPO
            continue
        if raw.strip().startswith("```"):
            inside = False
            continue
        line = raw.split(" #")[0].rstrip() if " #" in raw else raw.rstrip()
        if not line.strip() or line.strip().startswith("#"):
            continue
        if not pending:
            start = number
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        if command.startswith("cd "):
            cwd = (cwd / command[3:].strip()).resolve()
            continue
        found.append((start, command, cwd))
    return found


ALL = [
    pytest.param(page, line, command, cwd, id=f"{page.name}:{line}")
    for page in PAGES
    for line, command, cwd in commands(page)
]


def test_pages_have_commands():
    assert len(ALL) > 30


def extras() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def module_exists(name: str, cwd: Path) -> bool:
    extra = [str(cwd / "src"), str(cwd)]
    sys.path[:0] = extra
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
    finally:
        del sys.path[: len(extra)]


@contextlib.contextmanager
def working_directory(path: Path):
    import os

    before = os.getcwd()
    os.chdir(path)
    sys.path[:0] = [str(path / "src")]
    try:
        yield
    finally:
        os.chdir(before)
        sys.path.remove(str(path / "src"))


def placeholders(command: str) -> str:
    """``<its .ckpt>`` and ``...`` stand for a path: any word will do for parsing."""
    command = re.sub(r"<[^>]*>", "placeholder.ckpt", command)
    return re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "placeholder.ckpt", command)


def check_dmvae(args: list[str], cwd: Path, capsys) -> None:
    if args and args[0] in ("import_public", "import-public"):
        with pytest.raises(SystemExit) as exc:
            main([*args[:2], "--help"])
        assert exc.value.code in (0, None)
        return
    if args and (args[0] in COMMANDS or args[0] in ALIASES):  # a tool: its --help must run
        with working_directory(cwd), pytest.raises(SystemExit) as exc:
            main([args[0], "--help"])
        assert exc.value.code in (0, None), capsys.readouterr().err[-2000:]
        return
    assert args and args[0] in ("fit", "validate", "test", "predict"), args
    with working_directory(cwd), pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err[-2000:]


def check_python(args: list[str], cwd: Path) -> None:
    if args[0] == "-m":
        assert module_exists(args[1], cwd), f"no module {args[1]}"
    else:
        assert (cwd / args[0]).is_file(), f"no script {args[0]}"


def check_pip(args: list[str], cwd: Path) -> None:
    assert args[:1] == ["install"], args
    for word in args[1:]:
        if word == "-e":
            continue
        match = re.fullmatch(r"(\.?[\w./-]*)(\[([\w,-]+)\])?", word)
        assert match, word
        path, names = match.group(1), match.group(3)
        assert (cwd / path / "pyproject.toml").is_file(), f"no package at {path}"
        if names:
            missing = set(names.split(",")) - extras()
            assert not missing, f"pyproject.toml has no extra {sorted(missing)}"


@pytest.mark.parametrize(("page", "line", "command", "cwd"), ALL)
def test_shown_command_is_valid(page, line, command, cwd, capsys):
    words = shlex.split(placeholders(command))
    while words and ENV.match(words[0]):
        words = words[1:]  # VAR=value prefixes
    program, args = words[0], words[1:]
    if program == "dmvae":
        check_dmvae(args, cwd, capsys)
    elif program == "python":
        check_python(args, cwd)
    elif program == "torchrun":
        assert "-m" in args and module_exists(args[args.index("-m") + 1], cwd)
    elif program == "pip":
        check_pip(args, cwd)
    elif program == "make":
        targets = {a for a in args if "=" not in a}  # VAR=value arguments are variables
        assert targets <= make_targets(), f"no make target {targets - make_targets()}"
    elif program.startswith("scripts/") and program.endswith(".sh"):
        assert (cwd / program).is_file() and os.access(cwd / program, os.X_OK), program
    elif program == "sbatch":
        scripts = [a for a in args if a.endswith(".sbatch")]
        assert scripts and all((cwd / s).is_file() for s in scripts), args
    else:
        pytest.fail(f"{page.name}:{line}: unknown command {program!r}; teach this test about it")
