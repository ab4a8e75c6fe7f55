"""What the latent-statistics pass (:mod:`revelio_nb.latents`) produces, and its committed on-disk form.

:class:`ImageScores` (the sparse image scores), :class:`FiringLists` (every image each latent fires on, best first:
what the latent browser's dataset view draws, so it never encodes the store again) and :class:`LatentStats` (the
per-latent table, top images, position maps). They are saved as tables (CSV + ``.npz``/``.npy``, no pickle);
``meta.json``, written last, commits them (sizes and SHA-256 of the parts), so an interrupted save is never mistaken
for finished statistics (:func:`check_committed`, :func:`load_or_compute`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .paths import atomic_path


@dataclass
class ImageScores:
    """Every latent's non-zero image scores from the sparse code, grouped by latent (CSR layout).

    Latent ``m`` fires on images ``images[indptr[m]:indptr[m + 1]]`` with scores ``values[...]`` (> 0, descending);
    every other image scores 0. Images are positions 0..n_images-1 in the source's image order (row ``i`` of a
    pooled store; image ``i`` of a spatial one), not dataset indices. Memory: 12 bytes per non-zero score.
    """

    indptr: np.ndarray
    """[M + 1] int64."""
    images: np.ndarray
    """[nnz] int64 image positions."""
    values: np.ndarray
    """[nnz] float32 scores."""
    n_images: int

    @property
    def num_latents(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        """[M] number of images each latent fires on."""
        return np.diff(self.indptr)

    def latent_ids(self) -> np.ndarray:
        """[nnz] the latent of each entry."""
        return np.repeat(np.arange(self.num_latents), self.counts)

    def dense(self) -> np.ndarray:
        """[n_images, M] float32 scores (small problems and tests only)."""
        out = np.zeros((self.n_images, self.num_latents), dtype=np.float32)
        out[self.images, self.latent_ids()] = self.values
        return out

    @classmethod
    def from_dense(cls, scores: np.ndarray) -> "ImageScores":
        """From a dense [n_images, M] score matrix (zeros = not firing; negative scores are not allowed)."""
        d = np.asarray(scores, dtype=np.float32)
        if d.ndim != 2 or (d < 0).any():
            raise ValueError(f"scores must be a non-negative [n_images, M] matrix, got shape {d.shape}")
        lat, img = np.nonzero(d.T)
        val = d[img, lat]
        order = np.lexsort((-val, lat))
        counts = np.bincount(lat, minlength=d.shape[1])
        return cls(np.r_[0, np.cumsum(counts)].astype(np.int64), img[order].astype(np.int64), val[order], d.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.npz`` (no pickle), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, indptr=self.indptr, images=self.images, values=self.values, n_images=np.int64(self.n_images))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImageScores":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["indptr"], z["images"], z["values"], int(z["n_images"]))


@dataclass
class FiringLists:
    """Every image where each latent fires, best first, in dataset indices (CSR layout): latent ``m`` fires on
    ``images[ptr[m]:ptr[m + 1]]`` with scores ``scores[...]`` (> 0, descending; ties in image order).

    The :class:`ImageScores` of the latent-statistics pass with its image positions mapped to dataset indices
    (``image_index``), kept on disk as the ``firing.npz`` part of the statistics."""

    ptr: np.ndarray
    """[M + 1] int64."""
    images: np.ndarray
    """[nnz] int64 dataset indices."""
    scores: np.ndarray
    """[nnz] float32."""

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices and scores of every image where ``latent`` fires, best first."""
        a, b = self.ptr[latent], self.ptr[latent + 1]
        return self.images[a:b], self.scores[a:b]


@dataclass
class LatentStats:
    """Per-latent tables. Arrays are indexed [latent, rank]; missing ranks have row -1 and value 0."""

    table: pd.DataFrame
    top_rows: np.ndarray
    """[M, N] int64 feature-array rows of the top images."""
    top_values: np.ndarray
    """[M, N] float32 image scores (descending)."""
    top_images: np.ndarray
    """[M, N] int64 dataset indices of the top images (``image_index[row]``; equals ``top_rows`` without one)."""
    top_labels: np.ndarray | None = None
    """[M, N] int64 labels of the top images (-1 = none)."""
    label_counts: np.ndarray | None = None
    """[M, n_classes] labels among the top images."""
    maps: np.ndarray | None = None
    """[M, N, H, W] float16 per-position activations of each top image (spatial SAEs)."""
    meta: dict[str, Any] = field(default_factory=dict)
    scores: ImageScores | None = None
    """Every non-zero image score (``latent_stats(..., keep_scores=True)``); not part of :meth:`save`."""
    firing: FiringLists | None = None
    """Every image each latent fires on (always computed by :func:`latent_stats`; saved as ``firing.npz``)."""

    @property
    def num_latents(self) -> int:
        return self.top_rows.shape[0]

    def top(self, latent: int) -> pd.DataFrame:
        """The top images of one latent: rank, row, image, value (and label when known)."""
        keep = self.top_rows[latent] >= 0
        out = pd.DataFrame({"rank": np.arange(keep.sum()), "row": self.top_rows[latent, keep],
                            "image": self.top_images[latent, keep], "value": self.top_values[latent, keep]})
        if self.top_labels is not None:
            out["label"] = self.top_labels[latent, keep]
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the parts, then commit them: ``latents.csv``, ``top.npz`` (rows, values, images, labels, label
        counts), ``maps.npy`` (spatial), ``firing.npz`` (the firing lists), each written atomically, then
        ``meta.json`` (the stats' meta and the size and SHA-256 of every part), the one commit marker. A kill at any moment leaves either the committed new
        statistics or an uncommitted folder that :meth:`load` refuses and :func:`is_committed` reports as not
        computed (the marker is removed before the first part is written).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)  # uncommitted from here until the new marker lands
        csv = self.table.to_csv(index=False).encode("utf-8")
        parts = {"latents.csv": _atomic_write(folder / "latents.csv", lambda f: f.write(csv))}
        arrays = {"top_rows": self.top_rows, "top_values": self.top_values, "top_images": self.top_images}
        if self.label_counts is not None:
            arrays["label_counts"] = self.label_counts
        if self.top_labels is not None:
            arrays["top_labels"] = self.top_labels
        parts["top.npz"] = _atomic_write(folder / "top.npz", lambda f: np.savez(f, **arrays))
        if self.maps is not None:
            maps = self.maps
            parts["maps.npy"] = _atomic_write(folder / "maps.npy", lambda f: np.save(f, maps, allow_pickle=False))
        else:
            (folder / "maps.npy").unlink(missing_ok=True)
        if self.firing is not None:
            fire = self.firing
            parts["firing.npz"] = _atomic_write(folder / "firing.npz", lambda f: np.savez(
                f, ptr=fire.ptr, images=fire.images, scores=fire.scores))
        else:
            (folder / "firing.npz").unlink(missing_ok=True)
        record = {"format": STATS_FORMAT, "version": STATS_VERSION, "meta": self.meta, "parts": parts}
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write(folder / MARKER, lambda f: f.write(text.encode()))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap_maps: bool = True, verify: bool = True) -> "LatentStats":
        """A committed statistics folder (see :meth:`save`).

        Raises ``FileNotFoundError`` when the folder holds no statistics and :class:`LatentStatsError` (naming the
        part) when they are uncommitted (an interrupted save, or written by an older version) or a part does not
        match the commit record (size always; SHA-256 too with ``verify``).
        """
        folder = Path(folder)
        record = check_committed(folder, verify=verify)
        try:
            with np.load(folder / "top.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            maps = firing = None
            if "maps.npy" in record["parts"]:
                maps = np.load(folder / "maps.npy", mmap_mode="r" if mmap_maps else None, allow_pickle=False)
            if "firing.npz" in record["parts"]:
                with np.load(folder / "firing.npz", allow_pickle=False) as z:
                    firing = FiringLists(ptr=z["ptr"], images=z["images"], scores=z["scores"])
            table = pd.read_csv(folder / "latents.csv")
        except (OSError, ValueError, pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            raise LatentStatsError(f"latent statistics in {folder} are unreadable: {e}") from e
        missing = [k for k in ("top_rows", "top_values", "top_images") if k not in arrays]
        if missing:
            raise LatentStatsError(f"{folder / 'top.npz'} lacks the arrays {missing}")
        return cls(table=table, top_rows=arrays["top_rows"], top_values=arrays["top_values"],
                   top_images=arrays["top_images"], top_labels=arrays.get("top_labels"),
                   label_counts=arrays.get("label_counts"), maps=maps, meta=dict(record.get("meta") or {}),
                   firing=firing)


# -------------------------------------------------------------------------------------------- commit record
MARKER = "meta.json"
"""The commit marker of a statistics folder, written last (see :meth:`LatentStats.save`)."""
STATS_FORMAT = "revelio-latent-stats"
STATS_VERSION = 3  # 3: the firing lists (firing.npz)
_PARTS = ("latents.csv", "top.npz", "maps.npy", "firing.npz")


class LatentStatsError(ValueError):
    """Latent statistics that are uncommitted, damaged or unreadable (the message names the folder and part)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> dict[str, Any]:
    """``write(binary file)`` through :func:`~revelio_nb.paths.atomic_path` (unique temporary, fsync, rename);
    returns the part's commit record (bytes, sha256)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        record = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    return record


def check_committed(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The commit record of a statistics folder whose parts all match it; else ``FileNotFoundError`` (no
    statistics there) or :class:`LatentStatsError` naming what is wrong."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        if any((folder / p).exists() for p in _PARTS):
            raise LatentStatsError(f"latent statistics in {folder} are not committed ({MARKER} missing: the save was "
                                   f"interrupted); compute them again")
        raise FileNotFoundError(f"{folder} holds no latent statistics ({MARKER} missing)")
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise LatentStatsError(f"{marker} is unreadable ({e}); compute the statistics again") from e
    if not isinstance(record, dict) or record.get("format") != STATS_FORMAT or not isinstance(record.get("parts"),
                                                                                              dict):
        raise LatentStatsError(f"{marker} is no commit record of format {STATS_FORMAT!r} version {STATS_VERSION} "
                               f"(written by an older revelio-nb, or damaged); compute the statistics again")
    if record.get("version") != STATS_VERSION:
        raise LatentStatsError(f"{marker}: version {record.get('version')!r}, this revelio-nb reads "
                               f"{STATS_VERSION}; compute the statistics again")
    parts = record["parts"]
    need = [p for p in ("latents.csv", "top.npz") if p not in parts]
    if need or set(parts) - set(_PARTS):
        raise LatentStatsError(f"{marker} lists the parts {sorted(parts)}; expected latents.csv, top.npz "
                               f"(and maps.npy, firing.npz)")
    for name, want in parts.items():
        path = folder / name
        if not path.is_file():
            raise LatentStatsError(f"latent statistics in {folder}: part {name} is missing")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise LatentStatsError(f"latent statistics in {folder}: part {name} has {size} bytes, the commit record "
                                   f"says {want.get('bytes')} (truncated or replaced); compute them again")
        if verify and _sha256(path) != want.get("sha256"):
            raise LatentStatsError(f"latent statistics in {folder}: part {name} does not match its SHA-256 in "
                                   f"{MARKER} (damaged); compute them again")
    return record


def is_committed(folder: str | os.PathLike, verify: bool = True) -> bool:
    """Whether ``folder`` holds complete, committed latent statistics (the "already computed?" check)."""
    try:
        check_committed(folder, verify=verify)
        return True
    except (FileNotFoundError, LatentStatsError):
        return False


def load_or_compute(folder: str | os.PathLike, compute) -> LatentStats:
    """The committed statistics in ``folder``; when there are none (or they are uncommitted / damaged),
    ``compute()`` them, save (commit) them there and return them."""
    try:
        return LatentStats.load(folder)
    except (FileNotFoundError, LatentStatsError):
        stats = compute()
        stats.save(folder)
        return stats
