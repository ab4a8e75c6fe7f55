"""One hookpoint's data for the browser: its latent table (kinds, sort orders, filters) and :func:`load_hookpoint`.

:class:`HookpointData` holds everything the widget and the static page show for one hookpoint, loaded once (arrays
only; no model): the latent statistics with their per-latent firing lists (:mod:`revelio_nb.latents`), the
dataset's images, and the 2-D dataset view (:mod:`.embedding`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from ..run_index import check_row_paths
from .embedding import embedding_points, open_store
from .errors import BrowserError

if TYPE_CHECKING:  # pragma: no cover - types only
    from ..latent_store import FiringLists

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
    from ..taxonomy import KINDS, Taxonomy

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
    from ..taxonomy import KINDS

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
        from ..taxonomy import KINDS

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
    firing: "FiringLists | None" = None
    """Every image where each latent fires, best first (the latent statistics' firing lists); None: not used."""
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
            return self.firing.of(latent)
        keep = self.stats.top_rows[latent] >= 0
        return self.stats.top_images[latent, keep], self.stats.top_values[latent, keep]


_DATASETS: dict[str, Any] = {}


def _dataset(name: str):
    from ..data import load_dataset

    if name not in _DATASETS:
        _DATASETS[name] = load_dataset(name)
    return _DATASETS[name]


def load_hookpoint(row: dict | pd.Series, embedding: str = "pca", seed: int = 0, firing: bool = True,
                   progress: bool = False, roots: Sequence[Path] | None = None) -> HookpointData:
    """Load one hookpoint's statistics (with their firing lists), dataset images and 2-D embedding (cached after
    the first time). ``firing=False``: the dataset view rings the top images only.

    ``roots``: when given (see :func:`revelio_nb.run_index.allowed_roots`), the row's folders must lie inside
    them (:meth:`revelio_nb.run_index.HookpointIndex.read` already checks the rows it returns). The row's
    ``dataset`` must be the one its store was extracted from.
    """
    from ..latent_store import LatentStats, LatentStatsError

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
    store = open_store(row["store_dir"])
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
    fire = stats.firing if firing else None
    if firing and fire is None:
        notes.append("no firing lists in the latent statistics; the dataset view rings the top images only")
    return HookpointData(label=label, row=row, stats=stats, table=table, images=ds.images, class_names=names,
                         image_size=store.manifest.get("image_size"), points=emb["points"],
                         point_indices=emb["indices"], point_labels=labels_of[emb["indices"]], firing=fire,
                         notes=notes)

