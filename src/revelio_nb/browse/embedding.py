"""The browser's 2-D dataset view: a PCA or t-SNE embedding of a hookpoint's pooled features, cached beside its
latent statistics (``embedding-<method>.npz``, keyed by :func:`revelio_nb.artifacts.embedding_cache_key`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import artifacts
from ..paths import atomic_path
from .errors import BrowserError

EMBEDDINGS = ("pca", "tsne")


def open_store(path: str | os.PathLike):
    """The feature store in ``path`` (:class:`revelio_nb.features.FeatureStore`)."""
    from ..features import FeatureStore

    return FeatureStore.open(path)


def pooled_features(row: dict, store, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) pooled features of the row's block/t and the dataset index of each row."""
    block, t = row["block"], int(row["t"])
    emb_dir = row.get("embedding_store_dir") or ""
    if emb_dir:
        est = open_store(emb_dir)
        arr = est.array(block, t)
        if arr.ndim != 2:
            raise BrowserError(f"embedding_store_dir {emb_dir} must hold pooled (N, C) features of {block} at t={t}, "
                               f"got shape {arr.shape}")
        return np.asarray(arr, dtype=np.float32), est.indices
    arr = store.array(block, t)
    if arr.ndim == 2:
        return np.asarray(arr, dtype=np.float32), store.indices
    out = np.empty(arr.shape[:2], dtype=np.float32)  # spatial store: mean over positions, chunk by chunk
    for s in range(0, len(arr), 512):
        out[s:s + 512] = np.asarray(arr[s:s + 512], dtype=np.float32).mean(axis=(2, 3))
    return out, store.indices


def cached_npz(folder: Path, name: str, key: str, build):
    """Load ``folder/name`` (npz) when its stored key matches, else build, save (best effort) and return it.

    Never through a symlink: a cache file that is a link is neither read nor followed (the rename replaces the link
    itself), and the temporary file is created exclusively (``O_EXCL | O_NOFOLLOW``) under a unique name."""
    path = Path(folder) / name
    if path.is_file() and not path.is_symlink():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return {k: z[k] for k in z.files if k != "key"}
        except (OSError, ValueError, KeyError):
            pass
    arrays = build()
    try:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
    except OSError:
        pass  # read-only results: keep it in memory only
    return arrays


def embedding_points(row: dict, store, method: str = "pca", seed: int = 0, max_points: int = 5000,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """2-D embedding of the pooled features: ``points`` (P, 2) and their dataset ``indices``; cached beside the stats.

    t-SNE runs on at most ``max_points`` images (a seeded subset); PCA uses all of them.
    """
    if method not in EMBEDDINGS:
        raise BrowserError(f"unknown embedding {method!r}; choices: {list(EMBEDDINGS)}")
    emb_dir = row.get("embedding_store_dir") or ""
    src = open_store(emb_dir) if emb_dir else store
    key = artifacts.embedding_cache_key(src, row["block"], int(row["t"]), method, seed, max_points)

    def build():
        x, idx = pooled_features(row, store, progress)
        keep = np.arange(len(x))
        if method == "tsne" and len(x) > max_points:
            keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, idx = x[keep], idx[keep]
        if method == "pca" or len(x) < 5:
            from ..plots import pca_2d

            pts = pca_2d(x, seed=seed) if len(x) >= 2 else np.zeros((len(x), 2))
        else:
            from sklearn.decomposition import PCA
            from sklearn.manifold import TSNE

            z = (x - x.mean(0)) / (x.std(0) + 1e-8)
            z = PCA(n_components=min(50, *z.shape), random_state=seed).fit_transform(z)
            pts = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(z) - 1) / 3)), init="pca",
                       random_state=seed).fit_transform(z)
        return {"points": np.asarray(pts, dtype=np.float32), "indices": np.asarray(idx, dtype=np.int64)}

    return cached_npz(Path(row["latents_dir"]), f"embedding-{method}.npz", key, build)
