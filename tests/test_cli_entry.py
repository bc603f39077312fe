"""The ``dmvae`` console script: short error messages, parse errors leading with the useful
line, and one entry point for every tool of the package."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

from dmvae_lightning.cli import ALIASES, COMMANDS, console, main, root_cause, summarize_parse_error

CONFIGS = Path(__file__).resolve().parent / "configs"


@pytest.fixture()
def truncated(tmp_path) -> Path:
    """The first 2 kB of a real torch checkpoint (an interrupted copy)."""
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "hyper_parameters": {}}, full)
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(full.read_bytes()[:2048])
    return cut


def _error_block(capsys, argv: list[str]) -> list[str]:
    """Run the console script on ``argv``; its exit status must be 1 and stderr must hold no
    traceback. Returns the lines from the ``error:`` line on."""
    with pytest.raises(SystemExit) as exc:
        console(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union subtypes" not in err, err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    return lines[start:]


def _fit(config: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / config),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        *extra,
    ]


@pytest.mark.parametrize(
    ("config", "option", "flag"),
    [
        (
            "tokenizer_tiny.yaml",
            "model.init_args.init_from",
            ["--model.init_args.stage", "finetune", "--model.init_args.init_from"],
        ),
        (
            "diffusion_tiny.yaml",
            "model.init_args.tokenizer_ckpt",
            ["--model.init_args.tokenizer_ckpt"],
        ),
        (
            "align_tiny.yaml",
            "DMDLoss.real_model",
            ["--model.init_args.matching_loss.init_args.real_model"],
        ),
    ],
)
def test_corrupt_checkpoint_is_a_short_message(
    capsys, tmp_path, truncated, fashion_mnist_root, config, option, flag
):
    argv = _fit(config, tmp_path, *flag, str(truncated))
    if config == "align_tiny.yaml":  # a stage-1 file is needed too; the real model fails first
        argv += ["--model.init_args.init_from", str(truncated)]
    block = _error_block(capsys, argv)
    assert len(block) <= 5, block
    assert option in block[0] and str(truncated) in block[0], block
    assert "truncated or corrupt" in block[0]


def test_debug_flag_shows_the_traceback(monkeypatch, tmp_path, truncated, fashion_mnist_root):
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "")  # console sets it: restored (unset) after
    monkeypatch.delenv("JSONARGPARSE_DEBUG")
    argv = _fit("tokenizer_tiny.yaml", tmp_path, "--model.init_args.stage", "finetune")
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        console([*argv, "--model.init_args.init_from", str(truncated), "--debug"])
    assert isinstance(err.value.__cause__, (OSError, RuntimeError))  # torch's own error


def test_in_process_main_raises_the_root_cause(tmp_path, truncated, fashion_mnist_root):
    """main([...]) raises the loader's error itself, not jsonargparse's Union wrapper."""
    argv = _fit("tokenizer_tiny.yaml", tmp_path, "--model.init_args.stage", "finetune")
    with pytest.raises(ValueError) as err:
        main([*argv, "--model.init_args.init_from", str(truncated)])
    assert str(err.value).startswith("model.init_args.init_from: ")
    assert root_cause(err.value) is err.value


def test_exploding_run_is_a_short_message(capsys, tmp_path, fashion_mnist_root):
    argv = _fit("tokenizer_tiny.yaml", tmp_path, "--model.init_args.lr", "1e6")
    block = _error_block(capsys, [*argv, "--model.init_args.grad_clip", "0"])
    assert len(block) <= 5, block
    assert block[0].startswith("error: batch ") and "generator step" in block[0]


def test_misspelled_option_leads_with_the_useful_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            ["fit", "--config", str(CONFIGS / "tokenizer_tiny.yaml"), "--model.init_args.lrr", "3"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: model.init_args: Option 'lrr' is not accepted", err
    assert "usage:" not in err
    assert err.splitlines()[-1] == "tip: for the accepted options run: dmvae fit --help"


def test_summarize_parse_error_keeps_nested_keys():
    message = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n'
        "  Errors:\n    - Problem with given class_path 'pkg.Module':\n"
        '        Parser key "encoder":\n          Errors:\n'
        "            - Unexpected keys: {'chmult'}\n            - Expected a <class 'NoneType'>\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>"
    )
    assert summarize_parse_error(message) == "model.init_args.encoder: Unexpected keys: {'chmult'}"
    assert summarize_parse_error("unrecognized arguments: --x 3") == "unrecognized arguments: --x 3"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"  {name} " in out, name
    assert set(COMMANDS) >= {
        "cache-latents",
        "sample",
        "evaluate",
        "import-public",
        "demo",
        "toy2d",
        "study",
    }


@pytest.mark.parametrize("name", [*COMMANDS, *ALIASES])
def test_every_command_runs_its_module(monkeypatch, name):
    """Each command imports its module only when run and calls its main with the remaining
    arguments (a stand-in module is put in place, so nothing heavy runs and ``study`` is
    checked before it exists)."""
    target = COMMANDS[ALIASES.get(name, name)][0]
    module_name, function = target.split(":")
    calls = []
    monkeypatch.setitem(sys.modules, module_name, types.SimpleNamespace(**{function: calls.append}))
    assert main([name, "--x", "1"]) is None
    assert calls == [["--x", "1"]]


def test_a_missing_command_module_is_a_short_message(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "nothing", ("dmvae_lightning.no_such_module:main", "-"))
    block = _error_block(capsys, ["nothing"])
    assert (
        block[0]
        == "error: dmvae nothing: dmvae_lightning.no_such_module is not part of this installation"
    )


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("dmvae_lightning.latents", "cache-latents"),
        ("dmvae_lightning.sampling", "sample"),
        ("dmvae_lightning.metrics.evaluate", "evaluate"),
        ("dmvae_lightning.convert", "import-public"),
        ("dmvae_lightning.toy2d", "toy2d"),
        ("dmvae_lightning.demo", "demo"),
    ],
)
def test_old_module_paths_and_new_commands_print_the_same_help(
    monkeypatch, capsys, module, command
):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert exc.value.code == 0
    old = capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    new = capsys.readouterr().out
    assert old and old[old.index("\n\n") :] == new[new.index("\n\n") :]  # after the usage block
