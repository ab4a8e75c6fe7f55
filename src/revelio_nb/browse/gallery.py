"""Static fallback of the latent browser, part 1: every hookpoint loaded at once, a summary table, PNG galleries.

Papermill (and any notebook viewer without a kernel) drops widget state, so notebook 03 also writes
``figures/03_gallery_<hookpoint>.png`` (the top images of the best latents of each hookpoint, heatmaps for spatial
SAEs) and ``tables/03_gallery_latents.csv`` listing them, and the standalone page of :mod:`.page`. Both read exactly
what the widget reads (:func:`revelio_nb.browse.index.load_hookpoint`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..plots import save_table, savefig
from ..run_index import HookpointIndex, allowed_roots
from .errors import BrowserError
from .images import compose_image
from .index import SORTS, HookpointData, available_sorts, load_hookpoint, slugify, sort_latents


def _rows(hookpoints: pd.DataFrame | None, run_dir, extra_roots: Sequence = ()) -> list[dict]:
    if hookpoints is None:
        hookpoints = HookpointIndex(run_dir, extra_roots).read()
    return [r.to_dict() for _, r in hookpoints.iterrows()]


def load_all(run_dir: str | os.PathLike | None = None, hookpoints: pd.DataFrame | None = None,
             embedding: str = "pca", seed: int = 0, progress: bool = True,
             extra_roots: Sequence[str | os.PathLike] = ()) -> tuple[list[HookpointData], list[str]]:
    """Every hookpoint that loads, and a message for each one that does not (never raises for a bad hookpoint).

    With ``run_dir``, every folder the rows name must lie in the run folder, the cache folder or ``extra_roots``."""
    out, problems = [], []
    roots = allowed_roots(run_dir, extra_roots) if run_dir is not None else None
    for row in _rows(hookpoints, run_dir, extra_roots):
        try:
            out.append(load_hookpoint(row, embedding=embedding, seed=seed, progress=progress, roots=roots))
        except (FileNotFoundError, BrowserError, ValueError, KeyError, OSError) as e:
            problems.append(f"skipped hookpoint {row['hookpoint']!r}: {e}")
    return out, problems


SUMMARY_COLUMNS = ["hookpoint", "model", "block", "t", "pooling", "latents", "dead", "dead_fraction",
                   "median_freq_images", "mean_purity", "mean_best_auroc", "images"]


def summarize_hookpoints(data: Sequence[HookpointData]) -> pd.DataFrame:
    """One row per hookpoint: latents, dead share, median firing frequency, mean purity and best AUROC."""
    rows = []
    for d in data:
        t = d.table
        alive = t[~t["dead"]]
        rows.append({"hookpoint": d.label, "model": d.row["model"], "block": d.row["block"], "t": d.row["t"],
                     "pooling": d.row["pooling"], "latents": len(t), "dead": int(t["dead"].sum()),
                     "dead_fraction": float(t["dead"].mean()),
                     "median_freq_images": float(alive["freq_images"].median()) if len(alive) else math.nan,
                     "mean_purity": float(alive["purity"].mean()) if "purity" in t and len(alive) else math.nan,
                     "mean_best_auroc": float(alive["best_auroc"].mean()) if "best_auroc" in t and len(alive)
                     else math.nan,
                     "images": int(d.stats.meta.get("n_images", len(d.points)))})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------------------ PNG gallery
def gallery_latents(d: HookpointData, n_latents: int = 12, sort: str = "AUROC") -> np.ndarray:
    """The first ``n_latents`` alive latents in ``sort`` order (``frequency`` when the table lacks that column)."""
    if sort not in available_sorts(d.table):
        sort = "frequency"
    return sort_latents(d.table, sort, hide_dead=True)[:n_latents]


def gallery_figure(d: HookpointData, latents: Sequence[int], n_images: int = 8, heatmap: bool = True,
                   cell_px: int = 64):
    """One figure: a row per latent (its stats on the left) of its top images (score and class above each)."""
    from matplotlib.figure import Figure
    from PIL import Image

    st = d.stats
    n = min(n_images, st.top_rows.shape[1])
    gap_x, gap_y, left = 4, 16, 150
    rows = len(latents)
    canvas = np.full((rows * (cell_px + gap_y) + 4, n * (cell_px + gap_x), 3), 255, dtype=np.uint8)
    fig = Figure(figsize=((canvas.shape[1] + left) / 100, canvas.shape[0] / 100 + 0.35), dpi=100)
    ax = fig.add_axes((left / (canvas.shape[1] + left), 0, 1 - left / (canvas.shape[1] + left),
                       canvas.shape[0] / (canvas.shape[0] + 35)))
    texts = []
    for i, lat in enumerate(latents):
        y0 = i * (cell_px + gap_y) + gap_y
        for r in range(n):
            if st.top_rows[lat, r] < 0:
                continue
            img = compose_image(d, int(st.top_images[lat, r]), int(lat), r, heatmap)
            x0 = r * (cell_px + gap_x)
            canvas[y0:y0 + cell_px, x0:x0 + cell_px] = np.asarray(img.resize((cell_px, cell_px), Image.NEAREST))
            lab = int(st.top_labels[lat, r]) if st.top_labels is not None else -1
            name = d.class_names[lab] if 0 <= lab < len(d.class_names) else ""
            texts.append((x0 + cell_px / 2, y0 - 2, f"{st.top_values[lat, r]:.2g} {name}", "center"))
        row = d.table.iloc[int(lat)]
        info = f"#{int(lat)}  f={row['freq_images']:.1%}"
        if "purity" in row and pd.notna(row["purity"]):
            info += f"\npurity {row['purity']:.2f}"
        if "best_auroc" in row and pd.notna(row["best_auroc"]):
            info += f"\nAUROC {row['best_auroc']:.2f} {row.get('best_auroc_class', '') or ''}"
        if row.get("kind"):
            info += f"\n{row['kind']}" + (f": {row['kind_label']}" if row.get("kind_label") else "")
        texts.append((-8, y0 + cell_px / 2, info, "right"))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, s, ha in texts:
        ax.text(x, y, s, fontsize=6.5 if ha == "center" else 7.5, ha=ha, va="bottom" if ha == "center" else "center",
                parse_math=False)  # class names are data: a '$' must not start mathtext
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.axis("off")
    fig.suptitle(d.label, fontsize=10, y=0.995, va="top", parse_math=False)
    return fig


def save_png_gallery(data: Sequence[HookpointData], run_dir: str | os.PathLike, n_latents: int = 12,
                     n_images: int = 8, sort: str = "AUROC", heatmap: bool = True) -> tuple[list[Path], pd.DataFrame]:
    """``figures/03_gallery_<hookpoint>.png`` per hookpoint and ``tables/03_gallery_latents.csv``."""
    if sort not in SORTS:
        raise BrowserError(f"unknown sort {sort!r}; choices: {list(SORTS)}")
    paths, rows = [], []
    for d in data:
        lats = gallery_latents(d, n_latents, sort)
        if not len(lats):
            continue
        fig = gallery_figure(d, lats, n_images, heatmap)
        paths.append(savefig(fig, run_dir, f"03_gallery_{slugify(d.label)}"))
        t = d.table.set_index("latent").loc[lats].reset_index()
        rows.append(t.assign(hookpoint=d.label, gallery_rank=np.arange(len(lats)),
                             sort=sort if sort in available_sorts(d.table) else "frequency"))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if len(table):
        first = ["hookpoint", "gallery_rank", "sort"]
        table = table[first + [c for c in table.columns if c not in first]]
        save_table(table, run_dir, "03_gallery_latents")
    return paths, table
