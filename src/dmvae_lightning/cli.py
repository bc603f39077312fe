"""The ``dmvae`` command: one LightningCLI for every stage, configured from YAML.

Examples::

    dmvae fit --config configs/fashion_mnist/tokenizer.yaml
    dmvae fit --config configs/imagenet.yaml --trainer.num_nodes 4
    dmvae fit --config configs/fashion_mnist/tokenizer.yaml --print_config
    dmvae import_public dit --src public_dit.pt --out generator.ckpt   # see interop/public.py

Model and data are chosen by ``class_path`` (subclass mode), so classes of other projects plug in
without touching this file. ``data`` may be left out for a model that serves its own loaders.
Unknown or misspelled options are parse errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; must precede any timm import

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

from dmvae_lightning.callbacks.requeue import SynchronizedRequeue  # noqa: E402


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


class DMVAECLI(LightningCLI):
    """LightningCLI with the checks a long-running training job wants before it starts."""

    def before_instantiate_classes(self) -> None:
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


def main(args: ArgsType = None, run: bool = True) -> LightningCLI | None:
    """Entry point of the ``dmvae`` console script; tests call ``main([...])`` in-process.

    ``dmvae import_public ...`` is not a Lightning subcommand: it runs the checkpoint importer
    (:func:`dmvae_lightning.interop.public.main`) and returns None.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "import_public":
        from dmvae_lightning.interop import public as convert

        convert.main(list(argv[1:]))
        return None
    return DMVAECLI(
        model_class=pl.LightningModule,
        # None (= any LightningDataModule, subclass mode) makes `data` optional, for modules that
        # serve their own training loader (the toy study's PointAlignmentModule).
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # always present, not configurable: SLURM requeue at a batch boundary all ranks agree on
        trainer_defaults={"callbacks": [SynchronizedRequeue()]},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def console() -> None:
    """The ``dmvae`` console script: :func:`main` on ``sys.argv``, exit status 0 on success
    (returning the CLI object to the script wrapper would make it the exit status)."""
    main()


if __name__ == "__main__":  # pragma: no cover
    console()
