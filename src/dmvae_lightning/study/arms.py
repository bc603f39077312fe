"""What a study is made of: arm files, the shared stages, the reference distributions and the
stage budgets (no training or evaluation here)."""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The stage configs (relative to the repository root); arms live in its ``study`` folder.
CONFIGS = Path("configs/fashion_mnist")
ARMS_DIR = CONFIGS / "study"

DEFAULT_SEEDS = (0, 1, 2)
#: Training steps of each generator DiT (on cached latents): half of diffusion.yaml's 1200.
DEFAULT_GENERATOR_STEPS = 600


def budget_suffix(generator_steps: int | None) -> str:
    """How a runs folder names the files of one generator budget: ``""`` for the study's
    default (:data:`DEFAULT_GENERATOR_STEPS`: ``generator_seed0.json``, ``result.json``),
    ``"_steps<N>"`` for another (``generator_steps1500_seed0.json``, ``result_steps1500.json``)
    and ``"_steps0"`` for None (diffusion.yaml's own ``max_steps``). So one folder holds several
    budgets on the same tokenizers and latent caches."""
    if generator_steps == DEFAULT_GENERATOR_STEPS:
        return ""
    if generator_steps is not None and generator_steps < 1:
        raise ValueError(f"generator_steps must be >= 1 or None, got {generator_steps}")
    return f"_steps{generator_steps or 0}"


def result_name(generator_steps: int | None) -> str:
    """File name of an arm's result at one generator budget in ``arms/<arm>/``
    (``result.json``, ``result_steps1500.json``; :func:`budget_suffix`)."""
    return f"result{budget_suffix(generator_steps)}.json"


# --------------------------------------------------------------------------------- stage budgets
#: ``--quick``: every stage a few batches, small evaluation sets (for tests: the whole pipeline,
#: none of the quality).
QUICK_TRAINER = {
    "classifier": 12,
    "fid_net": 30,
    "ssl": 8,
    "tokenizer": 30,
    "reference": 150,
    "align": 60,
    "finetune": 4,
    "diffusion": 16,
}
QUICK_CACHE = {"train": 2048, "val": 256}
QUICK_EVAL = {"eval_images": 256, "gen_samples": 200, "probe_train": 512, "distance": 256}
FULL_EVAL = {"eval_images": 10000, "gen_samples": 5000, "probe_train": 5000, "distance": 2000}


def stage_kind(config: str) -> str:
    """Stage kind of a config file name (``align.yaml`` -> ``align``)."""
    return Path(config).stem


def load_overlay(spec: Any, configs: Path = CONFIGS) -> dict[str, Any]:
    """An arm's overlay: a mapping, the name of a YAML file under ``configs/fashion_mnist``
    (e.g. ``kl_vae/tokenizer.yaml``, shared with ``make demo``), or a list of these merged in
    order; None is empty."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        path = configs / spec
        if not path.is_file():
            raise ValueError(f"overlay file {spec!r} is not a file under {configs}")
        return yaml.safe_load(path.read_text()) or {}
    if isinstance(spec, list):
        out: dict[str, Any] = {}
        for part in spec:
            out = merge(out, load_overlay(part, configs))
        return out
    if isinstance(spec, dict):
        return spec
    raise ValueError(f"an overlay is a mapping, a file name or a list of them, got {spec!r}")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``over`` wins; lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class Reference:
    """A reference distribution of the study: the stage-1 tokenizer the aligned arms start from,
    and the stage-2 score model trained on the reference's samples (the DMD "real score").

    ``tokenizer``: shared stage of the stage-1 tokenizer; ``model``: shared stage of the score
    model; ``source``: the reference-source spec the score model trains on (None: the stage-1
    tokenizer's latents of the training images)."""

    tokenizer: str
    model: str
    source: dict[str, Any] | None = None


@dataclass(frozen=True)
class SharedStage:
    """A stage trained once per study: ``config`` under configs/fashion_mnist with ``overlay``.
    String values ``"@name"`` in the overlay are replaced by the checkpoint of shared stage
    ``name`` (trained first); ``"@runs"`` by the study's run folder; ``"@latents/<name>"`` by a
    latent cache of the training images encoded with shared tokenizer ``name`` (made once)."""

    config: str
    overlay: dict[str, Any] = field(default_factory=dict)


def frozen_encoder(weights: str, frozen: bool = True) -> dict[str, Any]:
    return {"name": "classifier", "weights_path": weights, "frozen": frozen}


def _source_reference(source: dict[str, Any], scale: float = 1.0) -> SharedStage:
    """A score model on samples of a reference source (same DiT and budget as the others)."""
    return SharedStage(
        "reference.yaml",
        {
            "model": {
                "init_args": {
                    "tokenizer_ckpt": None,
                    "encode_images": False,
                    "input_key": "reference",
                    "latent_mean": 0.0,
                    "latent_scale": scale,
                    "num_log_images": 0,
                }
            },
            "data": {"init_args": {"reference": source}},
        },
    )


SHAPE = [4, 8, 8]
#: The stage-1 tokenizer's latents of the training images, encoded once into a latent cache
#: (``@latents/<shared tokenizer>``) and read as a bank: no encoder pass per reference batch.
_NOISE_BASE = {"name": "bank", "shape": SHAPE, "path": "@latents/tokenizer_supervised"}
#: 10 components, one per class, centres ~ N(0, 1), spread 0.5 (the class-tied GMM reference)
_GMM = {
    "name": "gmm",
    "shape": SHAPE,
    "num_components": 10,
    "per_class": True,
    "center_std": 1.0,
    "std": 0.5,
    "seed": 0,
}
#: the score models see GMM samples scaled to unit variance: centre variance + component variance
_GMM_SCALE = 1 / math.sqrt(_GMM["center_std"] ** 2 + _GMM["std"] ** 2)
SOURCES: dict[str, dict[str, Any]] = {
    "gaussian": {"name": "gaussian", "shape": SHAPE, "mean": 0.0, "std": 1.0},
    "gmm": _GMM,
    # the same mixture (same centres) as the paper's: components drawn at random, not tied to
    # the image's class (the diffusion modules read the image label, so the reference model
    # learns the unconditional mixture for every class)
    "gmm_free": {**_GMM, "per_class": False},
    "sphere": {"name": "sphere", "shape": SHAPE, "per_position": False},
    "text": {
        "name": "text",
        "shape": SHAPE,
        "template": "a photo of a {}",
        "noise_std": 0.5,
        "center": True,
        "cache_dir": "@runs/shared/text",
        "seed": 0,
    },
    "diffusion_noise": {"name": "diffusion_noise", "t": 0.5, "base": _NOISE_BASE},
}

SHARED: dict[str, SharedStage] = {
    "classifier": SharedStage("classifier.yaml"),
    "fid_net": SharedStage("fid_net.yaml"),
    "ssl": SharedStage("ssl.yaml"),
    "tokenizer_supervised": SharedStage(
        "tokenizer.yaml", {"model": {"init_args": {"encoder": frozen_encoder("@classifier")}}}
    ),
    "tokenizer_ssl": SharedStage(
        "tokenizer.yaml", {"model": {"init_args": {"encoder": frozen_encoder("@ssl")}}}
    ),
    "reference_supervised": SharedStage(
        "reference.yaml", {"model": {"init_args": {"tokenizer_ckpt": "@tokenizer_supervised"}}}
    ),
    "reference_supervised_wide": SharedStage(
        "reference.yaml",
        {
            "model": {
                "init_args": {
                    "tokenizer_ckpt": "@tokenizer_supervised",
                    "dit": {
                        "preset": "tiny",
                        "patch_size": 4,
                        "hidden_size": 256,
                        "depth": 4,
                        "num_heads": 4,
                    },
                }
            }
        },
    ),
    "reference_supervised_long": SharedStage(
        "reference.yaml",
        {
            "model": {"init_args": {"tokenizer_ckpt": "@tokenizer_supervised"}},
            "trainer": {"max_steps": 3600},
        },
    ),
    "reference_ssl": SharedStage(
        "reference.yaml", {"model": {"init_args": {"tokenizer_ckpt": "@tokenizer_ssl"}}}
    ),
    "reference_gaussian": _source_reference(SOURCES["gaussian"]),
    "reference_gmm": _source_reference(SOURCES["gmm"], scale=_GMM_SCALE),
    "reference_gmm_free": _source_reference(SOURCES["gmm_free"], scale=_GMM_SCALE),
    "reference_sphere": _source_reference(SOURCES["sphere"]),
    "reference_text": SharedStage(
        "reference.yaml",
        merge(
            _source_reference(SOURCES["text"]).overlay,
            {"model": {"init_args": {"latent_mean": None, "latent_scale": None}}},
        ),
    ),
    "reference_diffusion_noise": SharedStage(
        "reference.yaml",
        merge(
            _source_reference(SOURCES["diffusion_noise"]).overlay,
            {"model": {"init_args": {"latent_mean": None, "latent_scale": None}}},
        ),
    ),
}

REFERENCES: dict[str, Reference] = {
    "supervised": Reference("tokenizer_supervised", "reference_supervised"),
    "supervised_wide": Reference("tokenizer_supervised", "reference_supervised_wide"),
    "supervised_long": Reference("tokenizer_supervised", "reference_supervised_long"),
    "ssl": Reference("tokenizer_ssl", "reference_ssl"),
    **{
        name: Reference("tokenizer_supervised", f"reference_{name}", SOURCES[name])
        for name in ("gaussian", "gmm", "gmm_free", "sphere", "text", "diffusion_noise")
    },
}
#: The frozen encoder (shared stage) of each stage-1 tokenizer.
ENCODER_OF = {"tokenizer_supervised": "classifier", "tokenizer_ssl": "ssl"}


# --------------------------------------------------------------------------------- arms
#: The keys of an arm file.
ARM_KEYS = frozenset(
    {"title", "table", "order", "reference", "tokenizer", "generator", "ablation", "extends"}
    | {"tokenizer_seed", "curve"}
)


def _read_arm_spec(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An arm file's keys with ``extends: <arm>`` resolved: the named arm's keys (a file in the
    same folder, itself possibly extending another), then this file's on top; a key given here
    replaces the inherited one whole (``tokenizer`` is one key: a list, not merged)."""
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an arm file is a mapping of keys {sorted(ARM_KEYS)}")
    unknown = sorted(set(spec) - ARM_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; an arm has keys {sorted(ARM_KEYS)}")
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    parent_path = path.parent / f"{parent}.yaml"
    if not parent_path.is_file():
        raise ValueError(
            f"{path}: extends {parent!r}, but there is no {parent_path.name} beside it"
        )
    chain = (*chain, path.resolve())
    if parent_path.resolve() in chain:
        names = " -> ".join(p.stem for p in (*chain, parent_path))
        raise ValueError(f"{path}: `extends` goes round in a circle: {names}")
    return {**_read_arm_spec(parent_path, chain), **spec}


def _seed_overlay(seed: int) -> dict[str, Any]:
    """What ``tokenizer_seed`` adds to every tokenizer stage: the two seeds the stages draw all
    their randomness from (model: initialisation and per-step streams; data: batch order)."""
    return {"model": {"init_args": {"seed": seed}}, "data": {"init_args": {"seed": seed}}}


def _stage_seeds(overlay: dict[str, Any]) -> tuple[Any, Any]:
    """(model seed, data seed) an overlay sets (None: the stage config's own)."""
    model = (overlay.get("model") or {}).get("init_args") or {}
    data = (overlay.get("data") or {}).get("init_args") or {}
    return model.get("seed"), data.get("seed")


@dataclass
class Arm:
    """One row of the study (one YAML file under ``configs/fashion_mnist/study/``).

    An arm file has the keys ``title``, ``table`` (1 or 2: the paper's table it belongs to),
    ``order`` (its place in that table), ``reference`` (a name of :data:`REFERENCES`; null for
    an arm that trains its tokenizer ``from: scratch``), ``tokenizer`` (the stages, each a
    ``config`` under ``configs/fashion_mnist`` with an optional ``overlay`` and ``from``),
    ``generator`` (an overlay of the generator stage), ``ablation`` (the arm that is its
    matching-weight-0 control), and two shorthands: ``extends: <arm>`` takes every key of that
    arm's file and replaces the ones given here; ``tokenizer_seed: N`` sets
    ``model.init_args.seed`` and ``data.init_args.seed`` to N in every tokenizer stage (an
    alignment seed). Optional ``curve: {series: <name>, vae_steps: <n>}`` places the arm on a
    training-length curve of the docs' steps figure (arms of one series at one ``vae_steps``
    are pooled: alignment or tokenizer seeds). :attr:`tokenizer` holds the stages with their
    overlays resolved to mappings."""

    key: str
    title: str
    table: int
    order: int
    reference: str | None
    tokenizer: list[dict[str, Any]]
    generator: dict[str, Any]
    ablation: str | None = None
    source: Path | None = None
    curve: dict[str, Any] | None = None

    @property
    def stage_seeds(self) -> list[tuple[Any, Any]]:
        """(model seed, data seed) of each tokenizer stage (None: the config's own)."""
        return [_stage_seeds(stage["overlay"]) for stage in self.tokenizer]

    def stage_fingerprint(self, i: int) -> str:
        """What makes tokenizer stage ``i``'s checkpoint what it is, as a sha256 hex digest:
        the arm's reference (the shared stage-1 tokenizer, encoder and real model its stages
        start from) and stages ``0..i`` (config, ``from``, overlay with its seeds). Two arms
        whose stage ``i`` has the same fingerprint train the same weights there (every stage
        draws its randomness from the overlay's seeds), so the study trains it once and copies
        it (:meth:`~dmvae_lightning.study.driver.Study.tokenizer`). The stage configs' file
        contents are not part of it: editing ``align.yaml`` does not retrain finished stages,
        here or elsewhere in a runs folder."""
        if not 0 <= i < len(self.tokenizer):
            raise IndexError(
                f"arm {self.key} has {len(self.tokenizer)} tokenizer stages, not {i + 1}"
            )
        spec = {"reference": self.reference, "stages": self.tokenizer[: i + 1]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Arm:
        path = Path(path)
        configs = path.resolve().parent.parent  # configs/<data>/study/<arm>.yaml
        spec = _read_arm_spec(path)
        reference = spec.get("reference")
        if reference is not None and reference not in REFERENCES:
            raise ValueError(f"{path}: reference {reference!r} is not one of {sorted(REFERENCES)}")
        seed = spec.get("tokenizer_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{path}: tokenizer_seed is an integer, got {seed!r}")
        stages = []
        for i, stage in enumerate(spec.get("tokenizer") or []):
            bad = sorted(set(stage) - {"config", "overlay", "from"})
            if bad or "config" not in stage:
                raise ValueError(
                    f"{path}: tokenizer[{i}] needs `config` (and optionally `overlay`, `from`), "
                    f"got keys {sorted(stage)}"
                )
            if stage.get("from", "scratch") != "scratch":
                raise ValueError(
                    f"{path}: tokenizer[{i}].from must be 'scratch' (train from scratch) or "
                    f"absent (start from the previous stage), got {stage['from']!r}"
                )
            overlay = load_overlay(stage.get("overlay"), configs)  # a missing file fails here
            if "seed_everything" in overlay:
                raise ValueError(
                    f"{path}: tokenizer[{i}].overlay sets seed_everything, which changes nothing "
                    "(the stages draw all randomness from model.init_args.seed and "
                    "data.init_args.seed so that resuming is exact); set those two instead"
                )
            if seed is not None:
                if any(s is not None and s != seed for s in _stage_seeds(overlay)):
                    raise ValueError(
                        f"{path}: tokenizer_seed {seed} and tokenizer[{i}].overlay's seeds "
                        f"{_stage_seeds(overlay)} (model, data) disagree; keep one of them"
                    )
                overlay = merge(overlay, _seed_overlay(seed))
            if not (configs / stage["config"]).is_file():
                raise ValueError(
                    f"{path}: tokenizer[{i}].config {stage['config']!r} is not a file under "
                    f"{configs}"
                )
            stages.append({**stage, "overlay": overlay})
        curve = spec.get("curve")
        if curve is not None and not (
            isinstance(curve, dict)
            and set(curve) == {"series", "vae_steps"}
            and isinstance(curve["series"], str)
            and curve["series"]
            and isinstance(curve["vae_steps"], int)
            and not isinstance(curve["vae_steps"], bool)
            and curve["vae_steps"] > 0
        ):
            raise ValueError(
                f"{path}: curve is {{series: <name>, vae_steps: <positive integer>}}, got {curve!r}"
            )
        if reference is None and (not stages or stages[0].get("from") != "scratch"):
            raise ValueError(
                f"{path}: an arm without `reference` must train its tokenizer `from: scratch`"
            )
        return cls(
            key=path.stem,
            title=str(spec.get("title", path.stem)),
            table=int(spec.get("table", 1)),
            order=int(spec.get("order", 100)),
            reference=reference,
            tokenizer=stages,
            generator=dict(spec.get("generator") or {}),
            ablation=spec.get("ablation"),
            source=path,
            curve=curve,
        )


def check_arms(arms: Iterable[Arm]) -> None:
    """Checks across the arm files of one folder: titles are distinct (they label the tables'
    rows; an arm that ``extends`` another must give its own), every ``ablation`` names an arm
    of the folder, and a control trains its tokenizer stages under the same seeds as its arm
    (an alignment-seed arm whose ``extends`` kept the seed-0 control would compare across
    seeds)."""
    arms = {a.key: a for a in arms}
    titles: dict[str, str] = {}
    for arm in arms.values():
        if arm.title in titles:
            raise ValueError(
                f"{arm.source}: title {arm.title!r} is also {titles[arm.title]}'s; give each "
                "arm its own `title` (it labels the row)"
            )
        titles[arm.title] = arm.key
    for arm in arms.values():
        if arm.ablation is None:
            continue
        control = arms.get(arm.ablation)
        if control is None:
            raise ValueError(
                f"{arm.source}: ablation {arm.ablation!r} is not an arm file beside it"
            )
        if arm.stage_seeds != control.stage_seeds:
            raise ValueError(
                f"{arm.source}: its tokenizer stages run under seeds {arm.stage_seeds} (model, "
                f"data) but its ablation {arm.ablation!r} under {control.stage_seeds}; name the "
                "control with the same `tokenizer_seed`"
            )


def unknown_arms(names: Iterable[str], known: list[str]) -> str:
    """The error for ``--arms`` names that are not arm files: each with its close matches."""
    parts = []
    for name in names:
        near = difflib.get_close_matches(name, known, n=3)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    return (
        f"--arms: unknown arm(s) {'; '.join(parts)}; `dmvae study --list` lists the "
        f"{len(known)} arms"
    )


def load_arms(
    directory: str | os.PathLike = ARMS_DIR, names: Iterable[str] | None = None
) -> list[Arm]:
    """The arms of ``directory`` (every ``*.yaml``), sorted by table and order, after
    :func:`check_arms`; ``names`` selects some (unknown names are an error naming each with
    its close matches)."""
    arms = {p.stem: Arm.from_file(p) for p in sorted(Path(directory).glob("*.yaml"))}
    check_arms(arms.values())
    if names is not None:
        names = list(names)
        missing = [name for name in names if name not in arms]
        if missing:
            raise ValueError(unknown_arms(missing, sorted(arms)))
        arms = {k: v for k, v in arms.items() if k in names}
    return sorted(arms.values(), key=lambda a: (a.table, a.order, a.key))
