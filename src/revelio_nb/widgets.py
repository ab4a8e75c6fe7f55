"""Latent browser: slide through the latents of every trained k-SAE with ipywidgets, from precomputed tables only.

A run's SAEs are listed in ``<run_dir>/sae/hookpoints.csv`` (one row per SAE; written by notebook 02, validated by
:func:`read_hookpoints`). For each hookpoint the browser shows

* a stats line (firing frequency, mean / max activation, purity, majority class, best AUROC, dead flag),
* the top-N activating images with their scores and classes, and for spatial SAEs an activation heatmap over each
  image (toggle),
* the class distribution of those top images (bars),
* a dataset view: a 2-D embedding (PCA or t-SNE) of the pooled features coloured by class, where every image that
  fires the latent is drawn solid (the others faded) and its top-N images are ringed red.

Everything expensive happens once per hookpoint and is cached beside the latent statistics: the 2-D embedding
(``embedding-<method>.npz``) and the firing index (``firing.npz``: for every latent, every image of the split where
it fires and its score, from the SAE's sparse code). Moving the slider only indexes arrays, draws a few rings on a
pre-rendered scatter and sends cached PNG thumbnails; it never touches the diffusion model or the SAE.

    from revelio_nb import widgets
    widgets.LatentBrowser(run_dir)          # displays itself in a notebook

The same data drive the static page (:mod:`revelio_nb.gallery`), which is what papermill runs keep.
"""

from __future__ import annotations

import html
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import artifacts
from .optional import require
from .paths import atomic_path

HOOKPOINTS_FILE = Path("sae") / "hookpoints.csv"
REQUIRED_COLUMNS = ("hookpoint", "model", "block", "t", "pooling", "sae_dir", "latents_dir", "store_dir", "dataset",
                    "split")
OPTIONAL_COLUMNS = ("embedding_store_dir", "taxonomy_path")
POOLINGS = ("mean", "none")
EMBEDDINGS = ("pca", "tsne")
SORTS: dict[str, tuple[str, bool]] = {  # label -> (table column, descending)
    "frequency": ("freq_images", True),
    "purity": ("purity", True),
    "max activation": ("max_act", True),
    "AUROC": ("best_auroc", True),
    "kind": ("kind_rank", False),  # with a taxonomy: class, mixed, attribute, unexplained, dead; strongest first
    "attribute |rho|": ("attribute_rho_abs", True),
    "index": ("latent", False),
}
ALL_KINDS = "all kinds"  # the kind filter's "no filter" choice
_PATH_COLUMNS = ("sae_dir", "latents_dir", "store_dir", "embedding_store_dir", "taxonomy_path")


class BrowserError(ValueError):
    """A bad hookpoint index, latent table or browser setting (the message names the value and the choices)."""


# --------------------------------------------------------------------------------------------- hookpoints
def hookpoints_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / HOOKPOINTS_FILE


def _resolve(value: Any, bases: Sequence[Path]) -> str:
    """Absolute path of a path cell, symlinks resolved: relative ones are tried against each base (first existing
    wins)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return ""
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return str(p.resolve())
    for base in bases:
        if (base / p).exists():
            return str((base / p).resolve())
    return str((bases[0] / p).resolve())


def allowed_roots(run_dir: str | os.PathLike | None, extra_roots: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Folders the browser may read and write through a run index: the run folder, the cache folder
    (:func:`revelio_nb.paths.cache_dir`) and any ``extra_roots`` (all with symlinks resolved)."""
    from .paths import cache_dir

    roots = ([Path(run_dir).resolve()] if run_dir is not None else []) + [cache_dir().resolve()]
    return roots + [Path(r).expanduser().resolve() for r in extra_roots]


def _inside(path: str | os.PathLike, roots: Sequence[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in roots)


def check_row_paths(row: dict, roots: Sequence[Path], where: str = "", raw: dict | None = None) -> None:
    """:class:`BrowserError` unless every path column of ``row`` resolves (after symlinks) inside ``roots``
    (``raw``: the cells as written, for the message)."""
    for col in _PATH_COLUMNS:
        value = row.get(col)
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            continue
        if not _inside(str(value), roots):
            shown = (raw or row).get(col, value)
            raise BrowserError(
                f"{where}hookpoint {str(row.get('hookpoint'))!r}: column {col!r} = {str(shown)!r} resolves to "
                f"{Path(str(value)).resolve()}, outside the folders the browser may use: {[str(r) for r in roots]} "
                f"(the run folder and the cache folder; pass extra_roots=[...] to allow another folder)")


def read_hookpoints(run_dir: str | os.PathLike, extra_roots: Sequence[str | os.PathLike] = ()) -> pd.DataFrame:
    """Validated ``<run_dir>/sae/hookpoints.csv``: one row per SAE, paths made absolute.

    Relative paths are taken relative to the CSV's folder, else to ``run_dir``. Every path column (``sae_dir``,
    ``latents_dir``, ``store_dir``, ``embedding_store_dir``) must resolve, after symlinks, inside the run folder,
    the cache folder or one of ``extra_roots``: a crafted index cannot make the browser read or write elsewhere.
    Raises ``FileNotFoundError`` when the file is missing and :class:`BrowserError` (naming the bad rows / columns /
    values) when it is malformed.
    """
    path = hookpoints_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no SAE hookpoint index at {path}: run notebook 02 (train SAEs) on this run first, "
                                f"or pass the run_dir that holds sae/hookpoints.csv")
    try:
        table = pd.read_csv(path, dtype={"hookpoint": str, "model": str, "block": str, "pooling": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BrowserError(f"{path} is not a readable CSV: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise BrowserError(f"{path} lacks the columns {missing}; required: {list(REQUIRED_COLUMNS)} "
                           f"(optional: {list(OPTIONAL_COLUMNS)}); found: {list(table.columns)}")
    if table.empty:
        raise BrowserError(f"{path} lists no hookpoints (header only): notebook 02 trained no SAE")
    blank = table[list(REQUIRED_COLUMNS)].isna() | (table[list(REQUIRED_COLUMNS)].astype(str) == "")
    if blank.to_numpy().any():
        rows, cols = np.nonzero(blank.to_numpy())
        bad = sorted({(int(r), list(REQUIRED_COLUMNS)[c]) for r, c in zip(rows, cols)})
        raise BrowserError(f"{path}: empty cells (row, column): {bad[:10]}")
    bad_pool = sorted(set(table.loc[~table["pooling"].isin(POOLINGS), "pooling"]))
    if bad_pool:
        raise BrowserError(f"{path}: pooling {bad_pool} not in {list(POOLINGS)}")
    try:
        table["t"] = table["t"].astype(int)
    except (ValueError, TypeError) as e:
        raise BrowserError(f"{path}: column t must hold integer timesteps, got {table['t'].tolist()}") from e
    dup = table["hookpoint"][table["hookpoint"].duplicated()].tolist()
    if dup:
        raise BrowserError(f"{path}: hookpoint labels must be unique; repeated: {dup}")
    for col in ("embedding_store_dir", "taxonomy_path"):
        if col not in table.columns:
            table[col] = ""
    bases = [path.parent.resolve(), Path(run_dir).resolve()]
    raw = table[list(_PATH_COLUMNS)].to_dict("records")
    for col in _PATH_COLUMNS:
        table[col] = [_resolve(v, bases) for v in table[col]]
    roots = allowed_roots(run_dir, extra_roots)
    for i, row in enumerate(table.to_dict("records")):
        check_row_paths(row, roots, where=f"{path}: row {i}, ", raw=raw[i])
    return table.reset_index(drop=True)


def slugify(label: str) -> str:
    """File-name-safe version of a hookpoint label."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(label).replace("=", "")).strip("_") or "hookpoint"


# ------------------------------------------------------------------------------------------------ ordering
def latent_table(stats) -> pd.DataFrame:
    """The stats table with a boolean ``dead`` column (the table's own, else: never fired on the split)."""
    table = stats.table.copy()
    if "latent" not in table.columns:
        table.insert(0, "latent", np.arange(len(table)))
    if "dead" in table.columns:
        table["dead"] = table["dead"].astype(bool)
    elif "freq_tokens" in table.columns:
        table["dead"] = ~(table["freq_tokens"].fillna(0).to_numpy() > 0)
    elif "n_top" in table.columns:
        table["dead"] = table["n_top"].fillna(0).to_numpy() == 0
    else:
        table["dead"] = False
    return table


def with_taxonomy(table: pd.DataFrame, taxonomy_path: str | None) -> pd.DataFrame:
    """The latent table with each latent's kind from its taxonomy (:mod:`revelio_nb.taxonomy`): ``kind``,
    ``kind_label`` (class / attribute and sign), ``best_attribute``, ``attribute_rho``, and the sort keys
    ``kind_rank`` (kind order, strongest first within a kind) and ``attribute_rho_abs``. Unchanged without one."""
    if not taxonomy_path or not Path(str(taxonomy_path)).is_file():
        return table
    from .taxonomy import KINDS, Taxonomy

    tax = Taxonomy.load(taxonomy_path).table.set_index("latent")
    if len(tax) != len(table):
        raise BrowserError(f"taxonomy {taxonomy_path} has {len(tax)} latents, the statistics {len(table)}")
    t = tax.reindex(table["latent"].to_numpy())
    out = table.copy()
    out["kind"] = t["kind"].fillna("").astype(str).to_numpy()
    out["kind_label"] = t["label"].fillna("").astype(str).to_numpy()
    out["best_attribute"] = t["best_attribute"].fillna("").astype(str).to_numpy()
    out["attribute_rho"] = t["attribute_rho"].to_numpy(dtype=np.float64)
    out["attribute_rho_abs"] = np.abs(out["attribute_rho"])
    strength = np.fmax(np.nan_to_num(2 * (t["class_auroc"].to_numpy(dtype=np.float64) - 0.5), nan=0.0),
                       np.nan_to_num(out["attribute_rho_abs"].to_numpy(), nan=0.0))
    order = {k: i for i, k in enumerate(KINDS)}
    out["kind_rank"] = np.array([order.get(k, len(KINDS)) for k in out["kind"]]) + 0.5 * (1 - np.clip(strength, 0, 1))
    return out


def kind_choices(table: pd.DataFrame) -> list[str]:
    """The kind filter's choices for a latent table: "all kinds" and the kinds it holds (none without a taxonomy)."""
    if "kind" not in table.columns:
        return [ALL_KINDS]
    from .taxonomy import KINDS

    return [ALL_KINDS] + [k for k in KINDS if (table["kind"] == k).any()]


def available_sorts(table: pd.DataFrame) -> list[str]:
    """Sort orders whose column the table has (AUROC and purity need labels)."""
    return [k for k, (col, _) in SORTS.items()
            if col in table.columns and (col == "latent" or table[col].notna().any())]


def sort_latents(table: pd.DataFrame, sort: str = "frequency", hide_dead: bool = True,
                 kind: str | None = None) -> np.ndarray:
    """Latent ids in browsing order: by ``sort`` (descending; ``index`` ascending), missing values last, ties by id;
    ``kind``: only latents of that kind (needs a taxonomy; None or "all kinds": no filter)."""
    if kind not in (None, ALL_KINDS):
        from .taxonomy import KINDS

        if kind not in KINDS:
            raise BrowserError(f"unknown kind {kind!r}; choices: {[ALL_KINDS, *KINDS]}")
        if "kind" not in table.columns:
            raise BrowserError(f"cannot filter by kind {kind!r}: this hookpoint has no taxonomy (taxonomy_path)")
        table = table[table["kind"] == kind]
    if sort not in SORTS:
        raise BrowserError(f"unknown sort {sort!r}; choices: {list(SORTS)}")
    col, desc = SORTS[sort]
    if col not in table.columns:
        raise BrowserError(f"cannot sort by {sort!r}: the latent table has no {col!r} column (needs labels); "
                           f"choices here: {available_sorts(table)}")
    t = table[~table["dead"]] if hide_dead and "dead" in table.columns else table
    ids = t["latent"].to_numpy(dtype=np.int64)
    key = t[col].to_numpy(dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf if desc else np.inf, key)
    return ids[np.lexsort((ids, -key if desc else key))]


# ------------------------------------------------------------------------------------------ precomputation
def display_image(img: np.ndarray, image_size: int | None) -> np.ndarray:
    """The image framed as the model saw it, so activation maps line up (mirrors ``data.resize_square``): zero
    (black) padding up to ``image_size`` when it fits inside, else a centre square crop (the model's resize only
    changes the resolution, not the framing)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    h, w = img.shape[:2]
    if image_size and h <= image_size and w <= image_size:
        if h == w == image_size:
            return img
        top, left = (image_size - h) // 2, (image_size - w) // 2
        out = np.zeros((image_size, image_size, img.shape[2]), dtype=img.dtype)
        out[top:top + h, left:left + w] = img
        return out
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _open_store(path: str):
    from .features import FeatureStore

    return FeatureStore.open(path)


def _pooled_features(row: dict, store, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) pooled features of the row's block/t and the dataset index of each row."""
    block, t = row["block"], int(row["t"])
    emb_dir = row.get("embedding_store_dir") or ""
    if emb_dir:
        est = _open_store(emb_dir)
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


def _cache_file(folder: Path, name: str, key: str, build):
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
    src = _open_store(emb_dir) if emb_dir else store
    key = artifacts.embedding_cache_key(src, row["block"], int(row["t"]), method, seed, max_points)

    def build():
        x, idx = _pooled_features(row, store, progress)
        keep = np.arange(len(x))
        if method == "tsne" and len(x) > max_points:
            keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, idx = x[keep], idx[keep]
        if method == "pca" or len(x) < 5:
            from .plots import pca_2d

            pts = pca_2d(x, seed=seed) if len(x) >= 2 else np.zeros((len(x), 2))
        else:
            from sklearn.decomposition import PCA
            from sklearn.manifold import TSNE

            z = (x - x.mean(0)) / (x.std(0) + 1e-8)
            z = PCA(n_components=min(50, *z.shape), random_state=seed).fit_transform(z)
            pts = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(z) - 1) / 3)), init="pca",
                       random_state=seed).fit_transform(z)
        return {"points": np.asarray(pts, dtype=np.float32), "indices": np.asarray(idx, dtype=np.int64)}

    return _cache_file(Path(row["latents_dir"]), f"embedding-{method}.npz", key, build)


def firing_index(row: dict, store, batch_size: int = 8192, progress: bool = False) -> dict[str, np.ndarray]:
    """Every (latent, image, score) where the SAE fires on the store's images, as CSR arrays; cached.

    ``ptr`` (M + 1), ``images`` (dataset indices) and ``scores`` sorted by latent, then score descending. An image's
    score is its activation (pooled) or its maximum over positions (spatial), like :func:`latents.latent_stats`.
    """
    import torch

    from .sae import ArraySource, SparseAutoencoder

    sae_dir = Path(row["sae_dir"])
    st = sae_dir / "sae.safetensors"
    if not st.is_file():
        raise FileNotFoundError(f"no SAE weights at {st}")
    arr = store.array(row["block"], int(row["t"]))
    key = artifacts.firing_cache_key(sae_dir, store, row["block"], int(row["t"]))

    @torch.no_grad()
    def build():
        from tqdm.auto import tqdm

        model = SparseAutoencoder.load(sae_dir, d_in=arr.shape[1])
        src = ArraySource(arr)
        m, hw = model.num_latents, src.positions
        per = max(1, batch_size // hw)
        lat_l, img_l, val_l = [], [], []
        for s in tqdm(range(0, len(src.rows), per), desc="firing index", disable=not progress, delay=1.0):
            img = np.arange(s, min(s + per, len(src.rows)))
            tokens = (img[:, None] * hw + np.arange(hw)).reshape(-1)
            acts, idx = model.encode(torch.from_numpy(src.gather(tokens)))
            acts, idx = acts.float().numpy(), idx.numpy()
            fired = acts > 0
            tok = np.broadcast_to(np.arange(len(tokens))[:, None], fired.shape)[fired]
            key_ = (img[tok // hw]) * m + idx[fired]
            val = acts[fired]
            if hw > 1:  # max over positions per (image, latent)
                order = np.lexsort((-val, key_))
                key_, val = key_[order], val[order]
                first = np.r_[True, key_[1:] != key_[:-1]]
                key_, val = key_[first], val[first]
            img_l.append(key_ // m)
            lat_l.append(key_ % m)
            val_l.append(val.astype(np.float32))
        lat = np.concatenate(lat_l) if lat_l else np.zeros(0, np.int64)
        rows = np.concatenate(img_l) if img_l else np.zeros(0, np.int64)
        val = np.concatenate(val_l) if val_l else np.zeros(0, np.float32)
        order = np.lexsort((-val, lat))
        ptr = np.searchsorted(lat[order], np.arange(m + 1))
        return {"ptr": ptr.astype(np.int64), "images": store.indices[rows[order]].astype(np.int64),
                "scores": val[order]}

    return _cache_file(Path(row["latents_dir"]), "firing.npz", key, build)


@dataclass
class HookpointData:
    """Everything the browser shows for one hookpoint, loaded once (arrays only; no model)."""

    label: str
    row: dict
    stats: Any
    table: pd.DataFrame
    images: np.ndarray
    """The dataset's uint8 images (N, H, W, C), indexed by dataset index."""
    class_names: list[str]
    image_size: int | None
    points: np.ndarray
    point_indices: np.ndarray
    point_labels: np.ndarray
    firing: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._order = np.argsort(self.point_indices, kind="stable")
        self._sorted = self.point_indices[self._order]

    @property
    def num_latents(self) -> int:
        return int(self.stats.num_latents)

    @property
    def spatial(self) -> bool:
        return self.stats.maps is not None

    def point_positions(self, dataset_indices: np.ndarray) -> np.ndarray:
        """Position in ``points`` of each dataset index, -1 where an image is not embedded."""
        d = np.asarray(dataset_indices, dtype=np.int64)
        if len(self._sorted) == 0 or len(d) == 0:
            return np.full(len(d), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, d), len(self._sorted) - 1)
        return np.where(self._sorted[at] == d, self._order[at], -1)

    def points_of(self, dataset_indices: np.ndarray) -> np.ndarray:
        """Positions in ``points`` of the given dataset indices (those not embedded are dropped)."""
        p = self.point_positions(dataset_indices)
        return p[p >= 0]

    def firing_images(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices and scores of every image where ``latent`` fires (top images only without an index)."""
        if self.firing is not None:
            p = self.firing["ptr"]
            return self.firing["images"][p[latent]:p[latent + 1]], self.firing["scores"][p[latent]:p[latent + 1]]
        keep = self.stats.top_rows[latent] >= 0
        return self.stats.top_images[latent, keep], self.stats.top_values[latent, keep]


_DATASETS: dict[str, Any] = {}


def _dataset(name: str):
    from .data import load_dataset

    if name not in _DATASETS:
        _DATASETS[name] = load_dataset(name)
    return _DATASETS[name]


def load_hookpoint(row: dict | pd.Series, embedding: str = "pca", seed: int = 0, firing: bool = True,
                   progress: bool = False, roots: Sequence[Path] | None = None) -> HookpointData:
    """Load one hookpoint's statistics, dataset images, 2-D embedding and firing index (cached after the first time).

    ``roots``: when given (see :func:`allowed_roots`), the row's folders must lie inside them (:func:`read_hookpoints`
    already checks the rows it returns). The row's ``dataset`` must be the one its store was extracted from.
    """
    from .latents import LatentStats, LatentStatsError

    row = dict(row)
    label = str(row["hookpoint"])
    if roots is not None:
        check_row_paths(row, roots)
    lat_dir = Path(row["latents_dir"])
    try:
        stats = LatentStats.load(lat_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"hookpoint {label!r}: no latent statistics in {lat_dir} (run notebook 02)") from e
    except (LatentStatsError, OSError, ValueError, KeyError) as e:
        raise BrowserError(f"hookpoint {label!r}: latent statistics in {lat_dir} are unusable: {e}") from e
    table = latent_table(stats)
    if len(table) == 0 or stats.num_latents == 0:
        raise BrowserError(f"hookpoint {label!r}: the latent table in {lat_dir} is empty (0 latents)")
    if len(table) != stats.num_latents:
        raise BrowserError(f"hookpoint {label!r}: latents.csv has {len(table)} rows but top.npz has "
                           f"{stats.num_latents} latents ({lat_dir})")
    store = _open_store(row["store_dir"])
    # the images shown must be those the store was extracted from; this also keeps a crafted index from making
    # the browser read (and the static page embed) an arbitrary image folder
    extracted_from = [v for v in (store.manifest.get("dataset"), (store.manifest.get("config") or {}).get("dataset"))
                      if isinstance(v, str)]
    if extracted_from and str(row["dataset"]) not in extracted_from:
        raise BrowserError(f"hookpoint {label!r}: dataset {str(row['dataset'])!r} is not the one its store "
                           f"{row['store_dir']} was extracted from ({extracted_from[0]!r})")
    ds = _dataset(str(row["dataset"]))
    names = list(stats.meta.get("class_names") or store.class_names or ds.class_names)
    notes: list[str] = []
    try:  # latent kinds are an extra: a bad taxonomy is a note, not a failure
        table = with_taxonomy(table, row.get("taxonomy_path"))
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError) as e:
        notes.append(f"latent kinds unavailable ({e})")
    emb = embedding_points(row, store, embedding, seed=seed, progress=progress)
    labels_of = ds.labels if len(ds.labels) else np.zeros(len(ds.images), np.int64)
    fire = None
    if firing:
        try:
            fire = firing_index(row, store, progress=progress)
        except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
            notes.append(f"firing index unavailable ({e}); the dataset view rings the top images only")
    return HookpointData(label=label, row=row, stats=stats, table=table, images=ds.images, class_names=names,
                         image_size=store.manifest.get("image_size"), points=emb["points"],
                         point_indices=emb["indices"], point_labels=labels_of[emb["indices"]], firing=fire,
                         notes=notes)


# -------------------------------------------------------------------------------------------------- views
@dataclass
class LatentView:
    """What the browser shows for one latent (plain arrays; the widget and the tests read the same object)."""

    hookpoint: str
    latent: int
    position: int
    count: int
    stats: dict
    images: np.ndarray
    """Dataset indices of the top images, best first."""
    values: np.ndarray
    labels: np.ndarray | None
    label_counts: np.ndarray | None
    class_names: list[str]
    firing_points: np.ndarray
    """Positions in the embedding of every image that fires the latent."""
    top_points: np.ndarray
    n_firing: int

    def stats_text(self) -> str:
        s = self.stats

        def f(key, fmt):
            v = s.get(key)
            return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

        parts = [f"latent #{self.latent}", f"rank {self.position + 1}/{self.count}",
                 f"fires on {f('freq_images', '.1%')} of images ({f('freq_tokens', '.2%')} of tokens)",
                 f"mean act {f('mean_act', '.3g')}", f"max act {f('max_act', '.3g')}"]
        if "purity" in s:
            maj = s.get("majority_class") or (self.class_names[int(s["majority_label"])]
                                              if s.get("majority_label", -1) not in (None, -1) else "")
            maj = f" (majority: {maj})" if isinstance(maj, str) and maj else ""
            parts.append(f"purity {f('purity', '.2f')}{maj}")
        if "best_auroc" in s:
            cls = s.get("best_auroc_class")
            parts.append(f"best AUROC {f('best_auroc', '.3f')}" + (f" ({cls})" if isinstance(cls, str) and cls else ""))
        if s.get("kind"):
            parts.append(f"kind: {s['kind']}" + (f" ({s['kind_label']})" if s.get("kind_label") else ""))
            if s.get("best_attribute"):
                parts.append(f"best attribute {s['best_attribute']} (within-class rho {f('attribute_rho', '+.2f')})")
        parts.append("DEAD (never fires)" if s.get("dead") else "alive")
        return " · ".join(parts)


def _counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.int64)
    lab = lab[lab >= 0]
    return np.bincount(lab, minlength=max(n_classes, int(lab.max()) + 1 if len(lab) else 0))


def latent_view(data: HookpointData, latent: int, top_n: int = 16, position: int = 0, count: int = 0) -> LatentView:
    if not 0 <= latent < data.num_latents:
        raise BrowserError(f"latent {latent} out of range [0, {data.num_latents}) for {data.label!r}")
    st = data.stats
    n = min(top_n, st.top_rows.shape[1])
    keep = st.top_rows[latent, :n] >= 0
    images = st.top_images[latent, :n][keep]
    fire_imgs, _ = data.firing_images(latent)
    return LatentView(
        hookpoint=data.label, latent=int(latent), position=position, count=count or data.num_latents,
        stats=data.table.iloc[latent].to_dict(), images=images, values=st.top_values[latent, :n][keep],
        labels=None if st.top_labels is None else st.top_labels[latent, :n][keep],
        label_counts=None if st.top_labels is None else _counts(st.top_labels[latent, :n][keep], len(data.class_names)),
        class_names=data.class_names, firing_points=data.points_of(fire_imgs), top_points=data.points_of(images),
        n_firing=int(len(fire_imgs)))


# ---------------------------------------------------------------------------------------------- rendering
def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 colours shared by the scatter and the bars (tab10, tab20 beyond 10 classes)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return (np.array([cmap(i % cmap.N)[:3] for i in range(n)]) * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def heat_lut() -> np.ndarray:
    """(256, 3) uint8 'inferno' colours."""
    global _LUT
    if _LUT is None:
        import matplotlib

        _LUT = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def _png(img, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def compose_image(data: HookpointData, image: int, latent: int | None = None, rank: int | None = None,
                  heatmap: bool = False):
    """PIL image of a dataset image as the model saw it, with the latent's activation map of that top image
    (``rank``) overlaid when ``heatmap`` (spatial SAEs; colour and opacity scale with the latent's largest value)."""
    from PIL import Image

    img = display_image(data.images[image], data.image_size)
    h = img.shape[0]
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    if heatmap and data.spatial and latent is not None and rank is not None:
        amap = np.asarray(data.stats.maps[latent, rank], dtype=np.float32)
        vmax = float(np.asarray(data.stats.maps[latent], dtype=np.float32).max())
        norm = np.clip(amap / vmax, 0, 1) if vmax > 0 else np.zeros_like(amap)
        rgba = np.concatenate([heat_lut()[(norm * 255).astype(np.uint8)],
                               np.where(norm > 0, 70 + 150 * norm, 0).astype(np.uint8)[..., None]], axis=-1)
        over = Image.fromarray(rgba, "RGBA").resize((h, h), Image.NEAREST)
        pil = Image.alpha_composite(pil.convert("RGBA"), over)
    return pil.convert("RGB")


class Renderer:
    """PNG bytes for one hookpoint: thumbnails (cached per image / per latent and rank) and the dataset scatter."""

    def __init__(self, data: HookpointData, thumb_px: int = 72, scatter_size: tuple[int, int] = (360, 300)):
        self.data = data
        self.thumb_px = thumb_px
        self._thumbs: dict[Any, bytes] = {}
        self._scatter_size = scatter_size
        self._base = None

    def _scale(self, h: int) -> int:
        return max(1, int(round(self.thumb_px / max(h, 1))))

    def thumbnail(self, image: int, latent: int | None = None, rank: int | None = None, heatmap: bool = False) -> bytes:
        heat = heatmap and self.data.spatial and latent is not None and rank is not None
        key = (image, latent, rank) if heat else image
        if key not in self._thumbs:
            img = compose_image(self.data, image, latent, rank, heat)
            self._thumbs[key] = _png(img.resize((img.width * self._scale(img.height),) * 2, 0))  # 0 = NEAREST
        return self._thumbs[key]

    def _base_scatter(self):
        """Pre-rendered scatter (RGB array) and the pixel position of every point."""
        if self._base is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            d = self.data
            w, h = self._scatter_size
            fig = Figure(figsize=(w / 100, h / 100), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
            cols = class_colors(len(d.class_names)) / 255.0
            lab = np.clip(d.point_labels, 0, len(cols) - 1) if len(cols) else np.zeros(len(d.points), int)
            if len(d.points):
                ax.scatter(d.points[:, 0], d.points[:, 1], s=7, c=cols[lab] if len(cols) else "gray", lw=0,
                           alpha=0.35)
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("#bbb")
            fig.canvas.draw()
            rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
            xy = ax.transData.transform(d.points) if len(d.points) else np.zeros((0, 2))
            xy[:, 1] = rgb.shape[0] - xy[:, 1]
            point_rgb = [tuple(int(c) for c in class_colors(max(len(d.class_names), 1))[i]) for i in lab]
            self._base = (rgb, xy, point_rgb)
        return self._base

    def scatter(self, view: LatentView) -> bytes:
        """The dataset view: faded points, the images where the latent fires in their class colour (dark edge),
        its top images ringed red."""
        from PIL import Image, ImageDraw

        rgb, xy, colors = self._base_scatter()
        im = Image.fromarray(rgb)
        draw = ImageDraw.Draw(im)
        for p in view.firing_points:
            x, y = xy[p]
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colors[p], outline=(40, 40, 40), width=1)
        for x, y in xy[view.top_points]:
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(220, 20, 20), width=2)
        return _png(im)


def bars_html(view: LatentView, max_rows: int = 12) -> str:
    """Class distribution of the top images as HTML bars (class colours as in the scatter)."""
    if view.label_counts is None or view.label_counts.sum() == 0:
        return "<div class='revelio-bars'><i>no labelled top images</i></div>"
    counts = np.asarray(view.label_counts)
    cols = class_colors(len(counts))
    order = np.arange(len(counts)) if len(counts) <= max_rows else np.argsort(-counts, kind="stable")[:max_rows]
    total, top = counts.sum(), max(counts.max(), 1)
    rows = []
    for c in order:
        name = view.class_names[c] if c < len(view.class_names) else str(c)
        r, g, b = cols[c]
        rows.append(f"<div style='display:flex;align-items:center;font-size:11px;line-height:14px'>"
                    f"<span style='width:70px;overflow:hidden'>{html.escape(name)}</span>"
                    f"<span style='display:inline-block;height:10px;width:{120 * counts[c] / top:.0f}px;"
                    f"background:rgb({r},{g},{b})'></span><span style='margin-left:4px'>{counts[c]}</span></div>")
    return (f"<div class='revelio-bars'><b style='font-size:12px'>classes of the top {int(total)} images</b>"
            + "".join(rows) + "</div>")


# ------------------------------------------------------------------------------------------------- widget
class LatentBrowser:
    """ipywidgets browser over the SAE latents of a run (see the module docstring). Display it as the cell's value.

    ``run_dir``: reads ``<run_dir>/sae/hookpoints.csv``; or pass ``hookpoints`` (a validated DataFrame). The index's
    folders must lie in the run folder, the cache folder or ``extra_roots`` (:func:`read_hookpoints`).
    ``hookpoint``: label or row number to start with (None: the first). Problems with the index or a hookpoint's
    tables are shown as a message in the widget (``.message``), never raised, except a bad ``hookpoint`` / ``sort``
    / ``embedding`` argument.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, *, hookpoints: pd.DataFrame | None = None,
                 hookpoint: str | int | None = None, top_n: int = 16, sort: str = "frequency",
                 hide_dead: bool = True, heatmap: bool = True, embedding: str = "pca", thumb_px: int = 64,
                 columns: int = 8, seed: int = 0, firing: bool = True, progress: bool = True,
                 extra_roots: Sequence[str | os.PathLike] = ()):
        W = require("ipywidgets")  # a kernel without it: one line naming the install command

        if sort not in SORTS:
            raise BrowserError(f"unknown sort {sort!r}; choices: {list(SORTS)}")
        if embedding not in EMBEDDINGS:
            raise BrowserError(f"unknown embedding {embedding!r}; choices: {list(EMBEDDINGS)}")
        if top_n < 1:
            raise BrowserError(f"top_n must be >= 1, got {top_n}")
        self.top_n, self.embedding, self.seed, self.thumb_px = int(top_n), embedding, seed, thumb_px
        self._firing, self._progress = firing, progress
        self._data: dict[str, HookpointData] = {}
        self._renderers: dict[str, Renderer] = {}
        self._errors: dict[str, str] = {}
        self._order = np.zeros(0, dtype=np.int64)
        self._quiet = False
        self.update_times_ms: list[float] = []
        self.view: LatentView | None = None

        index_error = ""
        self._roots = allowed_roots(run_dir, extra_roots) if run_dir is not None else None
        self.hookpoints = hookpoints
        if self.hookpoints is None:
            if run_dir is None:
                raise BrowserError("pass run_dir (a run folder holding sae/hookpoints.csv) or hookpoints")
            try:
                self.hookpoints = read_hookpoints(run_dir, extra_roots)
            except (FileNotFoundError, BrowserError) as e:
                self.hookpoints, index_error = None, str(e)
        labels = [] if self.hookpoints is None else list(self.hookpoints["hookpoint"])
        start = labels[0] if labels else None
        if hookpoint is not None and labels:
            if isinstance(hookpoint, (int, np.integer)) and not isinstance(hookpoint, bool):
                if not 0 <= hookpoint < len(labels):
                    raise BrowserError(f"hookpoint number {hookpoint} out of range; {len(labels)} hookpoints: {labels}")
                start = labels[int(hookpoint)]
            elif hookpoint in labels:
                start = hookpoint
            else:
                raise BrowserError(f"unknown hookpoint {hookpoint!r}; choices: {labels}")

        lay = W.Layout
        self.hookpoint_dd = W.Dropdown(options=labels, value=start, description="hookpoint",
                                       layout=lay(width="430px"), style={"description_width": "70px"})
        self.sort_dd = W.Dropdown(options=list(SORTS), value=sort, description="sort by",
                                  layout=lay(width="210px"), style={"description_width": "55px"})
        self.kind_dd = W.Dropdown(options=[ALL_KINDS], value=ALL_KINDS, description="kind",
                                  layout=lay(width="190px"), style={"description_width": "35px"})
        self.dead_cb = W.Checkbox(value=hide_dead, description="hide dead latents", indent=False,
                                  layout=lay(width="150px"))
        self.heatmap_cb = W.Checkbox(value=heatmap, description="heatmap overlay", indent=False,
                                     layout=lay(width="140px"))
        self.prev_btn = W.Button(description="◀ prev", layout=lay(width="75px"), tooltip="previous latent")
        self.next_btn = W.Button(description="next ▶", layout=lay(width="75px"), tooltip="next latent")
        self.slider = W.IntSlider(value=0, min=0, max=0, description="rank", continuous_update=True,
                                  layout=lay(width="480px"), style={"description_width": "40px"})
        self.latent_box = W.BoundedIntText(value=0, min=0, max=0, description="latent #",
                                           layout=lay(width="150px"), style={"description_width": "55px"})
        self.stats_html = W.HTML()
        self.message_html = W.HTML()
        self.slots = []
        for _ in range(self.top_n):
            img = W.Image(format="png", layout=lay(width=f"{thumb_px}px", height=f"{thumb_px}px"))
            cap = W.HTML(layout=lay(width=f"{thumb_px + 6}px"))
            cap.add_class("revelio-caption")
            box = W.VBox([img, cap], layout=lay(margin="1px", align_items="center"))
            self.slots.append((box, img, cap))
        self.grid = W.GridBox([s[0] for s in self.slots], layout=lay(
            grid_template_columns=f"repeat({min(columns, self.top_n)}, {thumb_px + 8}px)", flex="0 0 auto",
            align_content="flex-start", margin="0 12px 0 0"))
        self.bars_html = W.HTML()
        self.scatter_img = W.Image(format="png")
        self.scatter_caption = W.HTML()
        self.content = W.HBox([self.grid, W.VBox([self.bars_html, self.scatter_img, self.scatter_caption],
                                                 layout=lay(min_width="370px"))], layout=lay(flex_flow="row wrap"))
        controls = W.VBox([
            W.HBox([self.hookpoint_dd, self.sort_dd, self.kind_dd, self.dead_cb, self.heatmap_cb]),
            W.HBox([self.prev_btn, self.slider, self.next_btn, self.latent_box]),
        ])
        self.ui = W.VBox([controls, self.message_html, self.stats_html, self.content])
        for wdg, cls in [(self.ui, "revelio-browser"), (self.slider, "revelio-slider"),
                         (self.stats_html, "revelio-stats"), (self.grid, "revelio-grid"),
                         (self.prev_btn, "revelio-prev"), (self.next_btn, "revelio-next"),
                         (self.message_html, "revelio-message"), (self.scatter_img, "revelio-scatter"),
                         (self.hookpoint_dd, "revelio-hookpoint"), (self.sort_dd, "revelio-sort"),
                         (self.kind_dd, "revelio-kind")]:
            wdg.add_class(cls)

        self.hookpoint_dd.observe(lambda ch: self._on_hookpoint(), names="value")
        self.sort_dd.observe(lambda ch: self._on_order(), names="value")
        self.kind_dd.observe(lambda ch: self._on_order(), names="value")
        self.dead_cb.observe(lambda ch: self._on_order(), names="value")
        self.heatmap_cb.observe(lambda ch: self._render(), names="value")
        self.slider.observe(lambda ch: None if self._quiet else self._render(), names="value")
        self.latent_box.observe(lambda ch: None if self._quiet else self.show_latent(ch["new"]), names="value")
        self.prev_btn.on_click(lambda _: self.step(-1))
        self.next_btn.on_click(lambda _: self.step(+1))

        if index_error:
            self._fail(index_error)
        else:
            self._on_hookpoint()

    # ------------------------------------------------------------------ public state
    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a static HTML snapshot of the current latent for viewers without a kernel."""
        bundle = self.ui._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = self.snapshot_html()
        return bundle

    def __repr__(self) -> str:
        if self.view is None:
            return f"LatentBrowser({self.message or 'nothing to show'})"
        return f"LatentBrowser({self.view.hookpoint!r}, latent {self.view.latent}, {len(self._order)} latents in order)"

    def snapshot_html(self) -> str:
        """Static HTML of what the browser shows now (stats line and top images as inline PNGs)."""
        if self.view is None:
            return f"<div><b>Latent browser</b>: {html.escape(self.message or 'nothing to show')}</div>"
        import base64

        v, r = self.view, self._renderers[self.view.hookpoint]
        heat = self.heatmap_cb.value and self.data.spatial
        imgs = "".join(
            f"<img title='{v.values[k]:.3g}' style='margin:1px;width:{self.thumb_px}px;image-rendering:pixelated' "
            f"src='data:image/png;base64,{base64.b64encode(r.thumbnail(int(i), v.latent, k, heat)).decode()}'>"
            for k, i in enumerate(v.images))
        return (f"<div><b>Latent browser</b> (static snapshot; run the notebook for the interactive widget, or open "
                f"browser/latents.html): {html.escape(v.hookpoint)}<br><span style='font-size:12px'>"
                f"{html.escape(v.stats_text())}</span><br>{imgs}</div>")

    @property
    def message(self) -> str:
        """The plain text of the message line ('' when all is well)."""
        return re.sub(r"<[^>]+>", "", html.unescape(self.message_html.value)).strip()

    @property
    def order(self) -> np.ndarray:
        """Latent ids in the current sort / filter order (what the slider walks through)."""
        return self._order.copy()

    @property
    def latent(self) -> int | None:
        return None if self.view is None else self.view.latent

    @property
    def data(self) -> HookpointData | None:
        return self._data.get(self.hookpoint_dd.value)

    @property
    def shown_images(self) -> list[int]:
        """Dataset indices of the images in the grid, in order."""
        return [] if self.view is None else [int(i) for i in self.view.images]

    @property
    def stats_text(self) -> str:
        return re.sub(r"<[^>]+>", "", html.unescape(self.stats_html.value)).strip()

    @property
    def last_update_ms(self) -> float | None:
        return self.update_times_ms[-1] if self.update_times_ms else None

    def step(self, delta: int) -> None:
        """Move the slider by ``delta`` latents (clamped)."""
        if len(self._order):
            self.slider.value = int(np.clip(self.slider.value + delta, 0, len(self._order) - 1))

    def show_latent(self, latent: int) -> None:
        """Jump to a latent id; a hidden (dead) one un-hides dead latents first."""
        d = self.data
        if d is None or not 0 <= latent < d.num_latents:
            return
        pos = np.nonzero(self._order == latent)[0]
        if not len(pos) and self.dead_cb.value:
            self._quiet = True
            self.dead_cb.value = False
            self._quiet = False
            self._reorder(keep=latent)
            pos = np.nonzero(self._order == latent)[0]
        if len(pos):
            if self.slider.value == int(pos[0]):
                self._render()
            else:
                self.slider.value = int(pos[0])

    # ------------------------------------------------------------------ events
    def _fail(self, text: str) -> None:
        self.view = None
        self.message_html.value = (f"<div style='color:#a00;border:1px solid #e99;padding:6px;background:#fff4f4'>"
                                   f"{html.escape(text)}</div>")
        self.stats_html.value = ""
        self.content.layout.display = "none"
        for w in (self.slider, self.prev_btn, self.next_btn, self.latent_box, self.sort_dd, self.kind_dd, self.dead_cb,
                  self.heatmap_cb):
            w.disabled = True

    def _ok(self) -> None:
        self.content.layout.display = None
        for w in (self.slider, self.prev_btn, self.next_btn, self.latent_box, self.sort_dd, self.dead_cb):
            w.disabled = False

    def _on_hookpoint(self) -> None:
        label = self.hookpoint_dd.value
        if label is None:
            self._fail("no hookpoints to browse")
            return
        if label not in self._data and label not in self._errors:
            row = self.hookpoints.set_index("hookpoint").loc[label].to_dict()
            row["hookpoint"] = label
            try:
                self._data[label] = load_hookpoint(row, self.embedding, self.seed, firing=self._firing,
                                                   progress=self._progress, roots=self._roots)
                self._renderers[label] = Renderer(self._data[label], self.thumb_px)
            except (FileNotFoundError, BrowserError, ValueError, KeyError, OSError) as e:
                self._errors[label] = f"cannot show hookpoint {label!r}: {e}"
        if label in self._errors:
            self._fail(self._errors[label])
            return
        d = self._data[label]
        self._ok()
        sorts = available_sorts(d.table)
        self._quiet = True
        self.sort_dd.options = sorts
        if self.sort_dd.value not in sorts:
            self.sort_dd.value = "frequency" if "frequency" in sorts else sorts[0]
        kinds = kind_choices(d.table)
        self.kind_dd.options = kinds
        if self.kind_dd.value not in kinds:
            self.kind_dd.value = ALL_KINDS
        self.kind_dd.disabled = len(kinds) == 1
        self.heatmap_cb.disabled = not d.spatial
        self.latent_box.max = d.num_latents - 1
        self._quiet = False
        self._reorder(keep=None)
        self._render()

    def _on_order(self) -> None:
        if self._quiet or self.data is None:
            return
        self._reorder(keep=self.latent)
        self._render()

    def _reorder(self, keep: int | None) -> None:
        d = self.data
        self._order = sort_latents(d.table, self.sort_dd.value, self.dead_cb.value, self.kind_dd.value)
        pos = np.nonzero(self._order == keep)[0] if keep is not None else []
        self._quiet = True
        self.slider.max = max(len(self._order) - 1, 0)
        self.slider.value = int(pos[0]) if len(pos) else 0
        self._quiet = False

    def _render(self) -> None:
        if self._quiet:
            return
        t0 = time.perf_counter()
        d = self.data
        if d is None:
            return
        if not len(self._order):
            n_dead = int(d.table["dead"].sum())
            self.view = None
            why = (f"no {self.kind_dd.value} latents (kind filter)" if self.kind_dd.value != ALL_KINDS else
                   f"all {n_dead} of {d.num_latents} latents are dead; untick 'hide dead latents'")
            self.message_html.value = (f"<div style='color:#a60'>no latents to show for {html.escape(d.label)}: "
                                       f"{html.escape(why)}</div>")
            self.stats_html.value = ""
            self.content.layout.display = "none"
            return
        self.content.layout.display = None
        pos = int(self.slider.value)
        latent = int(self._order[pos])
        v = self.view = latent_view(d, latent, self.top_n, position=pos, count=len(self._order))
        r = self._renderers[d.label]
        heat = self.heatmap_cb.value and d.spatial
        notes = "; ".join(d.notes)
        self.message_html.value = f"<div style='color:#666;font-size:11px'>{html.escape(notes)}</div>" if notes else ""
        self.stats_html.value = f"<div style='font-size:13px;line-height:18px'>{html.escape(v.stats_text())}</div>"
        self._quiet = True
        self.latent_box.value = latent
        self._quiet = False
        for rank, (box, img, cap) in enumerate(self.slots):
            if rank < len(v.images):
                img.value = r.thumbnail(int(v.images[rank]), latent, rank, heat)
                name = v.class_names[int(v.labels[rank])] if v.labels is not None and v.labels[rank] >= 0 else ""
                cap.value = (f"<div style='font-size:10px;text-align:center;line-height:11px'>{v.values[rank]:.3g}"
                             f"<br>{html.escape(name)}</div>")
                box.layout.visibility = "visible"
            else:
                box.layout.visibility = "hidden"
        self.bars_html.value = bars_html(v)
        self.scatter_img.value = r.scatter(v)
        self.scatter_caption.value = (
            f"<div style='font-size:11px;line-height:14px;color:#444;width:360px'>{self.embedding.upper()} of "
            f"pooled {html.escape(str(d.row['block']))} features (t={d.row['t']}, {len(d.points)} images of "
            f"{html.escape(str(d.row['split']))}); solid: the {v.n_firing} images where latent #{latent} fires"
            f"{'' if d.firing is not None else ' (top images only)'}; red rings: its top {len(v.images)}</div>")
        self.update_times_ms.append((time.perf_counter() - t0) * 1000)


def browse(run_dir: str | os.PathLike, **kwargs) -> LatentBrowser:
    """``LatentBrowser(run_dir, **kwargs)``."""
    return LatentBrowser(run_dir, **kwargs)


# ------------------------------------------------------------------------------------------------ demo run
def _tiny_unet(folder: Path, seed: int) -> Path:
    """A small random-weight pixel UNet as a diffusers folder (fast features for demos and tests)."""
    import json

    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    if (folder / "unet" / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    return folder


def _demo_taxonomy(sae, arr, store, dataset: str, folder: Path) -> str:
    """The demo SAE's latent taxonomy (:mod:`revelio_nb.taxonomy`), computed once; the path of its table."""
    from .data import load_dataset
    from .taxonomy import TABLE_FILE, Taxonomy, TaxonomyConfig, attribute_table, sae_taxonomy

    try:
        Taxonomy.load(folder)
    except FileNotFoundError:
        values = attribute_table(load_dataset(dataset), store.indices)
        sae_taxonomy(sae, arr, store.labels, values, store.class_names, TaxonomyConfig(n_shuffles=3)).save(folder)
    return str(folder / TABLE_FILE)


def demo_run(run_dir: str | os.PathLike, *, dataset: str = "animal-mnist", split: str = "test",
             max_images: int = 300, blocks: Sequence[str] = ("mid_block", "up_blocks.0"), t: int = 25,
             spatial_block: str | None = "mid_block", expansion: int = 4, k: int = 4, sae_steps: int = 150,
             top_n: int = 16, seed: int = 0, progress: bool = False) -> Path:
    """A small but real run folder for the browser: random-weight tiny UNet -> feature stores -> k-SAEs -> stats.

    Writes ``<run_dir>/sae/hookpoints.csv`` with one pooled SAE per block and (``spatial_block``) one spatial SAE,
    exactly as notebook 02 does. Takes a few seconds; used by the tests, the benchmark and as a demo.
    """
    import torch

    from .features import ExtractionConfig, extract_features
    from .latents import latent_stats, load_or_compute
    from .sae import SaeConfig, TrainConfig, train_sae

    import json

    run_dir = Path(run_dir).resolve()
    work = run_dir / "demo"
    params = {k: v for k, v in locals().items() if k in ("dataset", "split", "max_images", "t", "spatial_block",
                                                          "expansion", "k", "sae_steps", "top_n", "seed")}
    params["blocks"] = list(blocks)
    params["taxonomy"] = 1  # runs written before latent kinds existed are rebuilt
    done = work / "demo.json"
    if done.is_file() and hookpoints_path(run_dir).is_file() and json.loads(done.read_text()) == params:
        return run_dir
    model_dir = _tiny_unet(work / "model", seed)

    def store(pooling, bl):
        cfg = ExtractionConfig(model=str(model_dir), dataset=dataset, split=split, blocks=list(bl), timesteps=[t],
                               pooling=pooling, max_images=max_images, seed=seed, device="cpu")
        return extract_features(cfg, out_dir=work / f"features-{pooling}", progress=progress)

    pooled = store("mean", blocks)
    jobs = [(b, "mean", pooled) for b in blocks]
    if spatial_block:
        jobs.append((spatial_block, "none", store("none", [spatial_block])))
    rows = []
    for block, pooling, st in jobs:
        name = f"{slugify(block)}-t{t}-{'pooled' if pooling == 'mean' else 'spatial'}"
        arr = st.array(block, t)
        cfg = TrainConfig(sae=SaeConfig(expansion_factor=expansion, k=k, hookpoint=block, timestep=t,
                                        model_id="demo-tiny-unet"),
                          batch_size=1024, steps=sae_steps, warmup_steps=10, seed=seed, checkpoint_every=10_000,
                          device="cpu")
        torch.manual_seed(seed)
        sae = train_sae(arr, cfg, run_dir / "sae" / name / "sae", progress=progress)
        lat_dir = run_dir / "sae" / name / "latents"
        load_or_compute(lat_dir, lambda: latent_stats(sae, arr, st.labels, top_n=top_n, image_index=st.indices,
                                                      class_names=st.class_names, progress=progress))
        rows.append({"hookpoint": f"demo-tiny-unet · {block} · t={t}" + (" · spatial" if pooling == "none" else ""),
                     "model": "demo-tiny-unet", "block": block, "t": t, "pooling": pooling,
                     "sae_dir": str(run_dir / "sae" / name / "sae"), "latents_dir": str(lat_dir),
                     "store_dir": str(st.path), "dataset": dataset, "split": split,
                     "embedding_store_dir": "" if pooling == "mean" else str(pooled.path),
                     "taxonomy_path": _demo_taxonomy(sae, arr, st, dataset, lat_dir / "taxonomy")})
    (run_dir / "sae").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(hookpoints_path(run_dir), index=False)
    done.write_text(json.dumps(params))
    return run_dir
