"""Figures of 2-D point clouds and update fields (the toy study, PAPER.md section 2).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so it works
under any backend (scripts, TensorBoard's ``add_figure``, notebooks) and leaves no global figure
state behind; :func:`save_figure` writes a PNG. Inputs are tensors or arrays of 2-D points
shaped (N, 2) or (N, 2, 1, 1). matplotlib is an optional dependency (extra ``toy2d``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["clouds_figure", "field_figure", "points_figure", "save_figure"]

POINT_COLOR = "#e8920c"
REFERENCE_COLOR = "#9aa5b1"
ARROW_COLOR = "#2f3b48"


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the toy-study plots need matplotlib: pip install 'dmvae-lightning[toy2d]'"
        ) from err
    return Figure(**kwargs)


def _xy(points: Any) -> np.ndarray:
    """(N, 2) float64 numpy array from (N, 2) or (N, 2, 1, 1) points."""
    array = torch.as_tensor(points).detach().reshape(-1, 2).to("cpu", torch.float64)
    return array.numpy()


def _style(ax: Axes, limit: float, title: str) -> None:
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)


def _draw_cloud(ax: Axes, points: Any, reference: Any | None, limit: float, title: str) -> None:
    if reference is not None:
        ref = _xy(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c=REFERENCE_COLOR, alpha=0.35, linewidths=0)
    xy = _xy(points)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, c=POINT_COLOR, alpha=0.8, linewidths=0)
    _style(ax, limit, title)


def points_figure(
    points: Any, reference: Any | None = None, title: str = "", limit: float = 1.6
) -> Figure:
    """One panel: ``points`` (orange) over ``reference`` samples (grey), axes [-limit, limit]^2."""
    fig = _figure(figsize=(4, 4), dpi=110)
    _draw_cloud(fig.add_subplot(1, 1, 1), points, reference, limit, title)
    fig.tight_layout()
    return fig


def clouds_figure(
    clouds: Mapping[str, Any],
    reference: Any | None = None,
    columns: int = 4,
    limit: float = 1.6,
) -> Figure:
    """One panel per entry of ``clouds`` (title = its key), each over ``reference``."""
    if not clouds:
        raise ValueError("clouds_figure needs at least one point cloud")
    columns = max(1, min(columns, len(clouds)))
    rows = math.ceil(len(clouds) / columns)
    fig = _figure(figsize=(3.0 * columns, 3.0 * rows), dpi=110)
    for index, (name, points) in enumerate(clouds.items()):
        _draw_cloud(fig.add_subplot(rows, columns, index + 1), points, reference, limit, name)
    fig.tight_layout()
    return fig


def field_figure(
    grid: Any,
    fields: Sequence[tuple[float, Any]],
    reference: Any | None = None,
    title: str = "",
    limit: float = 1.6,
    clip_quantile: float = 0.9,
) -> Figure:
    """Quiver panels of update directions on ``grid`` points (G, 2), one per ``(t, vectors)``
    in ``fields`` (vectors (G, 2)), over ``reference``. Arrow length is the vector's norm
    relative to its panel's ``clip_quantile`` quantile of norms, capped at one grid spacing
    (so a few exploding vectors do not shrink the others to dots); the panel title gives t
    (t = 1 data, t = 0 noise) and that quantile."""
    if not fields:
        raise ValueError("field_figure needs at least one (t, vectors) pair")
    base = _xy(grid)
    fig = _figure(figsize=(3.0 * len(fields), 3.3), dpi=110)
    for index, (t, vectors) in enumerate(fields):
        ax = fig.add_subplot(1, len(fields), index + 1)
        if reference is not None:
            ref = _xy(reference)
            ax.scatter(ref[:, 0], ref[:, 1], s=3, c=REFERENCE_COLOR, alpha=0.35, linewidths=0)
        vec = _xy(vectors)
        norm = np.linalg.norm(vec, axis=1, keepdims=True)
        typical = float(np.quantile(norm, clip_quantile)) if norm.size else 0.0
        spacing = 0.9 * 2 * limit / math.sqrt(max(len(base), 1))
        if typical > 0:
            length = np.minimum(norm / typical, 1.0) * spacing
            arrows = vec / np.maximum(norm, 1e-30) * length
        else:
            arrows = np.zeros_like(vec)
        ax.quiver(
            base[:, 0],
            base[:, 1],
            arrows[:, 0],
            arrows[:, 1],
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.006,
            color=ARROW_COLOR,
        )
        _style(ax, limit, f"t = {t:g}  (q{clip_quantile * 100:.0f} |u| = {typical:.2g})")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
