"""Per-latent statistics of a k-SAE, computed from its sparse code (post-TopK), streamed over the features.

For every latent: token and image firing frequency, mean (over the tokens where it fires) and max activation,
its top-N images (array rows, dataset indices, values), the labels of those images (counts, majority, purity,
entropy), the best one-vs-rest AUROC of its image score over all images, and for spatial SAEs the per-position
activation map of each top image.

An image's score for a latent is its activation (pooled) or its maximum over positions (spatial); images where
the latent does not fire score 0. Only the non-zero (image, latent, score) entries are kept, never a dense
[images, latents] matrix. The results and their committed on-disk form (CSV + ``.npz``/``.npy``, no pickle;
``meta.json`` written last) live in :mod:`revelio_nb.latent_store`.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .sae import ArraySource, SparseAutoencoder, as_source
from .latent_store import (FiringLists, ImageScores, LatentStats)


# ------------------------------------------------------------------------------------------------ helpers
def _image_batches(source: ArraySource, batch_size: int, images: np.ndarray | None = None):
    """Yield (local image ids, local token ids) covering whole images, about ``batch_size`` tokens at a time."""
    per = max(1, batch_size // source.positions)
    ids = np.arange(len(source.rows)) if images is None else np.asarray(images, dtype=np.int64)
    for s in range(0, len(ids), per):
        img = ids[s : s + per]
        tokens = (img[:, None] * source.positions + np.arange(source.positions)).reshape(-1)
        yield img, tokens


def _encode(model: SparseAutoencoder, source: ArraySource, tokens: np.ndarray):
    x = torch.from_numpy(source.gather(tokens)).to(model.device)
    acts, idx = model.encode(x)
    return acts.float().cpu(), idx.cpu()


def _segment_positions(keys: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal consecutive ``keys``."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[True, keys[1:] != keys[:-1]]
    run_start = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    return np.arange(n) - run_start


def auroc_from_entries(lat: np.ndarray, val: np.ndarray, lab: np.ndarray, image_labels: np.ndarray,
                       num_latents: int, num_classes: int) -> np.ndarray:
    """One-vs-rest AUROC [M, C] of each latent's image score, from its non-zero (latent, score, label) entries.

    All images not listed score 0 (tied). Exact Mann-Whitney U with average ranks for ties. Classes absent from
    (or making up all of) ``image_labels`` give NaN.
    """
    n_img = len(image_labels)
    class_tot = np.bincount(image_labels, minlength=num_classes).astype(np.float64)
    fire = np.bincount(lat, minlength=num_latents).astype(np.float64)
    zeros = n_img - fire  # images scoring 0 per latent
    order = np.lexsort((val, lat))  # by latent, then score ascending
    lat_s, val_s, lab_s = lat[order], val[order], lab[order]
    pos = _segment_positions(lat_s).astype(np.float64)  # 0-based position among the latent's firing images
    # average positions over ties (same latent and score)
    tie_key = np.r_[True, (lat_s[1:] != lat_s[:-1]) | (val_s[1:] != val_s[:-1])] if len(lat_s) else np.zeros(0, bool)
    run = np.cumsum(tie_key) - 1
    if len(run):
        pos = (np.bincount(run, weights=pos) / np.bincount(run))[run]
    rank = zeros[lat_s] + 1.0 + pos  # ranks among all images, ascending
    key = lat_s * num_classes + lab_s
    rank_sum = np.bincount(key, weights=rank, minlength=num_latents * num_classes).reshape(num_latents, num_classes)
    fire_c = np.bincount(key, minlength=num_latents * num_classes).reshape(num_latents, num_classes)
    zero_c = class_tot[None, :] - fire_c  # positives that score 0
    rank_sum = rank_sum + zero_c * ((zeros[:, None] + 1.0) / 2.0)
    n_pos, n_neg = class_tot[None, :], n_img - class_tot[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[:, (class_tot == 0) | (class_tot == n_img)] = np.nan
    return auc


def label_summary(label_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Majority label, purity (majority share) and label entropy in bits, per row of a [M, C] count matrix."""
    counts = np.asarray(label_counts, dtype=np.float64)
    total = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / total[:, None]
        ent = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(1)
        purity = counts.max(1) / total
    empty = total == 0
    majority = counts.argmax(1)
    majority = np.where(empty, -1, majority)
    ent[empty] = np.nan
    purity[empty] = np.nan
    return {"majority_label": majority, "purity": purity, "label_entropy_bits": ent}


# ------------------------------------------------------------------------------------------------- compute
_ENTRY = np.dtype([("lat", "<i4"), ("val", "<f4"), ("img", "<i8")])
_MAX_SPILL_FILES = 256


class _Entries:
    """The non-zero (latent, image, score) entries of :func:`latent_stats`, grouped by latent range.

    Kept in memory up to ``max_entries``; beyond that, appended to one file per range of latents in a temporary
    folder, so that each range is processed alone and memory does not grow with the number of images. Each
    latent's entries keep their order of arrival, so results are identical either way.
    """

    def __init__(self, num_latents: int, max_entries: int, spill_dir: str | os.PathLike | None):
        self.m, self.max_entries, self.spill_dir = num_latents, max(1, int(max_entries)), spill_dir
        self.mem: list[np.ndarray] = []
        self.n_mem = 0
        self.edges = np.array([0, num_latents])
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.files: list = []

    def add(self, lat: np.ndarray, img: np.ndarray, val: np.ndarray, images_done: int, images_total: int) -> None:
        rec = np.empty(len(lat), dtype=_ENTRY)
        rec["lat"], rec["val"], rec["img"] = lat, val, img
        if not self.files:
            self.mem.append(rec)
            self.n_mem += len(rec)
            if self.n_mem <= self.max_entries:
                return
            expect = self.n_mem / max(1, images_done) * images_total * 1.25
            n = int(min(self.m, _MAX_SPILL_FILES, max(2, math.ceil(expect / self.max_entries))))
            self.edges = (np.arange(n + 1) * self.m) // n
            self.tmp = tempfile.TemporaryDirectory(prefix="revelio-latent-entries-", dir=self.spill_dir)
            self.files = [open(Path(self.tmp.name) / f"{b}.bin", "wb") for b in range(n)]
            rec, self.mem, self.n_mem = np.concatenate(self.mem), [], 0
        b = np.searchsorted(self.edges, rec["lat"], side="right") - 1
        order = np.argsort(b, kind="stable")
        at = np.r_[0, np.cumsum(np.bincount(b, minlength=len(self.files)))]
        for i, f in enumerate(self.files):
            if at[i + 1] > at[i]:
                rec[order[at[i] : at[i + 1]]].tofile(f)

    def ranges(self):
        """Yield (first latent, end latent, latent ids, images, scores) for each latent range."""
        if not self.files:
            rec = np.concatenate(self.mem) if self.mem else np.empty(0, dtype=_ENTRY)
            self.mem = []
            yield 0, self.m, rec["lat"].astype(np.int64), rec["img"].copy(), rec["val"].copy()
            return
        for f in self.files:
            f.close()
        for i, f in enumerate(self.files):
            rec = np.fromfile(f.name, dtype=_ENTRY)
            os.unlink(f.name)
            yield int(self.edges[i]), int(self.edges[i + 1]), rec["lat"].astype(np.int64), rec["img"].copy(), \
                rec["val"].copy()

    def close(self) -> None:
        for f in self.files:
            f.close()
        if self.tmp is not None:
            self.tmp.cleanup()


@torch.no_grad()
def latent_stats(model: SparseAutoencoder, source, labels=None, *, top_n: int = 16, image_index=None,
                 class_names: Sequence[str] | None = None, batch_size: int = 8192, maps: bool = True,
                 max_map_bytes: int = 1 << 30, progress: bool = False, max_entries: int = 1 << 20,
                 spill_dir: str | os.PathLike | None = None, keep_scores: bool = False) -> LatentStats:
    """Statistics of every latent over all images of ``source`` (an :class:`ArraySource` or feature array).

    ``labels``: int labels aligned with the feature array's rows (e.g. ``store.labels``). ``image_index``: maps
    array rows to dataset indices (e.g. ``store.indices``) for ``top_images``. Spatial sources also get the
    per-position maps of each top image (``maps=False`` skips them; more than ``max_map_bytes`` is an error).

    Memory does not grow with the number of images: beyond ``max_entries`` non-zero (image, latent) scores (16
    bytes each), they are spilled to a temporary folder (in ``spill_dir``, default the system's) and processed one
    range of latents at a time (about 130 bytes of RAM per entry of a range).

    The firing lists (``stats.firing``, :class:`FiringLists`: every non-zero image score by latent, 12 bytes per
    entry, saved as ``firing.npz``) are always returned: the latent browser's dataset view reads them.

    ``keep_scores``: also return every non-zero image score (:class:`ImageScores`, ``stats.scores``; 12 bytes per
    entry kept in memory), for analyses such as :mod:`revelio_nb.taxonomy` without a second pass over the SAE.
    """
    source = as_source(source)
    if source.d_in != model.d_in:
        raise ValueError(f"features have width {source.d_in} but the SAE has d_in {model.d_in}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != source.array.shape[0]:
            raise ValueError(f"labels has {len(labels)} entries but the features have {source.array.shape[0]} rows")
        if labels.min() < 0:
            raise ValueError("labels must be >= 0")
        n_cls = int(labels.max()) + 1 if class_names is None else len(class_names)
        if labels.max() >= n_cls:
            raise ValueError(f"label {labels.max()} out of range for {n_cls} class names")
        img_labels = labels[source.rows]
    else:
        img_labels, n_cls = None, 0
    entries = _Entries(model.num_latents, max_entries, spill_dir)
    try:
        return _latent_stats(model, source, labels, img_labels, n_cls, entries, top_n=top_n, image_index=image_index,
                             class_names=class_names, batch_size=batch_size, maps=maps, max_map_bytes=max_map_bytes,
                             progress=progress, keep_scores=keep_scores)
    finally:
        entries.close()


def _latent_stats(model, source: ArraySource, labels, img_labels, n_cls: int, entries: _Entries, *, top_n,
                  image_index, class_names, batch_size, maps, max_map_bytes, progress,
                  keep_scores: bool = False) -> LatentStats:
    m, hw = model.num_latents, source.positions
    n_img = len(source.rows)
    count = torch.zeros(m, dtype=torch.float64)
    total = torch.zeros(m, dtype=torch.float64)
    vmax = torch.zeros(m, dtype=torch.float32)
    n_batches = -(-n_img // max(1, batch_size // hw))
    for img, tokens in tqdm(_image_batches(source, batch_size), total=n_batches, desc="latent stats",
                            disable=not progress):
        acts, idx = _encode(model, source, tokens)
        fired = acts > 0
        t_local = torch.arange(len(tokens)).unsqueeze(1).expand_as(idx)[fired]
        lat, val = idx[fired], acts[fired]
        count += torch.bincount(lat, minlength=m).double()
        total += torch.bincount(lat, weights=val.double(), minlength=m)
        vmax.scatter_reduce_(0, lat, val, "amax")
        if hw == 1:
            im_local, im_lat, im_val = t_local, lat, val  # top-k indices are distinct per token
        else:  # image score = max over positions
            keys, inv = torch.unique(torch.div(t_local, hw, rounding_mode="floor") * m + lat, return_inverse=True)
            im_val = torch.zeros(len(keys)).scatter_reduce_(0, inv, val, "amax", include_self=False)
            im_local, im_lat = torch.div(keys, m, rounding_mode="floor"), keys % m
        entries.add(im_lat.numpy(), img[im_local.numpy()], im_val.numpy(), int(img[-1]) + 1, n_img)

    # per range of latents: top-N images per latent (sort by latent, then score descending) and AUROC
    img_count = np.zeros(m, dtype=np.int64)
    top_rows = np.full((m, top_n), -1, dtype=np.int64)
    top_values = np.zeros((m, top_n), dtype=np.float32)
    auc = np.full((m, n_cls), np.nan) if labels is not None else None
    kept = []  # (latent, rank, image) of every top entry
    score_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (images, scores) per range, by latent then score
    for lo, hi, lat_e, img_e, val_e in entries.ranges():
        lat_e -= lo
        img_count[lo:hi] = np.bincount(lat_e, minlength=hi - lo)
        order = np.lexsort((-val_e, lat_e))
        lat_s, img_s, val_s = lat_e[order] + lo, img_e[order], val_e[order]
        rank = _segment_positions(lat_s)
        keep = rank < top_n
        top_rows[lat_s[keep], rank[keep]] = source.rows[img_s[keep]]
        top_values[lat_s[keep], rank[keep]] = val_s[keep]
        kept.append((lat_s[keep], rank[keep], img_s[keep]))
        score_parts.append((img_s.astype(np.int64), val_s.astype(np.float32)))
        if labels is not None:
            auc[lo:hi] = auroc_from_entries(lat_e, val_e, img_labels[img_e], img_labels, hi - lo, n_cls)
        del lat_e, img_e, val_e, order, lat_s, img_s, val_s, rank, keep  # before the next range is read
    lat_k, rank_k, img_k = (np.concatenate(a) for a in zip(*kept))
    index = None if image_index is None else np.asarray(image_index, dtype=np.int64)
    if index is not None and len(index) != source.array.shape[0]:
        raise ValueError(f"image_index has {len(index)} entries but the features have {source.array.shape[0]} rows")
    top_images = top_rows.copy() if index is None else np.where(top_rows >= 0, index[np.maximum(top_rows, 0)], -1)

    cnt = count.numpy()
    table = pd.DataFrame({
        "latent": np.arange(m),
        "freq_tokens": cnt / source.n_tokens,
        "freq_images": img_count / n_img,
        "mean_act": np.divide(total.numpy(), cnt, out=np.zeros(m), where=cnt > 0),
        "max_act": vmax.numpy().astype(np.float64),
        "n_top": np.minimum(img_count, top_n),
    })
    meta: dict[str, Any] = {"top_n": top_n, "n_images": n_img, "n_tokens": source.n_tokens, "num_latents": m,
                            "k": model.k, "spatial": source.spatial, "grid": list(source.grid),
                            "score": "max over positions" if source.spatial else "activation"}
    label_counts = top_labels = None
    if labels is not None:
        top_lab = img_labels[img_k]
        label_counts = np.bincount(lat_k * n_cls + top_lab, minlength=m * n_cls).reshape(m, n_cls)
        top_labels = np.where(top_rows >= 0, labels[np.maximum(top_rows, 0)], -1)
        for key, col in label_summary(label_counts).items():
            table[key] = col
        best = np.where(np.isnan(auc), -np.inf, auc)
        table["best_auroc"] = np.where(np.isfinite(best.max(1)), best.max(1), np.nan)
        table["best_auroc_label"] = best.argmax(1)
        if class_names is not None:
            names = np.asarray(list(class_names) + [""], dtype=object)
            table["majority_class"] = names[table["majority_label"].to_numpy()]  # -1 -> ""
            table["best_auroc_class"] = names[table["best_auroc_label"].to_numpy()]
            meta["class_names"] = list(class_names)

    maps_arr = None
    if maps and source.spatial:
        h, w = source.grid
        need = top_n * m * hw * 2
        if need > max_map_bytes:
            raise ValueError(f"per-position maps need {need / 2**30:.2f} GiB (> max_map_bytes={max_map_bytes}); "
                             "lower top_n, raise max_map_bytes or pass maps=False")
        maps_arr = _position_maps(model, source, lat_k, rank_k, img_k, top_n, batch_size)
        maps_arr = maps_arr.reshape(m, top_n, h, w)
    all_scores = ImageScores(indptr=np.r_[0, np.cumsum(img_count)].astype(np.int64),
                             images=np.concatenate([p[0] for p in score_parts]),
                             values=np.concatenate([p[1] for p in score_parts]), n_images=n_img)
    rows = source.rows[all_scores.images]
    firing = FiringLists(ptr=all_scores.indptr, images=rows if index is None else index[rows],
                         scores=all_scores.values)
    return LatentStats(table=table, top_rows=top_rows, top_values=top_values, top_images=top_images,
                       top_labels=top_labels, label_counts=label_counts, maps=maps_arr, meta=meta,
                       scores=all_scores if keep_scores else None, firing=firing)


def image_scores(model: SparseAutoencoder, source, batch_size: int = 8192, progress: bool = False,
                 **kwargs: Any) -> ImageScores:
    """Every latent's non-zero image scores over ``source`` (the streamed pass of :func:`latent_stats`, which
    returns the same with ``keep_scores=True``): activation (pooled) or max over positions (spatial)."""
    return latent_stats(model, source, top_n=1, batch_size=batch_size, maps=False, progress=progress,
                        keep_scores=True, **kwargs).scores


def _position_maps(model, source: ArraySource, lat: np.ndarray, rank: np.ndarray, img: np.ndarray, top_n: int,
                   batch_size: int) -> np.ndarray:
    """[M * N, H * W] float16 activations at every position of each (latent, top image) pair; a second pass."""
    m, hw = model.num_latents, source.positions
    out = np.zeros((m * top_n, hw), dtype=np.float16)
    need_key = img * m + lat
    order = np.argsort(need_key)
    need_key, slot = need_key[order], (lat * top_n + rank)[order]
    for imgs, tokens in _image_batches(source, batch_size, np.unique(img)):
        acts, idx = _encode(model, source, tokens)
        fired = (acts > 0).numpy()
        t = np.broadcast_to(np.arange(len(tokens))[:, None], fired.shape)[fired]
        key = imgs[t // hw] * m + idx.numpy()[fired]
        at = np.minimum(np.searchsorted(need_key, key), len(need_key) - 1)
        hit = need_key[at] == key
        out[slot[at[hit]], (t % hw)[hit]] = acts.numpy()[fired][hit]
    return out


# ---------------------------------------------------------------------------------------------------- plots
def plot_top_images(stats: LatentStats, images: np.ndarray, latents: Sequence[int], n: int = 8,
                    class_names: Sequence[str] | None = None, overlay_maps: bool = True,
                    path: str | os.PathLike | None = None, dpi: int = 120):
    """Grid of the top ``n`` images (uint8 (N, H, W, C), indexed by ``stats.top_images``) for each latent.

    Spatial stats overlay each image's per-position map. Saved as PNG when ``path`` is given.
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    latents = [int(l) for l in latents]
    bad = [l for l in latents if not 0 <= l < stats.num_latents]
    if bad:
        raise ValueError(f"latents {bad} out of range [0, {stats.num_latents})")
    n = min(n, stats.top_rows.shape[1])
    names = class_names or stats.meta.get("class_names")
    fig, axes = plt.subplots(len(latents), n, figsize=(1.15 * n, 1.3 * len(latents)), squeeze=False)
    for i, lat in enumerate(latents):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            im_id = int(stats.top_images[lat, j])
            if im_id < 0:
                continue
            img = images[im_id]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      extent=(0, 1, 1, 0))
            if overlay_maps and stats.maps is not None:
                amap = np.asarray(stats.maps[lat, j], dtype=np.float32)
                if amap.max() > 0:
                    ax.imshow(amap, cmap="inferno", alpha=0.55 * (amap > 0) + 0.0, extent=(0, 1, 1, 0),
                              interpolation="nearest", vmin=0)
            title = f"{stats.top_values[lat, j]:.2g}"
            if stats.top_labels is not None and names is not None:
                title += f" {names[int(stats.top_labels[lat, j])]}"
            ax.set_title(title, fontsize=6)
        row = stats.table.iloc[lat] if len(stats.table) > lat else None
        label = f"#{lat}"
        if row is not None and "purity" in row and np.isfinite(row["purity"]):
            label += f"\np={row['purity']:.2f}"
        axes[i, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig
