"""The ``dmvae`` command: one LightningCLI for every stage, configured from YAML.

Examples::

    dmvae fit --config configs/fashion_mnist/tokenizer.yaml
    dmvae fit --config configs/imagenet.yaml --trainer.num_nodes 4
    dmvae fit --config configs/fashion_mnist/tokenizer.yaml --print_config
    dmvae import_public dit --src public_dit.pt --out generator.ckpt   # see convert.py

Model and data are chosen by ``class_path`` (subclass mode), so classes of other projects plug in
without touching this file. ``data`` may be left out for a model that serves its own loaders.
Unknown or misspelled options are parse errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here; must precede any timm import

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402


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


class DMVAECLI(LightningCLI):
    """LightningCLI with the checks a long-running training job wants before it starts."""

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        link_data_to_model(self.config[subcommand] if subcommand else self.config)
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
    (:func:`dmvae_lightning.convert.main`) and returns None.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "import_public":
        from dmvae_lightning import convert

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
