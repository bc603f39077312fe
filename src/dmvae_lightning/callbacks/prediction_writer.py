"""Write what ``predict`` returns to disk: images as PNG files, tensors as ``.pt`` files.

Works with any ``predict_step`` returning a dict of batched tensors, e.g.
:class:`~dmvae_lightning.modules.diffusion.LatentDiffusionModule` (``latent``, ``label``,
``image``) and :class:`~dmvae_lightning.modules.dmvae.DMVAEModule` (``latent``,
``reconstruction``). Add it to a config::

    trainer:
      callbacks:
        - class_path: dmvae_lightning.callbacks.PredictionWriter
          init_args: {output_dir: runs/fashion_mnist/samples}

It acts only in ``predict`` (fit and validate ignore it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn


class PredictionWriter(BasePredictionWriter):
    """Per predict batch: ``{output_dir}/images/r{rank}_b{batch:06d}_{i:03d}[_c{label}].png`` for
    each image key (values in [-1, 1], (B, C, H, W)) and one
    ``{output_dir}/tensors/r{rank}_b{batch:06d}.pt`` holding the other tensors (CPU).

    Args:
        output_dir: folder to write into (created).
        image_keys: keys of the prediction dict written as PNG images.
        write_tensors: also save the non-image tensors (latents, labels).
    """

    def __init__(
        self,
        output_dir: str,
        image_keys: Sequence[str] = ("image", "reconstruction"),
        write_tensors: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.image_keys = tuple(image_keys)
        self.write_tensors = write_tensors
        self._warned_no_images = False

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict):
            raise TypeError(
                "PredictionWriter expects predict_step to return a dict of tensors, got "
                f"{type(prediction).__name__}"
            )
        if not self._warned_no_images and not any(k in prediction for k in self.image_keys):
            # a typo in image_keys, or a module without a tokenizer: no PNG will be written
            rank_zero_warn(
                f"PredictionWriter.image_keys {list(self.image_keys)} match none of the "
                f"prediction's keys {sorted(prediction)}: no images are written"
                + (" (the rest goes to tensors/)" if self.write_tensors else "")
            )
            self._warned_no_images = True
        stem = f"r{trainer.global_rank}_b{batch_idx:06d}"
        labels = prediction.get("label")
        for key in self.image_keys:
            images = prediction.get(key)
            if images is None:
                continue
            folder = self.output_dir / (key if key != "image" else "images")
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images.detach().float().cpu()):
                suffix = f"_c{int(labels[i])}" if labels is not None else ""
                torchvision.utils.save_image(
                    (image.clamp(-1, 1) + 1) / 2, folder / f"{stem}_{i:03d}{suffix}.png"
                )
        if self.write_tensors:
            rest = {
                k: v.detach().cpu()
                for k, v in prediction.items()
                if k not in self.image_keys and isinstance(v, torch.Tensor)
            }
            if rest:
                (self.output_dir / "tensors").mkdir(parents=True, exist_ok=True)
                torch.save(rest, self.output_dir / "tensors" / f"{stem}.pt")
