"""The public API: every name in `dmvae_lightning.__all__` imports, has one stable home in a
subpackage, and the hooks of the subclassable classes document when they run and what they
return."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import dmvae_lightning
from dmvae_lightning import (
    DMVAEModule,
    LatentDiffusionModule,
    ReferenceDistribution,
    ReferenceSource,
)

SUBPACKAGES = ("callbacks", "data", "losses", "metrics", "modules", "nets")
HOMES = (
    *SUBPACKAGES,
    "checkpoints",
    "distributed",
    "ema",
    "latents",
    "strategies",
)  # modules with an __all__ of their own


def test_every_name_in_all_imports():
    namespace: dict = {}
    exec("from dmvae_lightning import *", namespace)
    missing = [name for name in dmvae_lightning.__all__ if name not in namespace]
    assert not missing
    assert len(set(dmvae_lightning.__all__)) == len(dmvae_lightning.__all__)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_all_imports(name):
    module = importlib.import_module(f"dmvae_lightning.{name}")
    assert all(hasattr(module, item) for item in module.__all__), name
    assert len(set(module.__all__)) == len(module.__all__)


def test_top_level_names_are_the_subpackages_objects():
    """Each exported name is listed in (at least) one subpackage's `__all__` and is the same
    object there, so `from dmvae_lightning.<sub> import X` and `class_path` entries agree."""
    homes = {name: importlib.import_module(f"dmvae_lightning.{name}") for name in HOMES}
    for name in dmvae_lightning.__all__:
        owners = [h for h, module in homes.items() if name in getattr(module, "__all__", ())]
        assert owners, f"{name} is in no subpackage's __all__"
        for owner in owners:
            assert getattr(homes[owner], name) is getattr(dmvae_lightning, name), (name, owner)


def test_defining_modules_export_what_the_subpackages_reexport():
    """Names re-exported by a subpackage are in their defining module's `__all__` when it has one
    (e.g. `dmvae_lightning.data.sources.__all__`)."""
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"dmvae_lightning.{sub}")
        for name in package.__all__:
            obj = getattr(package, name)
            defining = sys.modules.get(getattr(obj, "__module__", ""), None)
            listed = getattr(defining, "__all__", None)
            if listed is not None and defining.__name__.startswith(f"dmvae_lightning.{sub}."):
                assert name in listed, f"{name} missing from {defining.__name__}.__all__"


def test_reference_feeder_is_exported_without_an_import_cycle():
    """`dmvae_lightning.callbacks` exports ReferenceFeeder although `data.reference` uses it
    (the data module imports it lazily); the package imports callbacks before data."""
    code = (
        "import dmvae_lightning.callbacks.reference_feeder as m, dmvae_lightning.callbacks as c; "
        "assert c.ReferenceFeeder is m.ReferenceFeeder"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


DMVAE_HOOKS = (
    "configure_models",
    "build_encoder",
    "build_bottleneck",
    "build_decoder",
    "build_discriminator",
    "configure_losses",
    "configure_metrics",
    "encode",
    "decode",
    "ema_target",
    "generator_loss",
    "matching_term",
    "fake_loss",
    "discriminator_loss",
    "is_vae_step",
    "log_images",
)
DIFFUSION_HOOKS = (
    "configure_models",
    "load_tokenizer",
    "get_latents",
    "get_labels",
    "normalize",
    "denormalize",
    "sample_time",
    "training_loss",
    "stats_dataloader",
    "sample",
    "decode",
    "log_samples",
)
DATA_HOOKS = (
    "prepare_data",
    "setup",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "on_after_batch_transfer",
    "state_dict",
    "load_state_dict",
)
SOURCE_HOOKS = ("prepare", "draw", "state_dict", "load_state_dict")


@pytest.mark.parametrize(
    ("cls", "hooks"),
    [
        (DMVAEModule, DMVAE_HOOKS),
        (LatentDiffusionModule, DIFFUSION_HOOKS),
        (ReferenceDistribution, DATA_HOOKS),
        (ReferenceSource, SOURCE_HOOKS),
    ],
)
def test_hooks_say_when_they_are_called_and_what_they_return(cls, hooks):
    for hook in hooks:
        doc = inspect.getdoc(getattr(cls, hook)) or ""
        assert "Called" in doc, f"{cls.__name__}.{hook}: say when it is called"
        assert "return" in doc.lower(), f"{cls.__name__}.{hook}: say what it returns"
    listed = inspect.getdoc(inspect.getmodule(cls)) + (inspect.getdoc(cls) or "")
    if cls in (DMVAEModule, LatentDiffusionModule):
        assert all(f":meth:`{hook}`" in listed for hook in hooks if hook != "ema_target")
