"""The reference-distribution study: the paper's Tables 1 and 2 at CPU scale, with seeds.

``dmvae study`` (or ``python -m dmvae_lightning.study``, ``make study``) runs a grid of *arms*
through the same stages with the same budgets on Fashion-MNIST and writes a table with mean +- std
over generator seeds. Each arm is one YAML file under ``configs/fashion_mnist/study/`` (add a file
to add an arm)::

    title: "DMVAE: supervised-feature reference"   # row name
    table: 1                                       # 1: reference study, 2: ablations
    order: 30                                      # row order within the table
    reference: supervised                          # the reference it aligns to (REFERENCES)
    ablation: ablation                             # arm whose latents are its "no matching" control
    tokenizer:                                     # stages after the reference's stage-1 tokenizer
      - config: align.yaml                         # a configs/fashion_mnist/ file ...
        overlay: {model: {init_args: {matching_weight: 10.0}}}   # ... and what the arm changes
      - config: finetune.yaml
    generator: {}                                  # overlay of configs/fashion_mnist/diffusion.yaml

``tokenizer: []`` means the reference's stage-1 tokenizer itself; a first stage with ``from:
scratch`` trains a tokenizer from nothing (the KL-VAE rows). Every stage is ``dmvae fit`` on the
named config with the arm's overlay and the paths the driver fills in (``init_from`` = the previous
stage, ``real_model`` = the reference's score model, encoder weights, log and checkpoint dirs).

Shared stages (the classifier, the FID net, the self-supervised encoder, the stage-1 tokenizers and
the reference score models of :data:`REFERENCES`) are trained once and reused by every arm that
needs them. Stages whose checkpoint exists are skipped and finished arms (and generator seeds) are
read back from their JSON files, so a killed study resumes where it stopped.

Per arm, on held-out Fashion-MNIST test images: PSNR and rFID of the final tokenizer; the distance
(RBF MMD^2, sliced W2^2) between its latents and its reference's samples in the reference model's
normalised space (and the same for the arm named by ``ablation``); a linear probe's test accuracy
on the latents (semantic content); then, for every seed, a generator DiT trained on the cached
latents of the training set, and its gFID and Inception-style score with the domain FID net on
class-balanced samples, and its flow-matching loss on the test latents (fixed t grid and noise).

Outputs under ``--runs`` (default ``runs/study``): ``study.md``, ``study.json``, ``figures/``
(gFID per arm with error bars, PSNR vs gFID, latent PCA per arm), TensorBoard runs under ``tb/``
(every stage, and a ``summary`` run with the per-arm scalars and the figures), per-arm folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

#: The stage configs (relative to the repository root); arms live in its ``study`` folder.
CONFIGS = Path("configs/fashion_mnist")
ARMS_DIR = CONFIGS / "study"

DEFAULT_SEEDS = (0, 1, 2)

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


def _kind(config: str) -> str:
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
            out = _merge(out, load_overlay(part, configs))
        return out
    if isinstance(spec, dict):
        return spec
    raise ValueError(f"an overlay is a mapping, a file name or a list of them, got {spec!r}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``over`` wins; lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
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
    ``name`` (trained first); ``"@runs"`` by the study's run folder."""

    config: str
    overlay: dict[str, Any] = field(default_factory=dict)


def _encoder(weights: str, frozen: bool = True) -> dict[str, Any]:
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
_NOISE_BASE = {
    "name": "checkpoint",
    "shape": SHAPE,
    "checkpoint": "@tokenizer_supervised",
    "reduce": "none",
    "cache_dir": "@runs/shared/feature_cache_dnoise",
    "cache_dtype": "float32",
}
SOURCES: dict[str, dict[str, Any]] = {
    "gaussian": {"name": "gaussian", "shape": SHAPE, "mean": 0.0, "std": 1.0},
    "gmm": {
        "name": "gmm",
        "shape": SHAPE,
        "num_components": 10,
        "per_class": True,
        "center_std": 1.0,
        "std": 0.5,
        "seed": 0,
    },
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
        "tokenizer.yaml", {"model": {"init_args": {"encoder": _encoder("@classifier")}}}
    ),
    "tokenizer_ssl": SharedStage(
        "tokenizer.yaml", {"model": {"init_args": {"encoder": _encoder("@ssl")}}}
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
    "reference_ssl": SharedStage(
        "reference.yaml", {"model": {"init_args": {"tokenizer_ckpt": "@tokenizer_ssl"}}}
    ),
    "reference_gaussian": _source_reference(SOURCES["gaussian"]),
    "reference_gmm": _source_reference(SOURCES["gmm"], scale=1 / math.sqrt(1.25)),
    "reference_sphere": _source_reference(SOURCES["sphere"]),
    "reference_text": SharedStage(
        "reference.yaml",
        _merge(
            _source_reference(SOURCES["text"]).overlay,
            {"model": {"init_args": {"latent_mean": None, "latent_scale": None}}},
        ),
    ),
    "reference_diffusion_noise": SharedStage(
        "reference.yaml",
        _merge(
            _source_reference(SOURCES["diffusion_noise"]).overlay,
            {"model": {"init_args": {"latent_mean": None, "latent_scale": None}}},
        ),
    ),
}

REFERENCES: dict[str, Reference] = {
    "supervised": Reference("tokenizer_supervised", "reference_supervised"),
    "supervised_wide": Reference("tokenizer_supervised", "reference_supervised_wide"),
    "ssl": Reference("tokenizer_ssl", "reference_ssl"),
    **{
        name: Reference("tokenizer_supervised", f"reference_{name}", SOURCES[name])
        for name in ("gaussian", "gmm", "sphere", "text", "diffusion_noise")
    },
}
#: The frozen encoder (shared stage) of each stage-1 tokenizer.
ENCODER_OF = {"tokenizer_supervised": "classifier", "tokenizer_ssl": "ssl"}


# --------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    """One row of the study (one YAML file under ``configs/fashion_mnist/study/``)."""

    key: str
    title: str
    table: int
    order: int
    reference: str | None
    tokenizer: list[dict[str, Any]]
    generator: dict[str, Any]
    ablation: str | None = None
    source: Path | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Arm:
        path = Path(path)
        configs = path.resolve().parent.parent  # configs/<data>/study/<arm>.yaml
        spec = yaml.safe_load(path.read_text()) or {}
        known = {"title", "table", "order", "reference", "tokenizer", "generator", "ablation"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; an arm has keys {sorted(known)}")
        reference = spec.get("reference")
        if reference is not None and reference not in REFERENCES:
            raise ValueError(f"{path}: reference {reference!r} is not one of {sorted(REFERENCES)}")
        stages = list(spec.get("tokenizer") or [])
        for i, stage in enumerate(stages):
            bad = sorted(set(stage) - {"config", "overlay", "from"})
            if bad or "config" not in stage:
                raise ValueError(
                    f"{path}: tokenizer[{i}] needs `config` (and optionally `overlay`, `from`), "
                    f"got keys {sorted(stage)}"
                )
            load_overlay(stage.get("overlay"), configs)  # a missing overlay file fails here
            if not (configs / stage["config"]).is_file():
                raise ValueError(
                    f"{path}: tokenizer[{i}].config {stage['config']!r} is not a file under "
                    f"{configs}"
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
        )


def load_arms(
    directory: str | os.PathLike = ARMS_DIR, names: Iterable[str] | None = None
) -> list[Arm]:
    """The arms of ``directory`` (every ``*.yaml``), sorted by table and order; ``names``
    selects some (unknown names are an error listing the known ones)."""
    arms = {p.stem: Arm.from_file(p) for p in sorted(Path(directory).glob("*.yaml"))}
    if names is not None:
        names = list(names)
        missing = sorted(set(names) - set(arms))
        if missing:
            raise ValueError(f"--arms: unknown arm(s) {missing}; known: {sorted(arms)}")
        arms = {k: v for k, v in arms.items() if k in names}
    return sorted(arms.values(), key=lambda a: (a.table, a.order, a.key))


# --------------------------------------------------------------------------------- the driver
class Study:
    """Runs stages and evaluations for a set of arms (see the module docstring).

    Args:
        runs: output folder.
        root: the repository root (holds ``configs/fashion_mnist``).
        seeds: generator seeds per arm.
        quick: seconds-long stages and small evaluation sets (tests).
        generator_steps: training steps of every generator (default: the ``max_steps`` of
            configs/fashion_mnist/diffusion.yaml, 1200).
        log: printer of progress lines.
    """

    def __init__(
        self,
        runs: str | os.PathLike = "runs/study",
        root: str | os.PathLike = ".",
        seeds: Sequence[int] = DEFAULT_SEEDS,
        quick: bool = False,
        generator_steps: int | None = None,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.runs = Path(runs).resolve()
        self.root = Path(root).resolve()
        self.configs = self.root / CONFIGS
        self.generator_steps = generator_steps
        self.seeds = tuple(int(s) for s in seeds)
        self.quick = quick
        self.sizes = QUICK_EVAL if quick else FULL_EVAL
        self.log = log
        self.timings: dict[str, float] = {}
        self._cache: dict[str, Any] = {}
        self._arms: dict[str, Arm] | None = None

    def arm(self, key: str) -> Arm:
        """Arm ``key`` of ``configs/fashion_mnist/study`` (e.g. an arm's ``ablation``)."""
        if self._arms is None:
            self._arms = {a.key: a for a in load_arms(self.root / ARMS_DIR)}
        if key not in self._arms:
            raise ValueError(f"unknown arm {key!r}; known: {sorted(self._arms)}")
        return self._arms[key]

    # ---------------------------------------------------------------- running stages
    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@runs"):
            return str(self.runs) + value[len("@runs") :]
        if isinstance(value, str) and value.startswith("@"):
            return str(self.shared(value[1:]))
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        return value

    def _fit(
        self, config: str, overlay: dict[str, Any], ckpt: Path, tb_name: str, seed: int | None
    ) -> float:
        """``dmvae fit`` on ``configs/fashion_mnist/<config>`` + ``overlay`` writing ``ckpt``,
        unless it exists; the seconds spent go to ``timings[tb_name]``. Returns them (0 when
        skipped)."""
        if ckpt.is_file():
            return 0.0
        from dmvae_lightning.cli import main as cli_main

        paths = {
            "trainer": {
                "default_root_dir": str(ckpt.parent),
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": str(self.runs / "tb"), "name": tb_name},
                },
                "callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {
                            "dirpath": str(ckpt.parent),
                            "filename": ckpt.stem,
                            "enable_version_counter": False,
                        },
                    }
                ],
                "enable_progress_bar": False,
                "enable_model_summary": False,
            }
        }
        if seed is not None:
            paths["seed_everything"] = seed
        if self.quick:
            batches = QUICK_TRAINER[_kind(config)]
            paths["trainer"].update(
                limit_train_batches=batches, limit_val_batches=1, max_epochs=1, max_steps=-1
            )
        full = _merge(self._resolve(overlay), paths)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        overlay_file = ckpt.with_suffix(".overlay.yaml")
        overlay_file.write_text(yaml.safe_dump(full, sort_keys=False))
        self.log(f"[study] fit {config} -> {ckpt.relative_to(self.runs)}")
        start = time.perf_counter()
        base = self.configs / config
        cli_main(["fit", "--config", str(base), "--config", str(overlay_file)])
        if not ckpt.is_file():
            raise RuntimeError(f"dmvae fit {config} finished without writing {ckpt}")
        self.timings[tb_name] = time.perf_counter() - start
        return self.timings[tb_name]

    def shared(self, name: str) -> Path:
        """Checkpoint of shared stage ``name``, trained first when missing."""
        if name not in SHARED:
            raise KeyError(f"unknown shared stage {name!r}; known: {sorted(SHARED)}")
        ckpt = self.runs / "shared" / f"{name}.ckpt"
        if not ckpt.is_file():
            stage = SHARED[name]
            self._fit(stage.config, stage.overlay, ckpt, f"shared/{name}", None)
        return ckpt

    def tokenizer(self, arm: Arm) -> Path:
        """The arm's final tokenizer checkpoint (its stages trained in order)."""
        prev = self.shared(REFERENCES[arm.reference].tokenizer) if arm.reference else None
        encoder = ENCODER_OF.get(REFERENCES[arm.reference].tokenizer) if arm.reference else None
        arm_dir = self.runs / "arms" / arm.key
        for i, stage in enumerate(arm.tokenizer):
            kind = _kind(stage["config"])
            model: dict[str, Any] = {}
            if stage.get("from") != "scratch":
                if prev is None:
                    raise ValueError(f"arm {arm.key}: stage {i} has nothing to start from")
                model["init_from"] = str(prev)
            if encoder is not None:
                frozen = kind != "align"
                model["encoder"] = _encoder(str(self.shared(encoder)), frozen=frozen)
            if kind == "align" and arm.reference:
                model["matching_loss"] = {
                    "init_args": {"real_model": str(self.shared(REFERENCES[arm.reference].model))}
                }
            overlay = _merge(
                {"model": {"init_args": model}}, load_overlay(stage.get("overlay"), self.configs)
            )
            ckpt = arm_dir / f"tokenizer_{i}_{kind}.ckpt"
            self._fit(stage["config"], overlay, ckpt, f"{arm.key}/{i}_{kind}", None)
            prev = ckpt
        if prev is None:
            raise ValueError(f"arm {arm.key}: no tokenizer")
        return prev

    # ---------------------------------------------------------------- data and evaluation
    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fashion-MNIST ``split`` images (N, 1, 32, 32) in [-1, 1] and labels (cached)."""
        key = f"images/{split}"
        if key not in self._cache:
            from dmvae_lightning.data.images import FashionMNIST

            data = FashionMNIST(split=split, channels=1, pad_to=32)
            items = [data[i] for i in range(len(data))]
            self._cache[key] = (
                torch.stack([it["image"] for it in items]),
                torch.tensor([int(it["label"]) for it in items]),
            )
        return self._cache[key]

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``eval_images`` test images (a fixed, class-mixed order) and labels."""
        x, y = self.images("test")
        n = min(self.sizes["eval_images"], x.shape[0])
        return x[:n], y[:n]

    def train_subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images("train")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return x[order], y[order]

    def fid_features(self):
        if "fid" not in self._cache:
            from dmvae_lightning.metrics import DomainFeatures

            self._cache["fid"] = DomainFeatures(self.shared("fid_net"), option="fid_net")
        return self._cache["fid"]

    def real_stats(self):
        if "real_stats" not in self._cache:
            self._cache["real_stats"] = self.fid_features().stats(self.eval_set()[0])
        return self._cache["real_stats"]

    def reference_model_stats(self, reference: str) -> tuple[float, float]:
        state = torch.load(
            self.shared(REFERENCES[reference].model), map_location="cpu", weights_only=True
        )["state_dict"]
        return float(state["latent_mean"]), float(state["latent_scale"])

    def reference_samples(self, reference: str) -> torch.Tensor:
        """``distance`` samples of the reference, raw (the score model's input space)."""
        key = f"reference/{reference}"
        if key in self._cache:
            return self._cache[key]
        n = self.sizes["distance"]
        ref = REFERENCES[reference]
        if ref.source is None:  # the stage-1 tokenizer's latents of other training images
            tok = _load_tokenizer(self.shared(ref.tokenizer))
            z = _chunks(tok.encode, self.train_subset(n, seed=1234)[0])
        else:
            from dmvae_lightning.data.reference import ReferenceDistribution

            data = ReferenceDistribution(
                dataset="fashion_mnist",
                channels=1,
                image_size=32,
                val_subset=n,
                reference=self._resolve(ref.source),
            )
            z = data.reference_sample(n)["reference"]
        self._cache[key] = z
        return z

    def distances(self, z: torch.Tensor, reference: str) -> dict[str, float]:
        """MMD^2 (RBF, unbiased) and SW2^2 (512 fixed directions) between raw latents ``z`` and
        the reference's samples, both mapped by the reference model's normalisation."""
        from dmvae_lightning.losses.matching import MMDLoss, SlicedWassersteinLoss

        mean, scale = self.reference_model_stats(reference)
        ref = (self.reference_samples(reference) - mean) * scale
        zn = (z[: ref.shape[0]] - mean) * scale
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mmd = float(MMDLoss().loss(zn, ref))
            swd = float(SlicedWassersteinLoss(num_projections=512).loss(zn, ref))
        return {"mmd": mmd, "swd": swd}

    def evaluate_tokenizer(self, arm: Arm, ckpt: Path) -> dict[str, Any]:
        from dmvae_lightning.metrics import frechet_distance
        from dmvae_lightning.metrics.evaluate import psnr

        tok = _load_tokenizer(ckpt)
        x, y = self.eval_set()
        z = _chunks(tok.encode, x)
        rec = _chunks(lambda lat: tok.decode(lat).clamp(-1, 1), z)
        out: dict[str, Any] = {
            "psnr": psnr(x, rec),
            "rfid": frechet_distance(self.fid_features().stats(rec), self.real_stats()),
            "latent_std": float(z.std()),
        }
        n = self.sizes["probe_train"]
        xt, yt = self.train_subset(n, seed=7)
        zt = _chunks(tok.encode, xt)
        out["probe_acc"] = linear_probe(zt, yt, z, y)
        if arm.reference is not None:
            d = self.distances(
                _chunks(tok.encode, self.train_subset(self.sizes["distance"], 99)[0]), arm.reference
            )
            out.update(d)
            if arm.ablation:
                abl_tok = _load_tokenizer(self.tokenizer(self.arm(arm.ablation)))
                zab = _chunks(abl_tok.encode, self.train_subset(self.sizes["distance"], 99)[0])
                out.update(
                    {f"ablation_{k}": v for k, v in self.distances(zab, arm.reference).items()}
                )
        parts = getattr(tok, "tokenizer", tok)  # a DMVAEModule or a plain Tokenizer
        if getattr(parts.bottleneck, "gaussian", False):
            with torch.no_grad():
                mean, logvar = parts.bottleneck.forward_stats(parts.encoder(x[:512]))
                kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
            out["posterior_kl"] = float(kl.mean())
        out["checkpoint"] = str(ckpt)
        return out

    def latent_cache(self, arm: Arm, ckpt: Path) -> Path:
        """``arms/<arm>/latents/{train,val}`` encoded once with the final tokenizer."""
        from dmvae_lightning.data.images import FashionMNIST
        from dmvae_lightning.latents import LatentCache, encode_dataset

        root = self.runs / "arms" / arm.key / "latents"
        tok = None
        for split, folder in (("train", "train"), ("test", "val")):
            out = root / folder
            try:
                LatentCache(out).check_tokenizer(ckpt)
                continue
            except (FileNotFoundError, ValueError):
                pass
            tok = tok or _load_tokenizer(ckpt)
            data = FashionMNIST(split=split, channels=1, pad_to=32)
            if self.quick:  # a slice of the split: enough batches for the quick generator
                data = torch.utils.data.Subset(data, range(QUICK_CACHE[folder]))
            start = time.perf_counter()
            encode_dataset(
                tok,
                data,
                out,
                batch_size=500,
                progress=False,
                dtype="float32",
                tokenizer_ckpt=ckpt,
                dataset_name=f"fashion_mnist:{split}",
            )
            self.timings[f"{arm.key}/cache_{folder}"] = time.perf_counter() - start
        return root

    def generator(self, arm: Arm, tokenizer: Path, cache: Path, seed: int) -> Path:
        overlay = _merge(
            {
                "model": {
                    "init_args": {
                        "tokenizer_ckpt": str(tokenizer),
                        "encode_images": False,
                        "seed": seed,
                    }
                },
                "data": {
                    "init_args": {"dataset": "latent_cache", "root": str(cache), "seed": seed}
                },
            },
            load_overlay(arm.generator, self.configs),
        )
        if self.generator_steps is not None:
            overlay = _merge(overlay, {"trainer": {"max_steps": self.generator_steps}})
        ckpt = self.runs / "arms" / arm.key / f"generator_seed{seed}.ckpt"
        self._fit("diffusion.yaml", overlay, ckpt, f"{arm.key}/generator_seed{seed}", seed)
        return ckpt

    def evaluate_generator(self, ckpt: Path, seed: int) -> dict[str, float]:
        from dmvae_lightning import flow
        from dmvae_lightning.metrics import frechet_distance
        from dmvae_lightning.metrics.evaluate import inception_score
        from dmvae_lightning.modules.diffusion import LatentDiffusionModule

        gen = LatentDiffusionModule.load_from_checkpoint(
            str(ckpt), map_location="cpu", weights_only=True
        ).eval()
        classes = int(gen.hparams.num_classes)
        n = self.sizes["gen_samples"]
        labels = torch.arange(n) % classes
        g = torch.Generator().manual_seed(10_000 + seed)
        feats, logits = [], []
        fid = self.fid_features()
        for part in labels.split(500):
            images = gen.sample(part, generator=g, decode=True).clamp(-1, 1)
            f, lg = fid.features_and_logits(images)
            feats.append(f)
            logits.append(lg)
        from dmvae_lightning.metrics.fid import feature_stats

        out = {
            "gfid": frechet_distance(feature_stats(torch.cat(feats)), self.real_stats()),
            "is": inception_score(torch.cat(logits), splits=10)[0],
        }
        # flow-matching loss on the test latents: stratified t, seeded noise, EMA weights
        x, y = self.eval_set()
        z = gen.normalize(_chunks(gen.tokenizer.encode, x))
        t = (torch.arange(z.shape[0], dtype=torch.float32) + 0.5) / z.shape[0]
        t = t[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(1))]
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
        losses = []
        with torch.no_grad(), gen.ema_scope():
            for sl in torch.arange(z.shape[0]).split(1000):
                loss, _ = flow.velocity_loss(gen.dit, z[sl], y[sl], t=t[sl], eps=eps[sl])
                losses.append(float(loss) * sl.numel())
        out["fm_loss"] = sum(losses) / z.shape[0]
        return out

    # ---------------------------------------------------------------- arms
    def run_arm(self, arm: Arm) -> dict[str, Any]:
        """Train and evaluate ``arm`` (finished parts are read back); returns its result."""
        arm_dir = self.runs / "arms" / arm.key
        result_file = arm_dir / "result.json"
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if (
                result.get("seeds") == list(self.seeds)
                and result.get("generator_steps") == self.generator_steps
            ):
                self.log(f"[study] {arm.key}: done, read {result_file.relative_to(self.runs)}")
                return result
        start = time.perf_counter()
        self.log(f"[study] arm {arm.key}: {arm.title}")
        arm_dir.mkdir(parents=True, exist_ok=True)
        tok_ckpt = self.tokenizer(arm)
        tok_file = arm_dir / "tokenizer.json"
        if tok_file.is_file() and json.loads(tok_file.read_text()).get("checkpoint") == str(
            tok_ckpt
        ):
            tok_result = json.loads(tok_file.read_text())
        else:
            tok_result = self.evaluate_tokenizer(arm, tok_ckpt)
            tok_file.write_text(json.dumps(tok_result, indent=2))
        cache = self.latent_cache(arm, tok_ckpt)
        per_seed = []
        for seed in self.seeds:
            seed_file = arm_dir / f"generator_seed{seed}.json"
            if seed_file.is_file():
                per_seed.append(json.loads(seed_file.read_text()))
                continue
            ckpt = self.generator(arm, tok_ckpt, cache, seed)
            res = {"seed": seed, **self.evaluate_generator(ckpt, seed)}
            seed_file.write_text(json.dumps(res, indent=2))
            per_seed.append(res)
            self.log(f"[study] {arm.key} seed {seed}: " + _fmt(res))
        result = {
            "key": arm.key,
            "title": arm.title,
            "table": arm.table,
            "order": arm.order,
            "reference": arm.reference,
            "seeds": list(self.seeds),
            "generator_steps": self.generator_steps,
            "tokenizer": tok_result,
            "generators": per_seed,
            "summary": summarize(per_seed),
            "seconds": time.perf_counter() - start,
            "timings": {k: v for k, v in self.timings.items() if k.startswith(arm.key + "/")},
        }
        result_file.write_text(json.dumps(result, indent=2))
        return result

    def latents_for_figure(
        self, result: dict[str, Any], n: int = 600
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tok = _load_tokenizer(Path(result["tokenizer"]["checkpoint"]))
        x, y = self.eval_set()
        return _chunks(tok.encode, x[:n]), y[:n]

    def run(self, arms: Sequence[Arm]) -> dict[str, Any]:
        """Every arm in the order given, then the report (rows in table order). Returns the
        study's JSON."""
        start = time.perf_counter()
        done = [(arm, self.run_arm(arm)) for arm in arms]  # in the order given
        rows = [row for arm, row in sorted(done, key=lambda d: (d[0].table, d[0].order))]
        report = {
            "seeds": list(self.seeds),
            "generator_steps": self.generator_steps,
            "quick": self.quick,
            "sizes": self.sizes,
            "arms": rows,
            "shared_seconds": {k: v for k, v in self.timings.items() if k.startswith("shared/")},
            "seconds": time.perf_counter() - start,
        }
        self.runs.mkdir(parents=True, exist_ok=True)
        (self.runs / "study.json").write_text(json.dumps(report, indent=2))
        (self.runs / "study.md").write_text(study_markdown(report))
        try:
            self.figures(rows)
        except ImportError as err:  # matplotlib is an optional dependency
            self.log(f"[study] no figures: {err}")
        return report

    def figures(self, rows: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from dmvae_lightning.plots import save_figure

        out = self.runs / "figures"
        out.mkdir(parents=True, exist_ok=True)
        figs = {
            "gfid": gfid_figure(rows),
            "psnr_vs_gfid": psnr_gfid_figure(rows),
        }
        pca = {}
        for row in rows:
            z, y = self.latents_for_figure(row)
            ref = None
            if row["reference"]:
                mean, scale = self.reference_model_stats(row["reference"])
                ref = (self.reference_samples(row["reference"])[:600] - mean) * scale
                z = (z - mean) * scale
            pca[row["key"]] = (z, y, ref)
        figs["latent_pca"] = pca_figure(pca, {r["key"]: r["title"] for r in rows})
        writer = SummaryWriter(str(self.runs / "tb" / "summary"))
        for name, fig in figs.items():
            save_figure(fig, out / f"{name}.png")
            writer.add_figure(f"study/{name}", fig)
        for i, row in enumerate(rows):
            for k, v in row["summary"].items():
                writer.add_scalar(f"{row['key']}/{k}", v, i)
            for k in ("psnr", "rfid", "probe_acc", "mmd", "swd"):
                if k in row["tokenizer"]:
                    writer.add_scalar(f"{row['key']}/{k}", row["tokenizer"][k], i)
        writer.close()


# --------------------------------------------------------------------------------- helpers
def _load_tokenizer(ckpt: Path):
    from dmvae_lightning.latents import load_frozen_tokenizer

    return load_frozen_tokenizer(ckpt, option=str(ckpt))


def _chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 500
) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(part) for part in x.split(size)])


def linear_probe(
    z_train: torch.Tensor,
    y_train: torch.Tensor,
    z_test: torch.Tensor,
    y_test: torch.Tensor,
    steps: int = 300,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a multinomial logistic regression on flattened latents (standardised
    with the training set's per-feature mean / std; full-batch Adam, ``steps`` steps, seeded)."""
    a, b = z_train.flatten(1).double(), z_test.flatten(1).double()
    mean, std = a.mean(0), a.std(0).clamp_min(1e-6)
    a, b = ((a - mean) / std).float(), ((b - mean) / std).float()
    classes = int(max(y_train.max(), y_test.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(a), y_train).backward()
            opt.step()
    with torch.no_grad():
        return float((head(b).argmax(1) == y_test).float().mean())


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (n - 1; 0 for one seed) over seeds of every generator metric."""
    out: dict[str, float] = {}
    keys = [k for k in per_seed[0] if k != "seed"] if per_seed else []
    for key in keys:
        values = torch.tensor([float(r[key]) for r in per_seed], dtype=torch.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
    return out


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))


def _pm(summary: dict[str, float], key: str, digits: int = 2) -> str:
    if f"{key}_mean" not in summary:
        return "n/a"
    return f"{summary[key + '_mean']:.{digits}f} ± {summary[key + '_std']:.{digits}f}"


def _num(values: dict[str, Any], key: str, fmt: str) -> str:
    return format(values[key], fmt) if key in values else "n/a"


TABLE_HEADER = (
    "| arm | reference | PSNR (dB) | rFID | gFID | IS (domain) | FM loss | MMD² to ref "
    "(ablation) | SW2² to ref (ablation) | probe acc | seconds |"
)


def study_markdown(report: dict[str, Any]) -> str:
    """The tables of ``study.md``: one per paper table, mean ± std over the generator seeds."""
    sizes = report["sizes"]
    lines = [
        f"Seeds {report['seeds']} (generator; mean ± sample std); generators "
        f"{report.get('generator_steps') or 1200} steps on cached latents. gFID / IS: "
        f"{sizes['gen_samples']} class-balanced samples (50-step Euler, no CFG) vs "
        f"{sizes['eval_images']} test images, domain FID net. PSNR / rFID on the same test images. "
        f"Latent distances in the reference model's normalised space ({sizes['distance']} "
        "samples); in brackets the same for the arm's ablation (matching weight 0). Probe: linear "
        f"classifier on the latents ({sizes['probe_train']} training images). FM loss: the "
        "generator's flow-matching loss on the test latents."
        + (" QUICK RUN: numbers are meaningless." if report.get("quick") else ""),
    ]
    for table in sorted({r["table"] for r in report["arms"]}):
        lines += ["", f"### Table {table}", "", TABLE_HEADER, "|" + "---|" * 11]
        for row in (r for r in report["arms"] if r["table"] == table):
            t, s = row["tokenizer"], row["summary"]

            def dist(key: str, t=t) -> str:
                if key not in t:
                    return "n/a"
                abl = f" ({t['ablation_' + key]:.4f})" if f"ablation_{key}" in t else ""
                return f"{t[key]:.4f}{abl}"

            lines.append(
                f"| {row['title']} | {row['reference'] or '-'} | {_num(t, 'psnr', '.2f')} "
                f"| {_num(t, 'rfid', '.2f')} | {_pm(s, 'gfid')} | {_pm(s, 'is')} "
                f"| {_pm(s, 'fm_loss', 3)} | {dist('mmd')} | {dist('swd')} "
                f"| {_num(t, 'probe_acc', '.3f')} | {row['seconds']:.0f} |"
            )
    shared = report.get("shared_seconds") or {}
    if shared:
        lines += [
            "",
            "Shared stages (seconds): " + ", ".join(f"{k[7:]} {v:.0f}" for k, v in shared.items()),
        ]
    lines.append(f"\nTotal: {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- figures
def _fig(**kwargs: Any):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def gfid_figure(rows: list[dict[str, Any]]):
    """Bar chart of gFID per arm, error bars = std over seeds, seeds as dots."""
    fig = _fig(figsize=(max(6, 0.6 * len(rows) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        s = row["summary"]
        ax.bar(
            i,
            s["gfid_mean"],
            yerr=s["gfid_std"],
            color="#4c72b0" if row["table"] == 1 else "#dd8452",
            capsize=3,
        )
        ax.scatter(
            [i] * len(row["generators"]),
            [g["gfid"] for g in row["generators"]],
            s=8,
            c="k",
            zorder=3,
        )
    ax.set_xticks(range(len(rows)), [r["key"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("gFID (domain net)")
    ax.set_title("gFID per arm (mean ± std over seeds; dots: seeds)", fontsize=9)
    return fig


def psnr_gfid_figure(rows: list[dict[str, Any]]):
    fig = _fig(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        s = row["summary"]
        ax.errorbar(
            row["tokenizer"]["psnr"], s["gfid_mean"], yerr=s["gfid_std"], fmt="o", capsize=3
        )
        ax.annotate(
            row["key"],
            (row["tokenizer"]["psnr"], s["gfid_mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("PSNR (dB)")
    ax.set_ylabel("gFID")
    ax.set_title("reconstruction vs generation", fontsize=9)
    return fig


def pca_figure(
    latents: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    titles: dict[str, str],
):
    """Per arm: the first two principal components of its latents (coloured by class) and of its
    reference's samples (grey), both in the reference model's normalised space."""
    n = len(latents)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _fig(figsize=(3 * cols, 3 * rows), layout="constrained")
    for i, (key, (z, y, ref)) in enumerate(latents.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        flat = z.flatten(1).double()
        center = flat.mean(0)
        _, _, v = torch.pca_lowrank(flat - center, q=2, center=False)
        if ref is not None:
            r = (ref.flatten(1).double() - center) @ v
            ax.scatter(r[:, 0], r[:, 1], s=2, c="#9aa5b1", alpha=0.5, linewidths=0)
        p = (flat - center) @ v
        ax.scatter(p[:, 0], p[:, 1], s=2, c=y.numpy(), cmap="tab10", linewidths=0)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=6)
    return fig


# --------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="dmvae study", description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="generator seeds, comma-separated",
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long stages (tests)")
    parser.add_argument(
        "--generator_steps", type=int, default=None, help="steps per generator (default 1200)"
    )
    parser.add_argument("--runs", default="runs/study", help="output folder")
    parser.add_argument("--root", default=".", help="repository root (holds configs/)")
    parser.add_argument("--list", action="store_true", help="list the arms and exit")
    args = parser.parse_args(argv)
    names = args.arms.split(",") if args.arms else None
    arms = load_arms(Path(args.root) / ARMS_DIR, names=names)
    if names:  # run in the order given (the report keeps the table order)
        arms.sort(key=lambda a: names.index(a.key))
    if args.list:
        for arm in arms:
            print(f"{arm.key:28s} table {arm.table}  {arm.title}")
        return {}
    study = Study(
        args.runs,
        root=args.root,
        seeds=[int(s) for s in args.seeds.split(",")],
        quick=args.quick,
        generator_steps=args.generator_steps,
    )
    report = study.run(arms)
    print("\n" + study_markdown(report))
    print(
        f"[study] {study.runs / 'study.md'}, {study.runs / 'figures'}, tensorboard --logdir {study.runs / 'tb'}"
    )
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
