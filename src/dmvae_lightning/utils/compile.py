"""``torch.compile`` of a module in place, from a ``compile`` option written in YAML.

Every module with a ``compile`` argument (the DiT of
:class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule`, the tokenizer's encoder and
decoder in :class:`~dmvae_lightning.modules.dmvae.DMVAEModule`, the real and fake score models
of :class:`~dmvae_lightning.losses.matching.DMDLoss`) takes the same :data:`CompileSpec`:

* ``false`` / ``null``: eager;
* ``true``: ``torch.compile`` with its defaults (backend ``"inductor"``);
* a mapping of :func:`torch.compile` keywords, e.g. ``{mode: max-autotune-no-cudagraphs,
  dynamic: false}``: keys ``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``.

Compilation uses :meth:`torch.nn.Module.compile`: the module's ``__call__`` is compiled lazily
(at its first call), in place, so parameter names, ``state_dict`` keys and checkpoints are those
of the eager module (no ``_orig_mod.`` prefix): a checkpoint saved compiled loads eager and the
other way round. A ``copy.deepcopy`` (or pickle) of a compiled module is eager (torch drops the
compiled call from the module's state), so compile copies after making them.

Every module compiled this way runs through the same Python frame (``nn.Module``'s call), and
dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (default 8) graphs per frame:
encoder and decoder in and out of ``no_grad``, the real and the fake score model at the CFG
batch and the fake step's batch already make 7, and past the limit dynamo silently runs the
rest eager. :func:`compile_module` therefore raises that limit to at least
:data:`RECOMPILE_LIMIT` (a process-wide dynamo setting; it never lowers it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_KEYS", "RECOMPILE_LIMIT", "CompileSpec", "compile_module", "compile_options"]

RECOMPILE_LIMIT = 64

CompileSpec = bool | dict[str, Any] | None
COMPILE_KEYS: tuple[str, ...] = ("backend", "mode", "dynamic", "fullgraph", "options")


def compile_options(
    spec: CompileSpec, name: str = "compile", backend: str | None = None
) -> dict[str, Any] | None:
    """``torch.compile`` keywords of ``spec`` (None: do not compile). ``backend`` fills in a
    backend the spec leaves out; ``name`` is the option named in the error for an unknown key."""
    if spec is None or spec is False:
        return None
    if spec is True:
        options: dict[str, Any] = {}
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(
                f"{name}: unknown torch.compile option(s) {unknown}; expected some of "
                f"{list(COMPILE_KEYS)}"
            )
        options = dict(spec)
    else:
        raise TypeError(
            f"{name} must be a bool or a mapping of torch.compile options, got {spec!r}"
        )
    if backend is not None:
        options.setdefault("backend", backend)
    return options


def compile_module(
    module: nn.Module, spec: CompileSpec, name: str = "compile", backend: str | None = None
) -> bool:
    """Compile ``module`` in place (:meth:`torch.nn.Module.compile`) as ``spec`` says; returns
    whether it did. See :func:`compile_options` for ``name`` and ``backend``."""
    options = compile_options(spec, name, backend)
    if options is None:
        return False
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    module.compile(**options)
    return True
