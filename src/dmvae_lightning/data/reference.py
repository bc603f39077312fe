"""`ReferenceDistribution`: the data module of every stage (images, labels, later reference samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from dmvae_lightning.data.images import DATASET_NAMES, build_image_dataset, locate_fashion_mnist
from dmvae_lightning.latents import LatentCache

#: Image data sets plus ``"latent_cache"`` (latents written by ``python -m dmvae_lightning.latents``).
DATASETS = (*DATASET_NAMES, "latent_cache")


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that is a pure function of ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every training epoch, so a run resumed
    from a checkpoint at epoch k sees exactly the order an uninterrupted run sees at epoch k
    (a sampler drawing from a running generator would replay epoch 0's order instead).
    :meth:`resume_at` makes the next pass over a given epoch start at an offset, for runs
    resumed from a mid-epoch checkpoint.
    """

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, first position)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Skip the first ``position`` items of the next pass if it is epoch ``epoch``."""
        self._resume = (epoch, position)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator)
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            if epoch == self.epoch:
                order = order[position:]
        return iter(order.tolist())


class ReferenceDistribution(L.LightningDataModule):
    """Images with labels, and (in a later version) samples of the reference distribution.

    Batch contract (every dataloader): a dict with
      * ``"image"``: float32 ``(B, channels, image_size, image_size)`` in ``[-1, 1]``;
      * ``"label"``: int64 ``(B,)`` in ``[0, num_classes)``;
      * ``"reference"`` (added later, train batches only): samples of the reference
        distribution ``p_r(z)`` fed from the main process, so modules must read it with
        ``batch.get("reference")`` and must not rely on other keys being absent.

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
        seed: seeds the training shuffle, the train subset and the synthetic images.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
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

    # ---------------------------------------------------------------- data sets

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)

    def prepare_data(self) -> None:
        """Download Fashion-MNIST if (and only if) no local copy is found (rank 0 only)."""
        if self.hparams.dataset == "fashion_mnist":
            for split in ("train", "test"):
                locate_fashion_mnist(self.hparams.root, split)

    def _build(self, split: str) -> Dataset:
        hp = self.hparams
        if hp.dataset == "latent_cache":
            # items {"reference": latent (C, H, W), "label"}; the diffusion module checks that
            # the cache was encoded by its tokenizer (LatentCache.check_tokenizer)
            return LatentCache(Path(hp.root) / split)
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
        """Build the val set for every stage and the train set for ``"fit"`` (once each)."""
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._subset(
                self._build("train"), hp.train_subset, "train_subset", hp.seed
            )
        if self.val_set is None:
            self.val_set = self._subset(self._build("val"), hp.val_subset, "val_subset", None)

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
        self._train_sampler = EpochShuffleSampler(len(dataset), self.hparams.seed)
        if self._resume is not None:
            self._train_sampler.resume_at(*self._resume)
            self._resume = None
        return self._train_sampler

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochShuffleSampler` (order a function of ``seed`` and the epoch,
        so resumed runs repeat it), drops the last partial batch."""
        if self.train_set is not None and len(self.train_set) < self.hparams.batch_size:
            raise ValueError(
                f"`data.init_args.batch_size` ({self.hparams.batch_size}) exceeds the "
                f"{len(self.train_set)} training images; with drop_last no batch would remain "
                "(lower it or raise `data.init_args.train_subset`)"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Fixed order, all images (or the first ``val_subset``)."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Same as `val_dataloader`."""
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Same as `val_dataloader`."""
        return self._loader(self.val_set, train=False)

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints (only rank 0's is written, so keep it rank-independent).

        ``{"seed", "epoch", "batches"}``: the shuffle seed and how many training batches of
        ``epoch`` had been trained on when the checkpoint was written, so a run resumed from a
        mid-epoch checkpoint continues the epoch's order instead of restarting it. The
        reference-buffer position and its RNG state will be stored here too when reference
        samples are added.
        """
        state: dict[str, Any] = {"seed": self.hparams.seed}
        trainer = self.trainer
        if trainer is not None and trainer.training:
            state["epoch"] = trainer.current_epoch
            state["batches"] = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict`; a checkpoint made with another seed is an error."""
        seed = state_dict.get("seed")
        if seed is not None and seed != self.hparams.seed:
            raise ValueError(
                f"the checkpoint's data module used seed {seed} but `data.init_args.seed` is "
                f"{self.hparams.seed}; set it to {seed} to resume the same data stream"
            )
        if "epoch" in state_dict:
            self._resume = (state_dict["epoch"], state_dict["batches"] * self.hparams.batch_size)
            if self._train_sampler is not None:
                self._train_sampler.resume_at(*self._resume)
