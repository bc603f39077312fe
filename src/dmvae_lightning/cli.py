"""The ``dmvae`` command: one LightningCLI for every stage, configured from YAML.

Examples::

    dmvae fit --config configs/fashion_mnist/tokenizer.yaml
    dmvae fit --config configs/imagenet.yaml --trainer.num_nodes 4
    dmvae fit --config configs/fashion_mnist/tokenizer.yaml --print_config
    dmvae import-public dit --src public_dit.pt --out generator.ckpt   # see interop/public.py
    dmvae sample --ckpt generator.ckpt --out samples/                   # see sampling.py

Besides Lightning's ``fit`` / ``validate`` / ``test`` / ``predict``, the tools of the package are
subcommands (:data:`COMMANDS`: ``cache-latents``, ``sample``, ``evaluate``, ``import-public``,
``demo``, ``toy2d``, ``study``); each runs that module's ``main`` (``python -m`` paths keep
working). ``dmvae --help`` lists them all.

Model and data are chosen by ``class_path`` (subclass mode), so classes of other projects plug in
without touching this file. ``data`` may be left out for a model that serves its own loaders.
Unknown or misspelled options are parse errors; the useful line of jsonargparse's message comes
first. An error raised while the model, data module or trainer are built (a missing or corrupt
checkpoint, a shape mismatch, ...) is printed as one short message naming the option and the
file; ``--debug`` or ``DMVAE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; must precede any timm import

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402

from dmvae_lightning.callbacks.requeue import SynchronizedRequeue  # noqa: E402
from dmvae_lightning.nonfinite import NonFiniteError  # noqa: E402
from dmvae_lightning.utils.malloc import tune_malloc  # noqa: E402

#: ``dmvae <command>`` -> (``module:function`` called with the remaining arguments, summary).
#: Imported only when the command runs (``study`` may be absent from an installation).
COMMANDS: dict[str, tuple[str, str]] = {
    "cache-latents": ("dmvae_lightning.latents:main", "encode a dataset once into a latent cache"),
    "sample": (
        "dmvae_lightning.sampling:main",
        "class-balanced samples (PNGs + ADM .npz) from a diffusion checkpoint",
    ),
    "evaluate": (
        "dmvae_lightning.metrics.evaluate:main",
        "gFID / IS of samples, rFID / PSNR / SSIM / LPIPS of reconstructions",
    ),
    "import-public": (
        "dmvae_lightning.interop.public:main",
        "convert a public DMVAE / DiT checkpoint into this package's format",
    ),
    "demo": (
        "dmvae_lightning.demo:main",
        "the whole Fashion-MNIST pipeline on CPU, stage by stage (make demo)",
    ),
    "toy2d": ("dmvae_lightning.toy2d:main", "the paper's 2-D toy study (Figure 3)"),
    "study": ("dmvae_lightning.study:main", "the Fashion-MNIST study driver"),
}
#: Other spellings of a command.
ALIASES = {"import_public": "import-public", "cache_latents": "cache-latents"}

DEBUG_ENV = "DMVAE_DEBUG"


class _DropVendorTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_vendor_messages() -> None:
    """Drop Lightning's advertising tips and the warnings known to be harmless here, nothing
    else: the LeafSpec deprecation Lightning 2.6's pytree helper triggers on every run with
    torch >= 2.9 (a Lightning internal, not ours to fix)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropVendorTips) for f in logger.filters):
            logger.addFilter(_DropVendorTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def link_data_to_model(config) -> None:
    """State shape and class information once, in the data section.

    A model argument ``latent_shape`` / ``num_classes`` that the YAML leaves unset (None) is
    filled from ``data.init_args.reference.shape`` (``reference.init_args.shape`` for a source
    given by ``class_path``) / ``data.init_args.num_classes``. (A plain
    ``link_arguments`` cannot do this in subclass mode: it would also overwrite models and data
    modules that do not have these values, e.g. a tokenizer stage or a latent cache.)
    """
    model = config.get("model")
    data = config.get("data")
    if not model or not data or not model.get("init_args") or not data.get("init_args"):
        return
    margs, dargs = model["init_args"], data["init_args"]
    if "latent_shape" in margs and margs.get("latent_shape") is None:
        reference = dargs.get("reference") or {}
        shape = None
        while reference and hasattr(reference, "get") and shape is None:  # nested bases
            # a source of your own by class_path keeps its arguments under init_args
            own = reference.get("init_args") if "class_path" in reference else None
            shape = (own or reference).get("shape")
            reference = reference.get("base") or {}
        if shape:
            margs["latent_shape"] = list(shape)
    if "num_classes" in margs and margs.get("num_classes") is None:
        if dargs.get("num_classes") is not None:
            margs["num_classes"] = dargs["num_classes"]


def _count_devices(devices: Any) -> int | None:
    """Processes per node that ``trainer.devices`` asks for; None when Lightning decides
    (``auto``, ``-1``)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None


def check_slurm_layout(trainer: dict, environ: Mapping[str, str] = os.environ) -> None:
    """Inside a SLURM job (``SLURM_NTASKS`` set, job not named ``bash`` / ``interactive``), raise
    a ValueError naming both settings when ``trainer.devices`` differs from the sbatch
    ``--ntasks-per-node`` or ``trainer.num_nodes`` from ``--nodes``: Lightning would only find out
    after launching (or hang waiting for processes that never start)."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    per_node = environ.get("SLURM_NTASKS_PER_NODE")
    devices = _count_devices(trainer.get("devices", "auto"))
    if per_node is not None and devices is not None:
        tasks = int(per_node.split("(")[0])  # SLURM may write e.g. "4(x2)"
        if tasks != devices:
            raise ValueError(
                f"SLURM starts {tasks} tasks per node (sbatch --ntasks-per-node={tasks}) but "
                f"trainer.devices is {trainer.get('devices')!r}: one task drives one device, so "
                f"set --trainer.devices {tasks} or change --ntasks-per-node (and --gres) in the "
                "sbatch script."
            )
    nnodes = environ.get("SLURM_NNODES")
    num_nodes = trainer.get("num_nodes") or 1
    if nnodes is not None and int(nnodes) != int(num_nodes):
        raise ValueError(
            f"SLURM allocated {nnodes} nodes (sbatch --nodes={nnodes}) but trainer.num_nodes is "
            f"{num_nodes}: set --trainer.num_nodes {nnodes} or change --nodes in the sbatch script."
        )


def _innermost_file(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def root_cause(err: BaseException) -> BaseException:
    """The first exception along the ``__cause__`` / ``__context__`` chain of ``err`` that was
    not raised by jsonargparse (which wraps instantiation errors in "Does not validate against
    any of the Union subtypes" with the whole Namespace)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if f"{os.sep}jsonargparse{os.sep}" not in _innermost_file(current):
            return current
        current = current.__cause__ or current.__context__
    return err


def _mark_config_error(err: BaseException) -> BaseException:
    """Tag an exception raised while the CLI builds its objects, for :func:`console`."""
    try:
        err._dmvae_config_error = True  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions without __dict__
        pass
    return err


def summarize_parse_error(message: str) -> str:
    """The useful line of a jsonargparse error: for a Union wrapper, the key plus the innermost
    problem (e.g. ``model: Option 'lrr' is not accepted``); otherwise the first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    key = ""
    for line in lines:  # nested keys: model -> (class_path) -> encoder = model.init_args.encoder
        found = re.match(r'Parser key "([^"]+)":', line)
        if found:
            key = f"{key}.{found.group(1)}" if key else found.group(1)
        elif line.startswith("- Problem with given class_path") and key:
            key += ".init_args"
    noise = (
        "Parser key",
        "Does not validate",
        "Subtypes:",
        "Errors:",
        "Given value",
        "- Expected a <class 'NoneType'>",
    )
    useful = [line.lstrip("- ") for line in lines if not line.startswith(noise)]
    if not useful:
        return lines[0]
    return f"{key}: {useful[-1]}" if key else useful[0]


class DMVAEArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors lead with the useful line and skip the usage block
    (jsonargparse prints ~50 lines of usage first)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        summary = summarize_parse_error(message)
        sys.stderr.write(f"error: {summary}\n")
        if summary.strip() != message.strip():
            sys.stderr.write("details: " + message.rstrip().replace("\n", "\n  ") + "\n")
        sys.stderr.write(f"tip: for the accepted options run: {prog} --help\n")
        self.exit(2)


class DMVAECLI(LightningCLI):
    """LightningCLI with the checks a long-running training job wants before it starts."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` when given, else the command line. A caller that passes ``args`` from
        inside another program (the study, the demo) has its own ``sys.argv``, which
        LightningCLI would warn about on every stage; only the parse sees a bare ``sys.argv``
        (a DDP launcher reading it later still sees the real one)."""
        if args is None:
            return super().parse_arguments(parser, args)
        argv = sys.argv
        sys.argv = argv[:1]
        try:
            return super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def instantiate_classes(self) -> None:
        """Build model, data module and trainer; an error comes out as its root cause (see
        :func:`root_cause`), tagged for :func:`console`'s short message."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _mark_config_error(root_cause(err))
            if cause is err:
                raise
            raise cause from cause.__cause__

    def before_instantiate_classes(self) -> None:
        try:
            self._check_config()
        except Exception as err:
            _mark_config_error(err)
            raise

    def _check_config(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        link_data_to_model(config)
        check_slurm_layout(config.get("trainer") or {})
        if subcommand is None:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        # "last" / "best" / "hpc" are resolved by Lightning itself; anything else is a file path.
        if ckpt_path and ckpt_path not in {"last", "best", "hpc", "registry"}:
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(
                    f"--ckpt_path: checkpoint file {ckpt_path!r} does not exist. Point `ckpt_path` "
                    "at a .ckpt written by an earlier run (e.g. <log_dir>/checkpoints/last.ckpt)."
                )


def run_command(name: str, argv: list[str]) -> Any:
    """Run ``dmvae <name>`` (a :data:`COMMANDS` entry or alias) with arguments ``argv``."""
    target, _ = COMMANDS[ALIASES.get(name, name)]
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise _mark_config_error(
            ModuleNotFoundError(f"dmvae {name}: {module_name} is not part of this installation")
        ) from err
    return getattr(module, function)(list(argv))


def commands_help() -> str:
    """The block ``dmvae --help`` prints after Lightning's subcommands."""
    width = max(len(name) for name in COMMANDS) + 2
    lines = ["", "other commands (dmvae <command> --help for their options):"]
    lines += [f"  {name.ljust(width)}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines.append(f"  (aliases: {', '.join(f'{a} = {c}' for a, c in ALIASES.items())})")
    lines.append(f"errors: --debug or {DEBUG_ENV}=1 shows full tracebacks")
    return "\n".join(lines)


def main(args: ArgsType = None, run: bool = True) -> LightningCLI | None:
    """Entry point of the ``dmvae`` console script; tests call ``main([...])`` in-process.

    ``dmvae <command> ...`` for a :data:`COMMANDS` entry (e.g. ``import-public``, ``sample``)
    runs that module's ``main`` with the remaining arguments and returns None.
    """
    quiet_vendor_messages()
    tune_malloc()  # keep freed tensor memory for the next batch (DMVAE_TUNE_MALLOC=0: glibc's)
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and (argv[0] in COMMANDS or argv[0] in ALIASES):
        run_command(argv[0], list(argv[1:]))
        return None
    wants_help = isinstance(argv, (list, tuple)) and (not argv or argv[0] in ("-h", "--help"))
    try:
        return DMVAECLI(
            model_class=pl.LightningModule,
            # None (= any LightningDataModule, subclass mode) makes `data` optional, for modules
            # that serve their own training loader (the toy study's PointAlignmentModule).
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # always present, not configurable: SLURM requeue at a batch boundary all ranks
            # agree on
            trainer_defaults={"callbacks": [SynchronizedRequeue()]},
            auto_configure_optimizers=False,
            parser_class=DMVAEArgumentParser,
            parser_kwargs={"prog": "dmvae"},
            args=args,
            run=run,
        )
    except SystemExit:
        if wants_help:
            print(commands_help())
        raise


def short_message(err: BaseException, max_lines: int = 4) -> str:
    """``error: <message>`` in at most ``max_lines`` lines, plus the hint to the traceback."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["..."]
    lines[0] = f"error: {lines[0]}"
    lines.append(f"(full traceback: dmvae --debug ... or {DEBUG_ENV}=1)")
    return "\n".join(lines)


def _is_user_facing(err: BaseException) -> bool:
    return isinstance(err, NonFiniteError) or bool(getattr(err, "_dmvae_config_error", False))


def console(argv: list[str] | None = None) -> None:
    """The ``dmvae`` console script: :func:`main` on ``sys.argv``, exit status 0 on success
    (returning the CLI object to the script wrapper would make it the exit status). A
    configuration error or a non-finite stop is printed as a short message (exit status 1);
    ``--debug`` (anywhere in the arguments) or ``DMVAE_DEBUG=1`` re-raises it with its
    traceback."""
    args = sys.argv if argv is None else ["dmvae", *argv]  # edited in place: LightningCLI
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")  # warns about args AND sys.argv
    if "--debug" in args[1:]:
        args.remove("--debug")
        debug = True
    if debug:
        os.environ.setdefault("JSONARGPARSE_DEBUG", "true")
    try:
        main(None if argv is None else args[1:])
    except Exception as err:
        if debug or not _is_user_facing(err):
            raise
        sys.stderr.write(short_message(err) + "\n")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    console()
