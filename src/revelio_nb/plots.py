"""Figures and tables: save helpers and the few plots every notebook shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .paths import atomic_path, results_dir


def savefig(fig, run_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Save a figure as ``<run_dir>/figures/<name>.png`` (atomically: the old file or the new one, never half)
    and return the path."""
    path = results_dir(run_dir) / "figures" / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def save_table(df: pd.DataFrame, run_dir: str | os.PathLike, name: str, index: bool = False) -> Path:
    """Save a table as ``<run_dir>/tables/<name>.csv`` (atomically) and return the path."""
    path = results_dir(run_dir) / "tables" / f"{name}.csv"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=index)
    return path


def save(run_dir: str | os.PathLike, name: str, table: pd.DataFrame | None = None, fig=None,
         index: bool = False) -> None:
    """Save a table (:func:`save_table`) and / or a figure (:func:`savefig`) under one name (returns nothing, so a
    notebook cell ending with it shows only the figure)."""
    if table is not None:
        save_table(table, run_dir, name, index=index)
    if fig is not None:
        savefig(fig, run_dir, name)


def image_grid(
    images: np.ndarray,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    cell: float = 1.1,
    suptitle: str | None = None,
    cmap: str = "gray",
):
    """A grid of uint8 images (N, H, W, C) with optional per-image titles; returns the figure."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no images", ha="center", va="center")
        return fig
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=255)
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def loss_curve(losses: Sequence[float], title: str = "training loss", window: int = 50):
    """Raw and smoothed loss per step."""
    losses = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, alpha=0.3, lw=0.8, label="per step")
    if len(losses) >= window:
        ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
                lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (noise)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def embedding_scatter(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str = "",
                      highlight: np.ndarray | None = None, ax=None):
    """2-D scatter coloured by class (seaborn palette); ``highlight`` indices are drawn on top with a black edge."""
    import seaborn as sns

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 4.5))
    else:
        fig = ax.figure
    names = np.asarray(class_names)[labels]
    sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=names, hue_order=list(class_names), s=8, linewidth=0,
                    palette="tab10", ax=ax, legend="brief")
    if highlight is not None and len(highlight):
        ax.scatter(points[highlight, 0], points[highlight, 1], s=40, facecolors="none", edgecolors="black", lw=1.2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    return fig


def pca_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Standardised 2-D PCA of row vectors."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return PCA(n_components=2, random_state=seed).fit_transform(x)
