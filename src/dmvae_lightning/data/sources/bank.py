"""``bank``: rows of a feature bank on disk, memory-mapped."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
)

__all__ = [
    "BankSource",
]


# --------------------------------------------------------------------------------- bank
class BankSource(ReferenceSource):
    """Rows of a memory-mapped feature bank (see the module docstring).

    ``rows``: the ``(N, ...)`` bank (``np.memmap`` view or an mmap-backed tensor, never read
    whole); ``bank_labels``: ``(N,)`` int64 tensor or None."""

    name = "bank"

    def __init__(
        self,
        path: str,
        shape: Any | None = None,
        labels_path: str | None = None,
        key: str = "features",
        match_labels: bool = False,
        option: str = OPTION,
    ) -> None:
        file = Path(path).expanduser()
        labels: Any = None
        if file.is_dir():
            latents = file / "latents.npy"
            if not latents.is_file():
                raise FileNotFoundError(
                    f"`{option}.path` {path!r} is a folder without latents.npy (a latent cache)"
                )
            rows: Any = np.load(latents, mmap_mode="r", allow_pickle=False)[:, 0]
            if (file / "labels.npy").is_file() and labels_path is None:
                labels = np.load(file / "labels.npy", allow_pickle=False)
        elif not file.is_file():
            raise FileNotFoundError(f"`{option}.path`: feature bank {path!r} does not exist")
        elif file.suffix == ".npy":
            rows = np.load(file, mmap_mode="r", allow_pickle=False)
        elif file.suffix in (".pt", ".pth"):
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(obj, Mapping):
                if key not in obj:
                    raise KeyError(
                        f"`{option}.key`: {path!r} holds keys {sorted(obj)}, not {key!r}"
                    )
                rows, labels = obj[key], obj.get("labels") if labels_path is None else None
            else:
                rows = obj
            if not isinstance(rows, torch.Tensor):
                raise TypeError(f"`{option}.path`: {path!r}[{key!r}] is not a tensor")
        else:
            raise ValueError(
                f"`{option}.path` must be a .npy or .pt file or a latent-cache folder, got {path!r}"
            )
        if labels_path is not None:
            lfile = Path(labels_path).expanduser()
            if not lfile.is_file():
                raise FileNotFoundError(f"`{option}.labels_path` {labels_path!r} does not exist")
            labels = (
                np.load(lfile, allow_pickle=False)
                if lfile.suffix == ".npy"
                else torch.load(lfile, map_location="cpu", weights_only=True)
            )
        row_shape = tuple(int(s) for s in rows.shape[1:])
        if shape is None:
            if len(row_shape) != 3:
                raise ValueError(
                    f"`{option}.shape` is needed: bank rows have shape {row_shape}, not (C, H, W)"
                )
            shape = row_shape
        super().__init__(shape, option)
        if math.prod(row_shape) != math.prod(self.shape):
            raise ValueError(
                f"`{option}.shape` {list(self.shape)} holds {math.prod(self.shape)} values but "
                f"rows of {path!r} have shape {row_shape}"
            )
        self.path, self.rows, self.size = str(file), rows, int(rows.shape[0])
        if self.size < 1:
            raise ValueError(f"`{option}.path`: the bank {path!r} is empty")
        self.bank_labels: torch.Tensor | None = None
        if labels is not None:
            self.bank_labels = torch.as_tensor(np.asarray(labels)).long().view(-1)
            if len(self.bank_labels) != self.size:
                raise ValueError(
                    f"`{option}.labels_path`: {len(self.bank_labels)} labels for {self.size} rows"
                )
            self.num_classes = int(self.bank_labels.max()) + 1
        self.match_labels = match_labels
        self.uses_labels = match_labels
        if match_labels:
            if self.bank_labels is None:
                raise ValueError(f"`{option}.match_labels` needs bank labels (`labels_path`)")
            order = torch.argsort(self.bank_labels, stable=True)
            counts = torch.bincount(self.bank_labels, minlength=self.num_classes)
            self._order, self._counts = order, counts
            self._starts = torch.cumsum(counts, 0) - counts

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (n,) as float32 ``(n, C, H, W)`` on the CPU (reads only those rows,
        in sorted order)."""
        idx = indices.cpu().long()
        order = torch.argsort(idx)
        if isinstance(self.rows, torch.Tensor):
            picked = self.rows[idx[order]].float()
        else:
            picked = torch.from_numpy(np.asarray(self.rows[idx[order].numpy()], dtype=np.float32))
        out = torch.empty_like(picked)
        out[order] = picked
        return out.reshape(len(idx), *self.shape)

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen, n = request.generator, request.n
        if self.match_labels:
            labels = self._labels(request).cpu()
            if labels.max() >= len(self._counts) or (self._counts[labels] == 0).any():
                missing = sorted(set(labels.tolist()) - set(self.bank_labels.unique().tolist()))
                raise ValueError(
                    f"`{self.option}.match_labels`: the bank has no row of class(es) {missing}"
                )
            u = torch.rand(n, generator=gen, device=request.device, dtype=torch.float64).cpu()
            offset = (u * self._counts[labels]).long().clamp_max(self._counts[labels] - 1)
            idx = self._order[self._starts[labels] + offset]
        else:
            idx = torch.randint(self.size, (n,), generator=gen, device=request.device).cpu()
        z = self.read(idx).to(request.device)
        labels_out = None if self.bank_labels is None else self.bank_labels[idx].to(request.device)
        return z, labels_out
