"""`ReferenceDistribution`: the data module of every stage (images, labels, reference samples)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dmvae_lightning.data.images import DATASET_NAMES, build_image_dataset, locate_fashion_mnist
from dmvae_lightning.data.sources import ReferenceSource, ReferenceSpec, SourceContext
from dmvae_lightning.latents import META_FILE, LatentCache, describe_dataset

if TYPE_CHECKING:
    from dmvae_lightning.data.feeder import ReferenceFeeder

#: Image data sets plus ``"latent_cache"`` (latents written by ``python -m dmvae_lightning.latents``).
DATASETS = (*DATASET_NAMES, "latent_cache")


class EpochShuffleSampler(DistributedSampler):
    """A random permutation that is a pure function of ``(seed, epoch)``, split between ranks.

    Lightning calls :meth:`set_epoch` at the start of every training epoch, so a run resumed
    from a checkpoint at epoch k sees exactly the order an uninterrupted run sees at epoch k
    (a sampler drawing from a running generator would replay epoch 0's order instead).
    :meth:`resume_at` makes the next pass over a given epoch start at an offset (counted in
    items of the global order), for runs resumed from a mid-epoch checkpoint.

    With ``num_replicas`` W > 1, rank r takes items r, r + W, r + 2W, ... of the epoch's order
    (cut to a multiple of W), so the k-th global batch of W ranks holds exactly the items of the
    k-th batch of one process with a W times larger batch. It is a ``DistributedSampler`` only so
    that Lightning does not wrap it in a second, reshuffling one; it reads no process group.
    """

    def __init__(self, num_items: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ is not called: it needs a dataset and a process group.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.num_items = num_items
        self.seed = seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, first position)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Skip the first ``position`` items of the next pass if it is epoch ``epoch``."""
        self._resume = (epoch, position)

    def __len__(self) -> int:
        return self.num_items // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator)
        order = order[: len(order) - len(order) % self.num_replicas]
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            if epoch == self.epoch:
                order = order[position:]
        return iter(order[self.rank :: self.num_replicas].tolist())


class IndexedDataset(Dataset):
    """Items of ``dataset`` with ``"index"``: the item's position (int64 scalar) added, so
    per-item feature caches can address rows."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        item["index"] = torch.tensor(int(index), dtype=torch.int64)
        return item


class ReferenceDistribution(L.LightningDataModule):
    """Images with labels, and samples of the reference distribution ``p_r(z)``.

    Batch contract (every dataloader): a dict with
      * ``"image"``: float32 ``(B, channels, image_size, image_size)`` in ``[-1, 1]``;
      * ``"label"``: int64 ``(B,)`` in ``[0, num_classes)``;
      * with ``reference`` set, batches also hold ``"index"`` (int64 ``(B,)``, the items'
        positions in their split) and, once on the module's device, ``"reference"`` (float32
        ``(B, C, H, W)``, one sample of ``p_r`` per item) and, for sources with labels,
        ``"reference_label"`` (int64 ``(B,)``). Modules must read ``batch.get("reference")``
        and must not rely on other keys being absent.

    Reference samples (``reference``, a :class:`~dmvae_lightning.data.sources.ReferenceSpec`;
    sources in :mod:`dmvae_lightning.data.sources`) are fed by a
    :class:`~dmvae_lightning.data.feeder.ReferenceFeeder` that this data module
    owns and calls from its ``on_after_batch_transfer`` hook: in the training process, after
    the batch reached the module's device, under the trainer's precision context. Training
    batches get the training stream; validation and test batches a held-out stream keyed by
    item index (the same every epoch); predict batches nothing. Nothing has to be listed in
    ``trainer.callbacks``. A LightningModule's own ``on_after_batch_transfer`` override still
    runs (called after feeding; Lightning warns that the data module's hook wins, which is
    expected). Class-conditional sources (per-class
    GMM, text, encoder features) follow ``batch["label"]``, so a reference model conditions on
    ``batch["label"]`` as usual.

    Checkpoints hold the feed count and the fitted state of the source (``state_dict``), the
    same on every rank; each rank draws its own stream (seed mixed with the rank), so resumed
    runs continue exactly. Validation can use :meth:`reference_sample` (deterministic).

    Data sets (``dataset``): ``"fashion_mnist"`` (train = its train split, val = its test split,
    zero-padded to ``image_size``), ``"image_folder"`` (``root/train`` and ``root/val`` in
    ImageNet layout, paper crops), ``"synthetic"`` (``synthetic_size`` smooth random images,
    for tests) and ``"latent_cache"`` (``root/train`` and ``root/val`` written by
    ``python -m dmvae_lightning.latents``; batches hold ``"reference"`` latents and ``"label"``
    instead of images). ``test_dataloader`` and ``predict_dataloader`` serve the val set.

    Args:
        dataset: one of ``"fashion_mnist"``, ``"image_folder"``, ``"synthetic"``,
            ``"latent_cache"``.
        root: data folder; None = Debian's Fashion-MNIST location (required for image_folder
            and latent_cache).
        image_size: output side in pixels (Fashion-MNIST: >= 28, padded).
        channels: 1 or 3.
        num_classes: number of classes; checked against the data set.
        batch_size: training batch size per process (last incomplete batch dropped).
        val_batch_size: batch size of val/test/predict loaders (default ``batch_size``).
        num_workers: DataLoader worker processes (persistent when > 0).
        hflip: random horizontal flips of training images (the paper uses them on ImageNet).
        skip_bad_images: image_folder only: skip unreadable files instead of raising.
        val_subset: use only the first N val images (deterministic).
        train_subset: use N training images drawn once with ``seed`` (sorted by index).
        synthetic_size: number of images per split of the synthetic data set.
        seed: seeds the training shuffle, the train subset, the synthetic images and the
            reference sample streams.
        reference: the reference source: a built-in one by ``name``
            (:class:`~dmvae_lightning.data.sources.ReferenceSpec`), a
            :class:`~dmvae_lightning.data.sources.ReferenceSource` subclass of your own by
            ``class_path`` / ``init_args`` in YAML (or a ``{"class_path", "init_args"}`` mapping,
            or a built instance, from Python); None = no reference samples. Not allowed with ``dataset: latent_cache`` (its batches
            already hold ``"reference"``; use a ``bank`` source on a cache folder instead).
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        image_size: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        hflip: bool = False,
        skip_bad_images: bool = False,
        val_subset: int | None = None,
        train_subset: int | None = None,
        synthetic_size: int = 512,
        seed: int = 0,
        reference: ReferenceSpec | ReferenceSource | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
        if isinstance(self.hparams.get("reference"), ReferenceSource):
            # Built in Python (not from a config or a class_path mapping): keep the object out of
            # the checkpoint's hyperparameters (checkpoints load with weights_only=True); its
            # fitted state is in the data module's state. Pass it again when loading.
            self.hparams.pop("reference")
            self._hparams_initial.pop("reference", None)
        self.feeder: ReferenceFeeder | None = None
        if reference is not None:
            # Imported here, not at the top: the feeder's module imports data.sources, and
            # importing that package imports this module (a cycle at import time otherwise).
            from dmvae_lightning.data.feeder import ReferenceFeeder

            self.feeder = ReferenceFeeder(reference, seed=seed, option="data.init_args.reference")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] | None = None
        self._train_sampler: EpochShuffleSampler | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, items done) from a checkpoint

    # ---------------------------------------------------------------- configuration checks

    def _check_arguments(self) -> None:
        hp = self.hparams

        def fail(name: str, message: str) -> None:
            raise ValueError(f"`data.init_args.{name}` {message}, got {hp[name]!r}")

        if hp.dataset not in DATASETS:
            fail("dataset", f"must be one of {list(DATASETS)}")
        if hp.channels not in (1, 3):
            fail("channels", "must be 1 or 3")
        if hp.image_size < 1:
            fail("image_size", "must be >= 1")
        if hp.dataset == "fashion_mnist" and hp.image_size < 28:
            fail("image_size", "must be >= 28 for fashion_mnist (28x28 images are zero-padded)")
        if hp.dataset == "fashion_mnist" and hp.num_classes != 10:
            fail("num_classes", "must be 10 for fashion_mnist")
        if hp.dataset in ("image_folder", "latent_cache") and hp.root is None:
            fail("root", f"must name a folder holding train/ and val/ for dataset {hp.dataset}")
        for name in ("num_classes", "batch_size", "synthetic_size"):
            if hp[name] < 1:
                fail(name, "must be >= 1")
        if hp.num_workers < 0:
            fail("num_workers", "must be >= 0")
        for name in ("val_batch_size", "val_subset", "train_subset"):
            if hp[name] is not None and hp[name] < 1:
                fail(name, "must be >= 1 or null")
        if hp.reference is not None and hp.dataset == "latent_cache":
            raise ValueError(
                "`data.init_args.reference` must be null with `data.init_args.dataset: "
                "latent_cache` (its batches already hold 'reference'); to sample from a latent "
                "cache, use reference {name: bank, path: <cache folder>} on image data"
            )

    # ---------------------------------------------------------------- data sets

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the samples in ``batch["reference"]``: the reference source's shape,
        or a latent cache's (read from ``root/train/meta.json``); None when there are none."""
        if self.feeder is not None:
            return tuple(self.feeder.shape)
        if self.hparams.dataset == "latent_cache":
            meta = json.loads((Path(self.hparams.root) / "train" / META_FILE).read_text())
            return tuple(int(s) for s in meta["latent_shape"])
        return None

    @property
    def num_classes(self) -> int:
        """Classes of ``batch["label"]`` (what a class-conditional model conditions on)."""
        return int(self.hparams.num_classes)

    @property
    def reference_num_classes(self) -> int:
        """Classes of ``batch["reference_label"]`` (0: the source has no labels). Text sources
        with names taken from the data set know it only after :meth:`setup`."""
        return 0 if self.feeder is None else int(self.feeder.source.num_classes)

    def prepare_data(self) -> None:
        """Called by Lightning once per machine (local rank 0) before :meth:`setup`. Returns
        nothing. Downloads Fashion-MNIST if (and only if) no local copy is found."""
        if self.hparams.dataset == "fashion_mnist":
            for split in ("train", "test"):
                locate_fashion_mnist(self.hparams.root, split)

    def _build(self, split: str) -> Dataset:
        hp = self.hparams
        if hp.dataset == "latent_cache":
            # items {"reference": latent (C, H, W), "label"}; the diffusion module checks that
            # the cache was encoded by its tokenizer (LatentCache.check_tokenizer). A flipped
            # view only in training with hflip, as for images
            cache = LatentCache(Path(hp.root) / split, random_view=hp.hflip and split == "train")
            labels = cache.labels
            if len(labels) and hp.num_classes > 0 and int(labels.max()) >= hp.num_classes:
                raise ValueError(
                    f"`data.init_args.num_classes` is {hp.num_classes} but the latent cache "
                    f"{str(cache.path)!r} has labels up to {int(labels.max())}: set it to the "
                    "number of classes the cache was encoded with"
                )
            return cache
        if hp.dataset == "fashion_mnist":
            kwargs: dict[str, Any] = dict(
                root=hp.root,
                channels=hp.channels,
                pad_to=hp.image_size,
                hflip=hp.hflip and split == "train",
            )
        elif hp.dataset == "image_folder":
            kwargs = dict(
                root=hp.root,
                image_size=hp.image_size,
                channels=hp.channels,
                skip_bad_images=hp.skip_bad_images,
                hflip=hp.hflip,
            )
        else:
            kwargs = dict(
                num_samples=hp.synthetic_size,
                channels=hp.channels,
                image_size=hp.image_size,
                num_classes=hp.num_classes,
                seed=hp.seed,
            )
        dataset = build_image_dataset(hp.dataset, split, **kwargs)
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) != hp.num_classes:
            raise ValueError(
                f"`data.init_args.num_classes` is {hp.num_classes} but the {split} set of "
                f"{hp.dataset} has {len(classes)} classes ({list(classes)[:5]}...)"
            )
        if classes is not None:
            self.classes = list(classes)
        return dataset

    @staticmethod
    def _subset(dataset: Dataset, size: int | None, option: str, seed: int | None) -> Dataset:
        """First ``size`` items (``seed`` None) or ``size`` items drawn with ``seed``, sorted."""
        if size is None:
            return dataset
        total = len(dataset)
        if size > total:
            raise ValueError(
                f"`data.init_args.{option}` is {size} but the data set has only {total} items"
            )
        if seed is None:
            indices = list(range(size))
        else:
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(total, generator=generator)[:size].sort().values.tolist()
        return Subset(dataset, indices)

    def setup(self, stage: str | None = None) -> None:
        """Called by Lightning on every process at the start of ``fit`` / ``validate`` /
        ``test`` / ``predict`` (``stage``). Returns nothing. Builds the val set for every stage
        and the train set for ``"fit"`` (once each) and prepares the reference source."""
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._subset(
                self._build("train"), hp.train_subset, "train_subset", hp.seed
            )
        if self.val_set is None:
            self.val_set = self._subset(self._build("val"), hp.val_subset, "val_subset", None)
        if self.feeder is not None:
            if self.train_set is not None and not isinstance(self.train_set, IndexedDataset):
                self.train_set = IndexedDataset(self.train_set)
            if not isinstance(self.val_set, IndexedDataset):
                self.val_set = IndexedDataset(self.val_set)
            self.feeder.prepare(self._source_context())

    def _source_context(self) -> SourceContext:
        hp = self.hparams
        trainer = self.trainer
        train_set = self.train_set
        dataset_id = None
        if train_set is not None:
            inner = train_set.dataset if isinstance(train_set, IndexedDataset) else train_set
            subset = f"{hp.train_subset}@seed{hp.seed}" if hp.train_subset else "all"
            dataset_id = f"{describe_dataset(inner)}|n={len(inner)}|subset={subset}"
        return SourceContext(
            image_channels=hp.channels,
            num_classes=hp.num_classes,
            class_names=self.classes,
            train_set=train_set,
            dataset_id=dataset_id or "",
            local_zero=trainer is None or trainer.local_rank == 0,
            barrier=self._barrier,
            broadcast=self._broadcast,
        )

    def _barrier(self) -> None:
        if self.trainer is not None:
            self.trainer.strategy.barrier("reference_source")

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.trainer is not None:
            return self.trainer.strategy.broadcast(tensor, src=0)
        return tensor

    # ---------------------------------------------------------------- loaders

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                "ReferenceDistribution.setup() must run before asking for a dataloader"
            )
        hp = self.hparams
        batch_size = hp.batch_size if train else (hp.val_batch_size or hp.batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._make_train_sampler(dataset) if train else None,
            drop_last=train,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=False,
        )

    def _make_train_sampler(self, dataset: Dataset) -> EpochShuffleSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_sampler = EpochShuffleSampler(len(dataset), self.hparams.seed, world, rank)
        if self._resume is not None:
            self._train_sampler.resume_at(*self._resume)
            self._resume = None
        return self._train_sampler

    def train_dataloader(self) -> DataLoader:
        """Called by Lightning once per ``fit``, after :meth:`setup`. Returns the training
        ``DataLoader`` of dict batches (see the class docstring): shuffled by
        :class:`EpochShuffleSampler` (order a function of ``seed`` and the epoch, so resumed runs
        repeat it), last partial batch dropped."""
        if self.train_set is not None and len(self.train_set) < self.hparams.batch_size:
            raise ValueError(
                f"`data.init_args.batch_size` ({self.hparams.batch_size}) exceeds the "
                f"{len(self.train_set)} training images; with drop_last no batch would remain "
                "(lower it or raise `data.init_args.train_subset`)"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Called by Lightning once per ``fit`` / ``validate``, after :meth:`setup`. Returns the
        validation ``DataLoader``: fixed order, all images (or the first ``val_subset``)."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Called by Lightning at ``test``. Returns the same loader as `val_dataloader`."""
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Called by Lightning at ``predict``. Returns the same loader as `val_dataloader`
        (no reference samples are added to predict batches)."""
        return self._loader(self.val_set, train=False)

    # ---------------------------------------------------------------- reference samples

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Called by Lightning on every batch once it is on the module's device. Returns the
        batch: reference samples added to training batches (training stream) and to validation /
        test batches (held-out stream, the same every epoch); then the LightningModule's own
        ``on_after_batch_transfer`` runs if it has one (Lightning calls only the data module's
        when both exist)."""
        trainer = self.trainer
        if self.feeder is not None and trainer is not None and isinstance(batch, dict):
            context = trainer.precision_plugin.forward_context
            if trainer.training:
                self.feeder.feed(batch, trainer.global_rank, context)
            elif trainer.validating or trainer.testing or trainer.sanity_checking:
                self.feeder.feed(batch, trainer.global_rank, context, held_out=True)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and is_overridden("on_after_batch_transfer", module):
            batch = module.on_after_batch_transfer(batch, dataloader_idx)
        return batch

    def reference_sample(
        self, n: int, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """A held-out reference sample: the held-out feed of the first ``n`` validation items
        as one batch (their labels, and images for encoder-feature sources), identical on every
        call and rank, and equal to the first validation batch's when ``n`` is its size.

        Returns the stacked validation items (``"image"``, ``"label"`` (n,) int64, ``"index"``)
        with ``"reference"`` (n, C, H, W) float32 and, when the source has labels,
        ``"reference_label"`` (n,), all on ``device``.
        """
        if self.feeder is None:
            raise RuntimeError("reference_sample() needs `data.init_args.reference`")
        if self.val_set is None:
            self.setup("validate")
        if n > len(self.val_set):
            raise ValueError(
                f"reference_sample({n}) needs {n} validation items, the val set has "
                f"{len(self.val_set)} (`data.init_args.val_subset`)"
            )
        items = [self.val_set[i] for i in range(n)]
        batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
        self.feeder.feed(batch, held_out=True)
        return batch

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Called by Lightning when a checkpoint is written. Returns the state saved in it
        (only rank 0's is written, so it is rank-independent).

        ``{"seed", "epoch", "batches"}``: the shuffle seed and how many training batches of
        ``epoch`` had been trained on when the checkpoint was written, so a run resumed from a
        mid-epoch checkpoint continues the epoch's order instead of restarting it. With a
        reference source, ``"reference"`` holds the feeder's state (source name, feed count,
        fitted source state): the per-rank streams derive from it.
        """
        state: dict[str, Any] = {"seed": self.hparams.seed}
        trainer = self.trainer
        if trainer is not None and trainer.training:
            state["epoch"] = trainer.current_epoch
            state["batches"] = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            # items of the epoch's global order consumed by all ranks together
            state["items"] = state["batches"] * self.hparams.batch_size * trainer.world_size
        if self.feeder is not None:
            state["reference"] = self.feeder.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when a ``fit`` resumes from a checkpoint (and by
        ``load_from_checkpoint``), with what :meth:`state_dict` returned. Returns nothing; a
        checkpoint made with another seed is an error."""
        seed = state_dict.get("seed")
        if seed is not None and seed != self.hparams.seed:
            raise ValueError(
                f"the checkpoint's data module used seed {seed} but `data.init_args.seed` is "
                f"{self.hparams.seed}; set it to {seed} to resume the same data stream"
            )
        if "epoch" in state_dict:
            items = state_dict.get("items", state_dict["batches"] * self.hparams.batch_size)
            self._resume = (state_dict["epoch"], items)
            if self._train_sampler is not None:
                self._train_sampler.resume_at(*self._resume)
        if self.feeder is not None and "reference" in state_dict:
            self.feeder.load_state_dict(state_dict["reference"])
