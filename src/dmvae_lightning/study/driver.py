"""The study driver: trains the stages of each arm (shared ones once), evaluates, reports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from dmvae_lightning.study.arms import (
    ARMS_DIR,
    CONFIGS,
    DEFAULT_GENERATOR_STEPS,
    DEFAULT_SEEDS,
    ENCODER_OF,
    FULL_EVAL,
    QUICK_CACHE,
    QUICK_EVAL,
    QUICK_TRAINER,
    REFERENCES,
    SHARED,
    Arm,
    budget_suffix,
    frozen_encoder,
    load_arms,
    load_overlay,
    merge,
    result_name,
    stage_kind,
)
from dmvae_lightning.study.evaluation import (
    CHUNK,
    fashion_mnist,
    flow_matching_loss,
    in_chunks,
    latent_distances,
    linear_probe,
    load_tokenizer,
    posterior_kl,
    seeded_indices,
    seeded_subset,
)
from dmvae_lightning.study.report import (
    gfid_figure,
    pca_figure,
    psnr_gfid_figure,
    short_metrics,
    study_markdown,
    summarize,
)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS / Windows


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` whole or not at all (a temporary file renamed):
    another study process never reads half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def trained_seconds(ckpt: Path) -> float:
    """Training seconds already in ``ckpt``, an interrupted stage's epoch-end save: what
    Lightning's ``Timer`` callback (which :meth:`Study._train` adds to every stage) recorded up
    to that save, earlier resumed pieces included. 0 for a checkpoint written without it (by a
    study older than the callback)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    timer = state.get("callbacks", {}).get("Timer", {})
    return float(timer.get("time_elapsed", {}).get("train", 0.0))


@contextlib.contextmanager
def stage_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``path`` with its suffix replaced) for the
    block: study processes sharing a runs folder (``--jobs``) build each stage once, the
    others wait for it. An ``flock``, so a killed process releases it; the file stays. Where
    ``fcntl`` is missing (Windows) this locks nothing, and ``--jobs`` refuses to run."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Study:
    """Runs stages and evaluations for a set of arms (see the module docstring).

    Args:
        runs: output folder.
        root: the repository root (holds ``configs/fashion_mnist``).
        seeds: generator seeds per arm.
        quick: seconds-long stages and small evaluation sets (tests).
        generator_steps: training steps of every generator (600, half the ``max_steps`` of
            configs/fashion_mnist/diffusion.yaml, so three seeds fit the budget; None: the
            config's). Each budget names its files apart (:func:`budget_suffix`: the
            default's ``generator_seed<s>.json`` / ``result.json`` / ``study.md``, another's
            ``generator_steps<N>_seed<s>.json`` / ``result_steps<N>.json`` /
            ``study_steps<N>.md``), so budgets share one runs folder, its tokenizers and caches.
        log: printer of progress lines.
    """

    def __init__(
        self,
        runs: str | os.PathLike = "runs/study",
        root: str | os.PathLike = ".",
        seeds: Sequence[int] = DEFAULT_SEEDS,
        quick: bool = False,
        generator_steps: int | None = DEFAULT_GENERATOR_STEPS,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.runs = Path(runs).resolve()
        self.root = Path(root).resolve()
        self.configs = self.root / CONFIGS
        self.generator_steps = generator_steps
        #: file-name suffix of this generator budget (:func:`budget_suffix`)
        self.suffix = budget_suffix(generator_steps)
        self.seeds = tuple(int(s) for s in seeds)
        self.quick = quick
        self.sizes = QUICK_EVAL if quick else FULL_EVAL
        self.log = log
        #: seconds of the stages trained by this object (what a resumed run redid)
        self.timings: dict[str, float] = {}
        #: seconds of every stage met, read back from ``<ckpt>.seconds`` for skipped ones
        self.stage_seconds: dict[str, float] = {}
        self._cache: dict[str, Any] = {}
        self._arms: dict[str, Arm] | None = None
        self._check_mode()

    MODE_FILE = "study_mode.json"

    def _check_mode(self) -> None:
        """A runs folder holds a ``--quick`` study or a full one, never both: its stages,
        caches and results would be read back by the other (30-batch tokenizers in a full
        table). ``<runs>/study_mode.json`` records which; a mismatch is an error."""
        mode_file = self.runs / self.MODE_FILE
        if mode_file.is_file():
            quick = bool(json.loads(mode_file.read_text()).get("quick"))
            if quick != self.quick:
                held, asked = ("a --quick", "a full") if quick else ("a full", "a --quick")
                raise ValueError(
                    f"--runs {self.runs} holds {held} study and this is {asked} one: their "
                    "stages and results would be mixed; use another --runs folder"
                )
            return
        self.runs.mkdir(parents=True, exist_ok=True)
        write_json(mode_file, {"quick": self.quick})

    @property
    def all_arms(self) -> dict[str, Arm]:
        """Every arm of ``configs/fashion_mnist/study`` by key (read once)."""
        if self._arms is None:
            self._arms = {a.key: a for a in load_arms(self.root / ARMS_DIR)}
        return self._arms

    def arm(self, key: str) -> Arm:
        """Arm ``key`` of ``configs/fashion_mnist/study`` (e.g. an arm's ``ablation``)."""
        if key not in self.all_arms:
            raise ValueError(f"unknown arm {key!r}; known: {sorted(self.all_arms)}")
        return self.all_arms[key]

    # ---------------------------------------------------------------- where things live
    def shared_checkpoint(self, name: str) -> Path:
        """Where shared stage ``name``'s checkpoint lives (``shared/<name>.ckpt``); trains
        nothing (:meth:`shared` does)."""
        return self.runs / "shared" / f"{name}.ckpt"

    def arm_dir(self, arm: Arm) -> Path:
        """``arms/<arm>``: the arm's stages, caches and results."""
        return self.runs / "arms" / arm.key

    def seed_file(self, arm: Arm, seed: int) -> Path:
        """``arms/<arm>/generator_seed<seed>.json``: generator ``seed``'s evaluation
        (``generator_steps<N>_seed<seed>.json`` at a budget other than the default)."""
        return self.arm_dir(arm) / f"generator{self.suffix}_seed{seed}.json"

    def result_file(self, arm: Arm) -> Path:
        """``arms/<arm>/result.json``: the arm's result (``result_steps<N>.json`` at a
        generator budget other than the default)."""
        return self.arm_dir(arm) / result_name(self.generator_steps)

    def seed_stage(self, arm: Arm, seed: int) -> str:
        """The stage name of generator ``seed`` (TensorBoard run, timings key)."""
        return f"{arm.key}/{self.seed_file(arm, seed).stem}"

    def arm_prepared(self, arm: Arm) -> bool:
        """Whether :meth:`prepare_arm` has finished for ``arm`` in this runs folder (its
        tokenizer evaluated and both latent caches encoded, as their files say; the caches are
        checked against the tokenizer only when an arm reads them)."""
        arm_dir = self.arm_dir(arm)
        return (arm_dir / "tokenizer.json").is_file() and all(
            self.seconds_file(arm_dir / "latents" / split).is_file() for split in ("train", "val")
        )

    def tokenizer_checkpoints(self, arm: Arm) -> list[Path]:
        """Where the arm's tokenizer stages write their checkpoints, in order
        (``arms/<arm>/tokenizer_<i>_<kind>.ckpt``); trains nothing (:meth:`tokenizer` does)."""
        return [
            self.arm_dir(arm) / f"tokenizer_{i}_{stage_kind(stage['config'])}.ckpt"
            for i, stage in enumerate(arm.tokenizer)
        ]

    def same_stage(self, arm: Arm, i: int, finished: bool = True) -> tuple[Arm, Path] | None:
        """Another arm whose tokenizer stage ``i`` is ``arm``'s (the same
        :meth:`~dmvae_lightning.study.arms.Arm.stage_fingerprint`: the same reference, configs,
        overlays and seeds up to it), with its checkpoint there; the first by key, among those
        that finished it unless ``finished`` is False. None when there is none."""
        fingerprint = arm.stage_fingerprint(i)
        for other in sorted(self.all_arms.values(), key=lambda a: a.key):
            if other.key == arm.key or len(other.tokenizer) <= i:
                continue
            if other.stage_fingerprint(i) != fingerprint:
                continue
            ckpt = self.tokenizer_checkpoints(other)[i]
            if not finished or self.stage_finished(ckpt):
                return other, ckpt
        return None

    def tokenizer_trained(self, arm: Arm) -> bool:
        """Whether every tokenizer stage of ``arm`` has finished (checkpoint and seconds)."""
        return all(self.stage_finished(c) for c in self.tokenizer_checkpoints(arm))

    # ---------------------------------------------------------------- running stages
    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@runs"):
            return str(self.runs) + value[len("@runs") :]
        if isinstance(value, str) and value.startswith("@latents/"):
            return str(self.shared_latents(value[len("@latents/") :]))
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
        unless it exists; the seconds spent go to ``timings[tb_name]`` and to ``<ckpt>.seconds``
        (read back when the stage is skipped, so a resumed arm still reports every stage's
        time). Returns them (0 when skipped).

        Safe across processes (``--jobs``): the stage is trained under its lock file
        (:func:`stage_lock`), so a second study process asking for it waits and then reads it;
        the stages its overlay names are resolved (trained if missing) before, not under, it."""
        with stage_lock(ckpt):
            if self._done(ckpt, tb_name):
                return 0.0
        resolved = self._resolve(overlay)  # may train the stages it names: not under the lock
        with stage_lock(ckpt):
            if self._done(ckpt, tb_name):  # trained by another study process meanwhile
                return 0.0
            return self._train(config, resolved, ckpt, tb_name, seed)

    def _done(self, ckpt: Path, name: str) -> bool:
        """Whether the stage writing ``ckpt`` finished (then its seconds are read back): its
        ``<ckpt>.seconds`` is written once ``dmvae fit`` has returned. A checkpoint without it
        is the epoch-end save of a multi-epoch stage that was killed, not a finished stage:
        :meth:`_train` resumes it."""
        if self.stage_finished(ckpt):
            self._read_seconds(ckpt, name)
            return True
        return False

    @classmethod
    def stage_finished(cls, ckpt: Path) -> bool:
        """Whether the stage writing ``ckpt`` finished: the checkpoint and its ``.seconds``
        (written once ``dmvae fit`` has returned) are both there."""
        return ckpt.is_file() and cls.seconds_file(ckpt).is_file()

    def _train(
        self, config: str, overlay: dict[str, Any], ckpt: Path, tb_name: str, seed: int | None
    ) -> float:
        """:meth:`_fit`'s training (``overlay`` resolved, the stage not finished, its lock
        held). A ``ckpt`` already there (an interrupted stage's last epoch-end save) is resumed
        with ``--ckpt_path``: weights, optimizers, step counters and data order, exactly; the
        seconds recorded are then those of this piece plus the training seconds the checkpoint
        holds (:func:`trained_seconds`; work redone after the last save counts once)."""
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
                    },
                    # its state (training seconds so far) goes into every save: a resumed
                    # stage's seconds add up its pieces (trained_seconds)
                    # (interval given: its default is an Enum the saved config cannot hold)
                    {
                        "class_path": "lightning.pytorch.callbacks.Timer",
                        "init_args": {"interval": "step"},
                    },
                ],
                "enable_progress_bar": False,
                "enable_model_summary": False,
            }
        }
        if seed is not None:
            paths["seed_everything"] = seed
        if self.quick:
            batches = QUICK_TRAINER[stage_kind(config)]
            paths["trainer"].update(
                limit_train_batches=batches, limit_val_batches=1, max_epochs=1, max_steps=-1
            )
        full = merge(overlay, paths)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        overlay_file = ckpt.with_suffix(".overlay.yaml")
        overlay_file.write_text(yaml.safe_dump(full, sort_keys=False))
        args = ["fit", "--config", str(self.configs / config), "--config", str(overlay_file)]
        before = 0.0
        if ckpt.is_file():
            before = trained_seconds(ckpt)
            self.log(
                f"[study] resume {config} from {ckpt.relative_to(self.runs)} (interrupted after"
                f" {before:.0f} s of training)"
            )
            args += ["--ckpt_path", str(ckpt)]
        else:
            self.log(f"[study] fit {config} -> {ckpt.relative_to(self.runs)}")
        start = time.perf_counter()
        cli_main(args)
        if not ckpt.is_file():
            raise RuntimeError(f"dmvae fit {config} finished without writing {ckpt}")
        return self._write_seconds(ckpt, tb_name, before + time.perf_counter() - start)

    @staticmethod
    def seconds_file(path: Path) -> Path:
        """``<path>.seconds``: how long the stage or cache ``path`` took to build (written once
        it is complete)."""
        return path.with_suffix(".seconds")

    def _write_seconds(self, path: Path, name: str, seconds: float) -> float:
        """Record that stage ``name`` (output ``path``) took ``seconds``: in ``timings``, in
        ``stage_seconds`` and in ``<path>.seconds`` (:meth:`_read_seconds` reads it back).
        Returns ``seconds``."""
        self.timings[name] = self.stage_seconds[name] = seconds
        self.seconds_file(path).write_text(f"{seconds:.1f}\n")
        return seconds

    def _read_seconds(self, ckpt: Path, name: str) -> None:
        """Put the time stage ``name`` took when it was trained (``<ckpt>.seconds``, written by
        :meth:`_write_seconds`) in ``stage_seconds``; nothing when the file is missing."""
        seconds_file = self.seconds_file(ckpt)
        if seconds_file.is_file():
            self.stage_seconds[name] = float(seconds_file.read_text())

    def shared(self, name: str) -> Path:
        """Checkpoint of shared stage ``name``, trained first when missing."""
        if name not in SHARED:
            raise KeyError(f"unknown shared stage {name!r}; known: {sorted(SHARED)}")
        ckpt = self.shared_checkpoint(name)
        stage = SHARED[name]
        self._fit(stage.config, stage.overlay, ckpt, f"shared/{name}", None)  # no-op when done
        return ckpt

    def shared_latents(self, tokenizer: str) -> Path:
        """``shared/latents_<tokenizer>``: the training images encoded once with shared
        tokenizer stage ``tokenizer`` (a latent cache; a bank for reference sources)."""
        ckpt = self.shared(tokenizer)
        return self._encode(
            ckpt,
            self.runs / "shared" / f"latents_{tokenizer}",
            "train",
            f"shared/latents_{tokenizer}",
        )

    def tokenizer(self, arm: Arm) -> Path:
        """The arm's final tokenizer checkpoint (its stages trained in order)."""
        prev = self.shared(REFERENCES[arm.reference].tokenizer) if arm.reference else None
        encoder = ENCODER_OF.get(REFERENCES[arm.reference].tokenizer) if arm.reference else None
        ckpts = self.tokenizer_checkpoints(arm)
        for i, (stage, ckpt) in enumerate(zip(arm.tokenizer, ckpts, strict=True)):
            kind = stage_kind(stage["config"])
            model: dict[str, Any] = {}
            if stage.get("from") != "scratch":
                if prev is None:
                    raise ValueError(f"arm {arm.key}: stage {i} has nothing to start from")
                model["init_from"] = str(prev)
            if encoder is not None:
                frozen = kind != "align"
                model["encoder"] = frozen_encoder(str(self.shared(encoder)), frozen=frozen)
            if kind == "align" and arm.reference:
                model["matching_loss"] = {
                    "init_args": {"real_model": str(self.shared(REFERENCES[arm.reference].model))}
                }
            overlay = merge(
                {"model": {"init_args": model}}, load_overlay(stage.get("overlay"), self.configs)
            )
            self._reuse_stage(arm, i, ckpt, f"{arm.key}/{i}_{kind}")
            self._fit(stage["config"], overlay, ckpt, f"{arm.key}/{i}_{kind}", None)
            prev = ckpt
        if prev is None:
            raise ValueError(f"arm {arm.key}: no tokenizer")
        return prev

    def _reuse_stage(self, arm: Arm, i: int, ckpt: Path, name: str) -> None:
        """Copy another arm's finished stage ``i`` to ``ckpt`` (with its ``.seconds``) when it
        is the same stage (:meth:`same_stage`) and ``ckpt`` has not been started here (a
        partial one is resumed by :meth:`_fit`). A copy, not a link: resuming or retraining
        one arm's stage then cannot rewrite the other's file. ``<ckpt>.reused`` names the
        source; the arm's seconds count the stage as trained (what the arm costs alone)."""
        with stage_lock(ckpt):
            if ckpt.is_file():
                return
            same = self.same_stage(arm, i)
            if same is None:
                return
            other, source = same
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            partial = ckpt.with_name(ckpt.name + ".partial")
            shutil.copyfile(source, partial)
            os.replace(partial, ckpt)
            # the .seconds file marks the stage finished: written last
            self.seconds_file(ckpt).write_text(self.seconds_file(source).read_text())
            ckpt.with_suffix(".reused").write_text(f"{source.relative_to(self.runs)}\n")
            self.log(
                f"[study] {name}: the same stage as {other.key}'s (same reference, configs,"
                f" overlays and seeds); copied {source.relative_to(self.runs)}, not retrained"
            )

    # ---------------------------------------------------------------- data and evaluation
    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fashion-MNIST ``split`` images (N, 1, 32, 32) in [-1, 1] and labels (cached)."""
        key = f"images/{split}"
        if key not in self._cache:
            self._cache[key] = fashion_mnist(split)
        return self._cache[key]

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``eval_images`` test images (a fixed, class-mixed order) and labels."""
        x, y = self.images("test")
        n = min(self.sizes["eval_images"], x.shape[0])
        return x[:n], y[:n]

    def train_subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training images and labels, a seeded subset."""
        return seeded_subset(*self.images("train"), n, seed)

    def fid_features(self):
        if "fid" not in self._cache:
            from dmvae_lightning.metrics import DomainFeatures

            self._cache["fid"] = DomainFeatures(self.shared("fid_net"), option="fid_net")
        return self._cache["fid"]

    @property
    def stats_cache(self):
        """FID statistics on disk (``shared/fid_stats``), shared by the processes of a study
        (a :class:`~dmvae_lightning.metrics.StatsCache`; its ``hits`` / ``misses`` count)."""
        if "stats_cache" not in self._cache:
            from dmvae_lightning.metrics import StatsCache

            self._cache["stats_cache"] = StatsCache(self.runs / "shared" / "fid_stats")
        return self._cache["stats_cache"]

    def real_stats(self):
        """FID statistics of the evaluation images (:meth:`eval_set`) under the FID net, kept
        in :attr:`stats_cache` (keyed by the images' content and the FID net's weights): each
        worker process of a parallel study reads them instead of recomputing them."""
        if "real_stats" not in self._cache:
            self._cache["real_stats"] = self.stats_cache.stats(
                self.eval_set()[0], self.fid_features(), batch_size=500
            )
        return self._cache["real_stats"]

    def _checkpoint(self, ckpt: Path) -> dict[str, Any]:
        """The contents of checkpoint file ``ckpt`` (read once per study object)."""
        key = f"checkpoint/{ckpt}"
        if key not in self._cache:
            self._cache[key] = torch.load(ckpt, map_location="cpu", weights_only=True)
        return self._cache[key]

    def reference_model_stats(self, reference: str) -> tuple[float, float]:
        """``(latent_mean, latent_scale)`` of the reference's score model: its normalisation
        ``(z - mean) * scale`` of raw latents."""
        state = self._checkpoint(self.shared(REFERENCES[reference].model))["state_dict"]
        return float(state["latent_mean"]), float(state["latent_scale"])

    def test_latents(self, tokenizer: str) -> torch.Tensor:
        """Raw latents of the evaluation images (:meth:`eval_set`) under shared tokenizer stage
        ``tokenizer``, encoded once per study object."""
        key = f"test_latents/{tokenizer}"
        if key not in self._cache:
            tok = load_tokenizer(self.shared(tokenizer))
            self._cache[key] = in_chunks(tok.encode, self.eval_set()[0])
        return self._cache[key]

    def reference_samples(self, reference: str) -> torch.Tensor:
        """``distance`` samples of the reference, raw (the score model's input space)."""
        key = f"reference/{reference}"
        if key in self._cache:
            return self._cache[key]
        n = self.sizes["distance"]
        ref = REFERENCES[reference]
        if ref.source is None:  # the stage-1 tokenizer's latents of other training images
            tok = load_tokenizer(self.shared(ref.tokenizer))
            z = in_chunks(tok.encode, self.train_subset(n, seed=1234)[0])
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

    def reference_quality(self, reference: str) -> dict[str, Any]:
        """The reference score model's fit: its flow-matching loss (:func:`flow_matching_loss`)
        on the stage-1 tokenizer's latents of the test images (references of tokenizer
        latents only; {} for source references, whose samples are not images' latents) and
        its training steps."""
        ref = REFERENCES[reference]
        if ref.source is not None:
            return {}
        key = f"quality/{reference}"
        if key not in self._cache:
            from dmvae_lightning.modules.diffusion import LatentDiffusionModule

            ckpt = self.shared(ref.model)
            model = LatentDiffusionModule.load_from_checkpoint(
                str(ckpt), map_location="cpu", weights_only=True
            ).eval()
            z = model.normalize(self.test_latents(ref.tokenizer))
            self._cache[key] = {
                "model": ref.model,
                "fm_loss": flow_matching_loss(model, z, self.eval_set()[1]),
                "steps": int(self._checkpoint(ckpt).get("global_step", 0)),
            }
        return self._cache[key]

    def distances(self, z: torch.Tensor, reference: str) -> dict[str, float]:
        """MMD^2 (RBF, unbiased) and SW2^2 (512 fixed directions) between raw latents ``z`` and
        the reference's samples, both mapped by the reference model's normalisation."""
        mean, scale = self.reference_model_stats(reference)
        ref = (self.reference_samples(reference) - mean) * scale
        return latent_distances((z[: ref.shape[0]] - mean) * scale, ref, seed=0)

    def evaluate_tokenizer(self, arm: Arm, ckpt: Path, cache: Path) -> dict[str, Any]:
        """``arm``'s final tokenizer ``ckpt`` on the evaluation images (PSNR, rFID, latent std),
        a linear probe, the posterior KL of a Gaussian bottleneck and, for arms with a
        reference, the latent distances to it (and to its control's). The arm's latents are read
        from its latent ``cache`` (:meth:`latent_cache`: ``val`` the evaluation images, ``train``
        the probe's and the distances' seeded training rows), not encoded again."""
        from dmvae_lightning.metrics import frechet_distance
        from dmvae_lightning.metrics.evaluate import psnr

        tok = load_tokenizer(ckpt)
        x, y = self.eval_set()
        z = self.eval_latents(cache / "val", ckpt)
        rec = in_chunks(lambda lat: tok.decode(lat).clamp(-1, 1), z)
        out: dict[str, Any] = {
            "psnr": psnr(x, rec),
            "rfid": frechet_distance(self.fid_features().stats(rec), self.real_stats()),
            "latent_std": float(z.std()),
        }
        z_train, y_train = self.cached_latents(cache / "train", ckpt, "train")
        rows = seeded_indices(z_train.shape[0], self.sizes["probe_train"], seed=7)
        out["probe_acc"] = linear_probe(z_train[rows], y_train[rows], z, y)
        if arm.reference is not None:
            rows = seeded_indices(z_train.shape[0], self.sizes["distance"], seed=99)
            out.update(self.distances(z_train[rows], arm.reference))
            if arm.ablation:
                control = self.arm(arm.ablation)
                if not self.tokenizer_trained(control):  # say so: it can be a long stage
                    self.log(
                        f"[study] {arm.key}: its control {control.key}'s tokenizer is not"
                        " trained yet; training it for the latent-distance column"
                    )
                abl_tok = load_tokenizer(self.tokenizer(control))
                # the same training rows (cache row i is training image i)
                zab = in_chunks(abl_tok.encode, self.images("train")[0][rows])
                out.update(
                    {f"ablation_{k}": v for k, v in self.distances(zab, arm.reference).items()}
                )
        kl = posterior_kl(tok, x[:512])
        if kl is not None:
            out["posterior_kl"] = kl
        out["checkpoint"] = str(ckpt)
        return out

    def cached_latents(
        self, cache: Path, ckpt: Path | str, split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of latent cache ``cache``: raw latents (N, C, H, W) and labels (N,). The
        cache must have been encoded by tokenizer ``ckpt`` from Fashion-MNIST ``split`` in its
        order (row i is image i: its labels are checked), as :meth:`latent_cache` writes it."""
        from dmvae_lightning.latents import LatentCache

        latent_cache = LatentCache(cache)
        latent_cache.check_tokenizer(ckpt)
        z, y = latent_cache.as_tensors()
        if not torch.equal(y, self.images(split)[1][: y.shape[0]]):
            images = "training" if split == "train" else split
            raise ValueError(f"latent cache {str(cache)!r} is not of the {images} images")
        return z, y

    def eval_latents(self, cache: Path, ckpt: Path | str) -> torch.Tensor:
        """Raw latents of the evaluation images (:meth:`eval_set`: the first test images) read
        from ``cache`` (an arm's ``latents/val``, encoded by tokenizer ``ckpt``)."""
        n = self.eval_set()[1].shape[0]
        z, _ = self.cached_latents(cache, ckpt, "test")
        if z.shape[0] < n:
            raise ValueError(
                f"latent cache {str(cache)!r} holds {z.shape[0]} test images, fewer than the"
                f" {n} evaluation images"
            )
        return z[:n]

    def latent_cache(self, arm: Arm, ckpt: Path) -> Path:
        """``arms/<arm>/latents/{train,val}`` encoded once with the final tokenizer."""
        root = self.arm_dir(arm) / "latents"
        self._encode(ckpt, root / "train", "train", f"{arm.key}/cache_train")
        self._encode(ckpt, root / "val", "test", f"{arm.key}/cache_val")
        return root

    def _encode(self, ckpt: Path, out: Path, split: str, name: str) -> Path:
        """Latent cache ``out`` of Fashion-MNIST ``split`` encoded with tokenizer ``ckpt``,
        unless ``out`` already caches that tokenizer (``--quick``: a slice of the split).
        Encoded under ``out``'s lock (:func:`stage_lock`); its seconds go to ``<out>.seconds``
        (read back when the cache is reused)."""
        from dmvae_lightning.latents import LatentCache

        with stage_lock(out):
            try:
                LatentCache(out).check_tokenizer(ckpt)
            except (FileNotFoundError, ValueError):
                self._write_seconds(out, name, self._encode_split(ckpt, out, split))
            else:
                self._read_seconds(out, name)
        return out

    def _encode_split(self, ckpt: Path, out: Path, split: str) -> float:
        """Encode ``split`` with tokenizer ``ckpt`` into cache ``out``; returns the seconds."""
        from dmvae_lightning.data.images import FashionMNIST
        from dmvae_lightning.latents import encode_dataset

        data = FashionMNIST(split=split, channels=1, pad_to=32)
        if self.quick:  # enough batches for the quick stages
            data = torch.utils.data.Subset(
                data, range(QUICK_CACHE["val" if split == "test" else "train"])
            )
        start = time.perf_counter()
        encode_dataset(
            load_tokenizer(ckpt),
            data,
            out,
            batch_size=CHUNK,
            progress=False,
            dtype="float32",
            tokenizer_ckpt=ckpt,
            dataset_name=f"fashion_mnist:{split}",
        )
        return time.perf_counter() - start

    def generator(self, arm: Arm, tokenizer: Path, cache: Path, seed: int) -> Path:
        overlay = merge(
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
            overlay = merge(overlay, {"trainer": {"max_steps": self.generator_steps}})
        ckpt = self.seed_file(arm, seed).with_suffix(".ckpt")
        self._fit("diffusion.yaml", overlay, ckpt, self.seed_stage(arm, seed), seed)
        return ckpt

    def evaluate_generator(
        self, ckpt: Path, seed: int, latents: Path | None = None
    ) -> dict[str, float]:
        """gFID and IS of ``gen_samples`` class-balanced samples (50-step Euler, no CFG, noise
        seeded by ``seed``) and the flow-matching loss on the evaluation images' latents: read
        from latent cache ``latents`` (the arm's ``latents/val``) when given, which must have
        been encoded by the generator's tokenizer checkpoint, else encoded here."""
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
        if latents is None:
            z = in_chunks(gen.tokenizer.encode, x)
        else:
            z = self.eval_latents(latents, gen.hparams.tokenizer_ckpt)
        out["fm_loss"] = flow_matching_loss(gen, gen.normalize(z), y)
        return out

    # ---------------------------------------------------------------- arms
    def finished(self, arm: Arm) -> dict[str, Any] | None:
        """``arm``'s saved result when it is complete for this study's seeds and generator
        steps, else None."""
        result_file = self.result_file(arm)
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            if (
                result.get("seeds") == list(self.seeds)
                and result.get("generator_steps") == self.generator_steps
            ):
                return result
        return None

    def prepare_arm(self, arm: Arm) -> tuple[Path, dict[str, Any], Path]:
        """``arm``'s tokenizer stages, their evaluation (``tokenizer.json``) and latent cache,
        each read back when done. Returns (tokenizer checkpoint, its evaluation, cache)."""
        arm_dir = self.arm_dir(arm)
        arm_dir.mkdir(parents=True, exist_ok=True)
        tok_ckpt = self.tokenizer(arm)
        cache = self.latent_cache(arm, tok_ckpt)
        tok_file = arm_dir / "tokenizer.json"
        saved = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
        if saved.get("checkpoint") == str(tok_ckpt):
            return tok_ckpt, saved, cache
        tok_result = self.evaluate_tokenizer(arm, tok_ckpt, cache)
        write_json(tok_file, tok_result)
        return tok_ckpt, tok_result, cache

    def run_seed(self, arm: Arm, tokenizer: Path, cache: Path, seed: int) -> dict[str, Any]:
        """Generator ``seed`` of ``arm`` on its latent ``cache``, trained and evaluated
        (:meth:`seed_file`; read back when done)."""
        seed_file = self.seed_file(arm, seed)
        if seed_file.is_file():
            self._read_seconds(seed_file.with_suffix(".ckpt"), self.seed_stage(arm, seed))
            return json.loads(seed_file.read_text())
        ckpt = self.generator(arm, tokenizer, cache, seed)
        start_eval = time.perf_counter()
        res = {"seed": seed, **self.evaluate_generator(ckpt, seed, cache / "val")}
        res["eval_seconds"] = time.perf_counter() - start_eval
        write_json(seed_file, res)
        self.log(f"[study] {arm.key} seed {seed}: " + short_metrics(res))
        return res

    def run_arm(self, arm: Arm) -> dict[str, Any]:
        """Train and evaluate ``arm`` (finished parts are read back); returns its result."""
        if (result := self.finished(arm)) is not None:
            self.log(f"[study] {arm.key}: done, read arms/{arm.key}/{self.result_file(arm).name}")
            return result
        start = time.perf_counter()
        self.log(f"[study] arm {arm.key}: {arm.title}")
        tok_ckpt, tok_result, cache = self.prepare_arm(arm)
        per_seed = [self.run_seed(arm, tok_ckpt, cache, seed) for seed in self.seeds]
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
            "timings": {k: v for k, v in self.stage_seconds.items() if k.startswith(arm.key + "/")},
        }
        # the arm's own compute: its training stages (kept across resumes) and evaluations
        result["stage_seconds"] = sum(result["timings"].values()) + sum(
            r.get("eval_seconds", 0.0) for r in per_seed
        )
        write_json(self.result_file(arm), result)
        return result

    def latents_for_figure(
        self, result: dict[str, Any], n: int = 600
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tok = load_tokenizer(Path(result["tokenizer"]["checkpoint"]))
        x, y = self.eval_set()
        return in_chunks(tok.encode, x[:n]), y[:n]

    def run(self, arms: Sequence[Arm], jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
        """Every arm in the order given, then the report (rows in table order). Returns the
        study's JSON. ``jobs`` > 1 first runs the work as up to ``jobs`` worker processes of
        ``threads`` torch threads each (default: the usable cores / ``jobs``, at least 1, and a
        unit that starts with nothing else ready takes the cores left free;
        :mod:`dmvae_lightning.study.parallel`); this process then reads their results back."""
        start = time.perf_counter()
        if jobs > 1:
            self.run_parallel(arms, jobs, threads)
        done = [(arm, self.run_arm(arm)) for arm in arms]  # in the order given
        rows = [row for arm, row in sorted(done, key=lambda d: (d[0].table, d[0].order))]
        report = {
            "seeds": list(self.seeds),
            "generator_steps": self.generator_steps,
            "quick": self.quick,
            "jobs": jobs,
            "sizes": self.sizes,
            "arms": rows,
            "references": {
                name: q
                for name in sorted({a.reference for a in arms if a.reference})
                if (q := self.reference_quality(name))
            },
            "shared_seconds": self.shared_seconds(),
            "seconds": time.perf_counter() - start,
        }
        self.runs.mkdir(parents=True, exist_ok=True)
        (self.runs / f"study{self.suffix}.json").write_text(json.dumps(report, indent=2))
        (self.runs / f"study{self.suffix}.md").write_text(study_markdown(report))
        try:
            self.figures(rows)
        except ImportError as err:  # matplotlib is an optional dependency
            self.log(f"[study] no figures: {err}")
        return report

    def run_parallel(
        self, arms: Sequence[Arm], jobs: int, threads: int | None = None
    ) -> dict[str, float]:
        """The units of ``arms`` left to do (:func:`~dmvae_lightning.study.parallel.plan`) as
        up to ``jobs`` worker processes (logs in ``<runs>/logs``, ``logs_steps<N>`` at another
        generator budget). Returns each unit's wall
        seconds."""
        from dmvae_lightning.study import parallel

        try:
            import fcntl  # noqa: F401 - the stage locks need it
        except ImportError as err:  # pragma: no cover - not POSIX
            raise RuntimeError("--jobs > 1 needs POSIX file locks (fcntl); use --jobs 1") from err
        cores = usable_cores() if threads is None else None  # --threads N: exactly N each
        if cores is not None:
            threads = max(1, cores // jobs)
        units = parallel.plan(self, arms)
        alone = "; a unit that starts alone: the free cores" if cores else ""
        self.log(f"[study] {len(units)} units, {jobs} at a time, {threads} thread(s) each{alone}")
        argv = ["--runs", str(self.runs), "--root", str(self.root)]
        argv += ["--seeds", ",".join(map(str, self.seeds))]
        argv += ["--generator_steps", str(self.generator_steps or 0)]
        argv += ["--quick"] if self.quick else []
        return parallel.run_units(
            units,
            parallel.worker_command(argv),
            jobs,
            self.runs / f"logs{self.suffix}",
            env=parallel.worker_env,
            log=self.log,
            threads=threads,
            cores=cores,
        )

    def shared_seconds(self) -> dict[str, float]:
        """Seconds of every shared stage of this run folder: those met by this object and
        every ``shared/*.seconds`` file (stages trained by earlier or parallel invocations)."""
        out = {k: v for k, v in self.stage_seconds.items() if k.startswith("shared/")}
        for file in sorted((self.runs / "shared").glob("*.seconds")):
            out.setdefault(f"shared/{file.stem}", float(file.read_text()))
        return dict(sorted(out.items()))

    def figures(self, rows: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from dmvae_lightning.plots import save_figure

        out = self.runs / f"figures{self.suffix}"
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
        writer = SummaryWriter(str(self.runs / "tb" / f"summary{self.suffix}"))
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
