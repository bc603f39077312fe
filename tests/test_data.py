"""Image data sets and the ReferenceDistribution data module, on real Fashion-MNIST and tiny files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dmvae_lightning.data import (
    FashionMNIST,
    ImageFolderDataset,
    ReferenceDistribution,
    SyntheticImages,
    adm_center_crop,
    build_image_dataset,
    read_idx,
)

# ------------------------------------------------------------------------------ Fashion-MNIST


def _parse_idx_by_hand(path: Path) -> tuple[tuple[int, ...], bytes]:
    raw = gzip.decompress(path.read_bytes())
    magic, count = struct.unpack(">II", raw[:8])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    assert magic >> 8 == 0x08 and dims[0] == count
    return dims, raw[4 + 4 * ndim :]


@pytest.fixture(scope="module")
def fashion_test(fashion_mnist_root: Path) -> FashionMNIST:
    return FashionMNIST(root=fashion_mnist_root, split="test")


def _all_images(dataset) -> torch.Tensor:
    return torch.cat([b["image"] for b in DataLoader(dataset, batch_size=2500)])


def test_fashion_mnist_range_padding_and_labels(fashion_test: FashionMNIST) -> None:
    images = _all_images(fashion_test)
    assert images.shape == (10_000, 1, 32, 32) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(images[:, :, border] == -1.0)
    assert fashion_test.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(fashion_test.labels), torch.full((10,), 1000))
    assert len(fashion_test.CLASSES) == 10 and fashion_test.classes[9] == "Ankle boot"


def test_fashion_mnist_first_image_matches_raw_idx(
    fashion_mnist_root: Path, fashion_test: FashionMNIST
) -> None:
    dims, pixels = _parse_idx_by_hand(fashion_mnist_root / "t10k-images-idx3-ubyte.gz")
    _, labels = _parse_idx_by_hand(fashion_mnist_root / "t10k-labels-idx1-ubyte.gz")
    assert dims == (10_000, 28, 28)
    first = np.frombuffer(pixels[: 28 * 28], dtype=np.uint8).reshape(28, 28)
    assert int(first.sum()) == 33456 and labels[0] == 9  # stable checksum of the released file

    item = fashion_test[0]
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["label"].item() == 9
    recovered = ((item["image"][0, 2:30, 2:30] + 1.0) * 127.5).round().to(torch.uint8)
    assert torch.equal(recovered, torch.from_numpy(first.copy()))
    assert torch.equal(
        torch.from_numpy(read_idx(fashion_mnist_root / "t10k-images-idx3-ubyte.gz")[0]),
        torch.from_numpy(first.copy()),
    )


def test_fashion_mnist_three_channels_odd_padding_and_flip(fashion_mnist_root: Path) -> None:
    grey = FashionMNIST(fashion_mnist_root, split="test", channels=1, pad_to=33)
    rgb = FashionMNIST(fashion_mnist_root, split="test", channels=3, pad_to=33)
    for index in (0, 1, 9999):
        one, three = grey[index]["image"], rgb[index]["image"]
        assert three.shape == (3, 33, 33)
        assert torch.equal(three, one.expand(3, -1, -1))
    # 5 pixels of padding: 2 before, 3 after; the digit itself sits at [2:30].
    raw = grey.images[0].float() / 127.5 - 1
    assert torch.equal(grey[0]["image"][0, 2:30, 2:30], raw)
    assert torch.all(grey[0]["image"][0, 30:] == -1) and torch.all(grey[0]["image"][0, :, :2] == -1)

    flipping = FashionMNIST(fashion_mnist_root, split="test", hflip=True)
    plain = grey[0]["image"][0, 2:30, 2:30]
    torch.manual_seed(0)
    seen = {
        "plain" if torch.equal(x, plain) else "flipped" if torch.equal(x, plain.flip(-1)) else "?"
        for x in (flipping[0]["image"][0, 2:30, 2:30] for _ in range(40))
    }
    assert seen == {"plain", "flipped"}


def _write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_plain_idx_in_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(raw / "t10k-images-idx3-ubyte", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([4, 0, 7]))
    dataset = FashionMNIST(tmp_path, split="test", pad_to=28)
    assert len(dataset) == 3 and dataset[2]["label"].item() == 7
    assert torch.equal(dataset[1]["image"][0], torch.from_numpy(images[1]).float() / 127.5 - 1)

    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([4, 0, 7]), magic_type=0x0D)
    with pytest.raises(ValueError, match="type code 0x0d"):
        read_idx(raw / "t10k-labels-idx1-ubyte")
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(raw / "t10k-labels-idx1-ubyte")


def test_fashion_mnist_missing_and_offline_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(root=tmp_path / "nothing", split="train")
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "data.init_args.root" in message
    assert "no network" in message


# ------------------------------------------------------------------------------ image folders


def _smooth_rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phases = rng.uniform(0, 6.28, size=3)
    channels = [
        127.5 + 120 * np.sin(x / (9 + 4 * c) + y / (13 + c) + p) for c, p in enumerate(phases)
    ]
    noise = rng.integers(-6, 7, size=(height, width, 3))
    return Image.fromarray(np.clip(np.stack(channels, -1) + noise, 0, 255).astype(np.uint8))


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for c, name in enumerate(("n02_dog", "n01_cat")):
            folder = root / split / name
            folder.mkdir(parents=True)
            _smooth_rgb(300, 200, seed=10 * c).save(folder / "a.png")
            _smooth_rgb(120, 160, seed=10 * c + 1).save(folder / "b.JPEG", quality=95)
            (folder / "notes.txt").write_text("not an image, ignored")
    return root


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 127.5 - 1


def test_image_folder_classes_and_eval_crop(image_root: Path) -> None:
    dataset = ImageFolderDataset(image_root, split="val", image_size=64)
    assert dataset.classes == ["n01_cat", "n02_dog"]
    assert len(dataset) == 4
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset.path(0).name == "a.png" and dataset.path(1).name == "b.JPEG"

    # 300x200 -> BOX halve to 150x100 (100 < 128 stops) -> bicubic 96x64 -> centre 64, x from 16.
    source = Image.open(dataset.path(0)).convert("RGB")
    manual = source.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    expected = _to_tensor(np.asarray(manual)[:, 16:80])
    item = dataset[0]
    assert item["label"].item() == 0 and item["label"].dtype == torch.int64
    assert item["image"].shape == (3, 64, 64)
    assert torch.equal(item["image"], expected)
    assert np.array_equal(adm_center_crop(source, 64), np.asarray(manual)[:, 16:80])
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_image_folder_train_crop_is_a_window_of_the_resized_image(image_root: Path) -> None:
    dataset = ImageFolderDataset(image_root, split="train", image_size=64, hflip=False)
    resized = Image.open(dataset.path(0)).convert("RGB").resize((96, 64), Image.BICUBIC)
    windows = [_to_tensor(np.asarray(resized)[:, x : x + 64]) for x in range(33)]
    torch.manual_seed(0)
    offsets = set()
    for _ in range(12):
        image = dataset[0]["image"]
        assert image.shape == (3, 64, 64)
        matches = [x for x, w in enumerate(windows) if torch.equal(image, w)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # the crop really is random

    # crop="center" on the training split (latent caches): the deterministic ADM crop
    centred = ImageFolderDataset(image_root, split="train", image_size=64, crop="center")
    source = Image.open(centred.path(0)).convert("RGB")
    assert torch.equal(centred[0]["image"], _to_tensor(adm_center_crop(source, 64)))
    with pytest.raises(ValueError, match="crop"):
        ImageFolderDataset(image_root, split="train", image_size=64, crop="middle")

    grey = ImageFolderDataset(image_root, split="train", image_size=48, channels=1)
    item = grey[3]  # 120x160 JPEG of the dog class
    assert item["image"].shape == (1, 48, 48) and item["label"].item() == 1


def test_image_folder_bad_files(image_root: Path) -> None:
    bad = image_root / "val" / "n01_cat" / "0_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    strict = ImageFolderDataset(image_root, split="val", image_size=32)
    assert strict.path(0) == bad
    with pytest.raises(RuntimeError) as info:
        strict[0]
    assert str(bad) in str(info.value) and "skip_bad_images" in str(info.value)

    lenient = ImageFolderDataset(image_root, split="val", image_size=32, skip_bad_images=True)
    item = lenient[0]
    assert torch.equal(item["image"], strict[1]["image"])  # the next file, a.png
    assert item["label"].item() == 0 and lenient.num_skipped == 1
    lenient[2]
    assert lenient.num_skipped == 1


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.init_args.root"):
        ImageFolderDataset(tmp_path / "absent", split="train")
    (tmp_path / "empty" / "train" / "some_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No images found"):
        ImageFolderDataset(tmp_path / "empty", split="train")


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_images_are_deterministic() -> None:
    a = SyntheticImages(num_samples=20, channels=3, image_size=16, num_classes=4, seed=3)
    b = SyntheticImages(num_samples=20, channels=3, image_size=16, num_classes=4, seed=3)
    other = SyntheticImages(num_samples=20, channels=3, image_size=16, num_classes=4, seed=4)
    val = build_image_dataset(
        "synthetic", "val", num_samples=20, channels=3, image_size=16, num_classes=4, seed=3
    )
    assert [a[i]["label"].item() for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert torch.equal(a[7]["image"], b[7]["image"])
    assert not torch.equal(a[7]["image"], a[8]["image"])
    assert not torch.equal(a[7]["image"], other[7]["image"])
    assert not torch.equal(a[7]["image"], val[7]["image"])
    images = torch.stack([a[i]["image"] for i in range(20)])
    assert images.shape == (20, 3, 16, 16) and images.abs().max() < 1
    # smooth: neighbouring pixels differ far less than the value range
    assert (images[..., 1:] - images[..., :-1]).abs().mean() < 0.3 * images.std()
    with pytest.raises(ValueError, match="dataset"):
        build_image_dataset("cifar", "train")


# ------------------------------------------------------------------------------ data module


def test_data_module_batches_and_shuffling(fashion_mnist_root: Path) -> None:
    dm = ReferenceDistribution(
        root=str(fashion_mnist_root),
        batch_size=64,
        val_batch_size=50,
        num_workers=0,
        train_subset=256,
        val_subset=100,
        seed=1,
    )
    assert dm.image_shape == (1, 32, 32)
    assert dm.hparams.batch_size == 64
    dm.setup("fit")
    assert dm.classes is not None and len(dm.classes) == 10

    train = dm.train_dataloader()

    def epoch_labels(loader) -> torch.Tensor:
        return torch.cat([b["label"] for b in loader])

    batches = list(train)
    batch = batches[0]
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (64, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == torch.int64
    assert len(train) == 4

    first = torch.cat([b["label"] for b in batches])
    assert torch.equal(epoch_labels(train), first)  # same epoch -> same order
    train.sampler.set_epoch(1)  # what Lightning does at each epoch start
    second = epoch_labels(train)
    assert not torch.equal(first, second)
    assert torch.equal(first.sort().values, second.sort().values)  # same subset, new order

    again = ReferenceDistribution(
        root=str(fashion_mnist_root), batch_size=64, num_workers=0, train_subset=256, seed=1
    )
    again.setup("fit")
    assert torch.equal(epoch_labels(again.train_dataloader()), first)  # seeded, reproducible

    val_batches = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val_batches] == [50, 50]
    val_again = torch.cat([b["image"] for b in dm.val_dataloader()])
    assert torch.equal(torch.cat([b["image"] for b in val_batches]), val_again)
    # val subset is the first 100 test images, in order
    full = FashionMNIST(fashion_mnist_root, split="test")
    assert torch.equal(torch.cat([b["label"] for b in val_batches]), full.labels[:100])
    test_batch = next(iter(dm.test_dataloader()))
    assert torch.equal(test_batch["image"], val_batches[0]["image"])


def test_data_module_workers_and_state(tmp_path: Path) -> None:
    dm = ReferenceDistribution(
        dataset="synthetic",
        channels=3,
        image_size=16,
        num_classes=4,
        batch_size=8,
        num_workers=2,
        synthetic_size=24,
        seed=5,
    )
    dm.setup("validate")
    assert dm.train_set is None
    loader = dm.val_dataloader()
    assert loader.persistent_workers and not loader.pin_memory
    images = torch.cat([b["image"] for b in loader])
    assert torch.equal(images[9], dm.val_set[9]["image"])
    assert images.shape == (24, 3, 16, 16)
    # Drop the loader now: persistent workers reached only through a reference cycle (e.g. the
    # traceback pytest.raises keeps below) are shut down by the cyclic GC after a 10 s timeout.
    del loader

    state = dm.state_dict()
    assert state == {"seed": 5}
    dm.load_state_dict(state)
    with pytest.raises(ValueError, match="data.init_args.seed"):
        dm.load_state_dict({"seed": 6})


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"channels": 2}, "data.init_args.channels"),
        ({"image_size": 16}, "data.init_args.image_size"),
        ({"num_classes": 5}, "data.init_args.num_classes"),
        ({"dataset": "imagenet"}, "data.init_args.dataset"),
        ({"dataset": "image_folder"}, "data.init_args.root"),
        ({"batch_size": 0}, "data.init_args.batch_size"),
        ({"val_subset": 0}, "data.init_args.val_subset"),
    ],
)
def test_data_module_rejects_bad_options(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        ReferenceDistribution(**kwargs)


def test_data_module_checks_sizes_against_the_data(image_root: Path) -> None:
    dm = ReferenceDistribution(dataset="image_folder", root=str(image_root), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        dm.setup("fit")
    dm = ReferenceDistribution(
        dataset="image_folder",
        root=str(image_root),
        num_classes=2,
        image_size=32,
        channels=3,
        batch_size=8,
        num_workers=0,
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match="data.init_args.batch_size"):
        dm.train_dataloader()
    dm = ReferenceDistribution(
        dataset="synthetic", synthetic_size=10, train_subset=11, num_workers=0
    )
    with pytest.raises(ValueError, match="data.init_args.train_subset"):
        dm.setup("fit")


class _TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3 * 8 * 8, 4)

    def training_step(self, batch, batch_idx):
        assert batch["image"].shape == (4, 3, 8, 8)
        return torch.nn.functional.cross_entropy(
            self.net(batch["image"].flatten(1)), batch["label"]
        )

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_data_module_state_travels_in_checkpoints(tmp_path: Path) -> None:
    def data(seed: int) -> ReferenceDistribution:
        return ReferenceDistribution(
            dataset="synthetic",
            channels=3,
            image_size=8,
            num_classes=4,
            batch_size=4,
            num_workers=0,
            synthetic_size=16,
            seed=seed,
        )

    def trainer(steps: int) -> L.Trainer:
        return L.Trainer(
            max_steps=steps,
            limit_val_batches=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )

    first = trainer(2)
    first.fit(_TinyClassifier(), datamodule=data(seed=7))
    first.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["ReferenceDistribution"] == {"seed": 7}
    assert checkpoint["datamodule_hyper_parameters"]["seed"] == 7

    with pytest.raises(ValueError, match="data.init_args.seed"):
        trainer(3).fit(_TinyClassifier(), datamodule=data(seed=8), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("channels,pad_to", [(1, 32), (3, 33)])
def test_fashion_mnist_as_tensors_equals_the_items(fashion_mnist_root: Path, channels, pad_to):
    data = FashionMNIST(root=fashion_mnist_root, split="test", channels=channels, pad_to=pad_to)
    images, labels = data.as_tensors()
    assert images.shape == (10_000, channels, pad_to, pad_to) and labels.dtype == torch.int64
    for i in (0, 1, 4321, 9999):
        assert torch.equal(images[i], data[i]["image"]) and labels[i] == data[i]["label"]
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
