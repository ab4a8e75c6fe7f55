"""The run's hookpoint index, ``<run_dir>/sae/hookpoints.csv``: one row per trained k-SAE, one class reads and writes it.

:class:`HookpointIndex` owns the file's place, its column list, the locked and atomic merge-write used by notebook
02 (:func:`revelio_nb.hookpoint_saes.train_hookpoints` rows) and the validated read used by the latent browser
(:mod:`revelio_nb.browse`), with its path confinement: every folder a row names must resolve, after symlinks,
inside the run folder, the cache folder or an explicitly allowed extra folder, so a crafted index cannot make the
browser read or write elsewhere.

Columns: ``REQUIRED_COLUMNS`` (hookpoint, model, block, t, pooling, sae_dir, latents_dir, store_dir, dataset,
split), ``OPTIONAL_COLUMNS`` (embedding_store_dir, taxonomy_path); rows written by notebook 02 also carry their
metrics (fvu, l0, dead_fraction, mean_purity, num_latents, k, n_eval_tokens, the kind counts n_<kind>). ``pooling``
is the store's (:mod:`revelio_nb.pooling`): ``"mean"`` or ``"map"``; an index of an earlier version with ``"none"``
reads as ``"map"``.

    from revelio_nb.run_index import HookpointIndex
    index = HookpointIndex(run_dir)
    index.write(rows)          # merge (same hookpoint label: replaced), under a file lock, atomically
    table = index.read()       # validated, paths absolute and confined
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .paths import atomic_path, cache_dir, file_lock, results_dir
from .pooling import STORE_POOLINGS, read_pooling


class RunIndexError(ValueError):
    """A malformed hookpoint index, or a row whose folders lie outside the allowed ones (the message names the
    file, rows, columns and values)."""


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def _resolve(value: Any, bases: Sequence[Path]) -> str:
    """Absolute path of a path cell, symlinks resolved: relative ones are tried against each base (first existing
    wins)."""
    if _blank(value):
        return ""
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return str(p.resolve())
    for base in bases:
        if (base / p).exists():
            return str((base / p).resolve())
    return str((bases[0] / p).resolve())


def allowed_roots(run_dir: str | os.PathLike | None, extra_roots: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Folders a run index may point into: the run folder, the cache folder (:func:`revelio_nb.paths.cache_dir`)
    and any ``extra_roots`` (all with symlinks resolved)."""
    roots = ([Path(run_dir).resolve()] if run_dir is not None else []) + [cache_dir().resolve()]
    return roots + [Path(r).expanduser().resolve() for r in extra_roots]


def _inside(path: str | os.PathLike, roots: Sequence[Path]) -> bool:
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in roots)


def check_row_paths(row: dict, roots: Sequence[Path], where: str = "", raw: dict | None = None) -> None:
    """:class:`RunIndexError` unless every path column of ``row`` resolves (after symlinks) inside ``roots``
    (``raw``: the cells as written, for the message)."""
    for col in HookpointIndex.PATH_COLUMNS:
        value = row.get(col)
        if _blank(value):
            continue
        if not _inside(str(value), roots):
            shown = (raw or row).get(col, value)
            raise RunIndexError(
                f"{where}hookpoint {str(row.get('hookpoint'))!r}: column {col!r} = {str(shown)!r} resolves to "
                f"{Path(str(value)).resolve()}, outside the folders the browser may use: {[str(r) for r in roots]} "
                f"(the run folder and the cache folder; pass extra_roots=[...] to allow another folder)")


class HookpointIndex:
    """``<run_dir>/sae/hookpoints.csv``: where it is, its columns, how it is written and read.

    ``extra_roots``: folders besides the run and cache folders that the rows' paths may point into (reading only).
    """

    FILE = Path("sae") / "hookpoints.csv"
    REQUIRED_COLUMNS = ("hookpoint", "model", "block", "t", "pooling", "sae_dir", "latents_dir", "store_dir",
                        "dataset", "split")
    OPTIONAL_COLUMNS = ("embedding_store_dir", "taxonomy_path")
    COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    """The index's columns (rows may add metric columns after them)."""
    PATH_COLUMNS = ("sae_dir", "latents_dir", "store_dir", "embedding_store_dir", "taxonomy_path")

    def __init__(self, run_dir: str | os.PathLike, extra_roots: Sequence[str | os.PathLike] = ()):
        self.run_dir = Path(run_dir)
        self.extra_roots = list(extra_roots)

    @property
    def path(self) -> Path:
        return self.run_dir / self.FILE

    @property
    def roots(self) -> list[Path]:
        """The folders rows may point into (:func:`allowed_roots`)."""
        return allowed_roots(self.run_dir, self.extra_roots)

    def exists(self) -> bool:
        return self.path.is_file()

    def write(self, rows: list[dict]) -> pd.DataFrame:
        """Merge rows into the index (same hookpoint label: replaced; keys starting with ``_`` dropped) and return
        the table.

        Safe with concurrent writers: the read-modify-write holds an exclusive file lock, and the file is replaced
        atomically (readers never see half of it).
        """
        path = results_dir(self.run_dir) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        new = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
        with file_lock(path):
            if path.is_file():
                old = pd.read_csv(path)
                if "pooling" in old.columns:  # rows of an earlier version: "none" is now "map"
                    old["pooling"] = [read_pooling(v) for v in old["pooling"]]
                new = pd.concat([old[~old.hookpoint.isin(new.hookpoint)], new], ignore_index=True)
            with atomic_path(path) as tmp:
                new.to_csv(tmp, index=False)
        return new

    def read(self) -> pd.DataFrame:
        """The validated index: one row per SAE, paths made absolute.

        Relative paths are taken relative to the CSV's folder, else to the run folder. Every path column must
        resolve, after symlinks, inside :attr:`roots`. Raises ``FileNotFoundError`` when the file is missing and
        :class:`RunIndexError` (naming the bad rows / columns / values) when it is malformed.
        """
        path, req = self.path, list(self.REQUIRED_COLUMNS)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE hookpoint index at {path}: run notebook 02 (train SAEs) on this run "
                                    f"first, or pass the run_dir that holds sae/hookpoints.csv")
        try:
            table = pd.read_csv(path, dtype={"hookpoint": str, "model": str, "block": str, "pooling": str})
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise RunIndexError(f"{path} is not a readable CSV: {e}") from e
        missing = [c for c in req if c not in table.columns]
        if missing:
            raise RunIndexError(f"{path} lacks the columns {missing}; required: {req} "
                                f"(optional: {list(self.OPTIONAL_COLUMNS)}); found: {list(table.columns)}")
        if table.empty:
            raise RunIndexError(f"{path} lists no hookpoints (header only): notebook 02 trained no SAE")
        blank = table[req].isna() | (table[req].astype(str) == "")
        if blank.to_numpy().any():
            rows, cols = np.nonzero(blank.to_numpy())
            bad = sorted({(int(r), req[c]) for r, c in zip(rows, cols)})
            raise RunIndexError(f"{path}: empty cells (row, column): {bad[:10]}")
        table["pooling"] = [read_pooling(v, STORE_POOLINGS, f"{path}: row {i}, column pooling", RunIndexError)
                            for i, v in enumerate(table["pooling"])]  # an earlier version's "none" is "map"
        try:
            table["t"] = table["t"].astype(int)
        except (ValueError, TypeError) as e:
            raise RunIndexError(f"{path}: column t must hold integer timesteps, got {table['t'].tolist()}") from e
        dup = table["hookpoint"][table["hookpoint"].duplicated()].tolist()
        if dup:
            raise RunIndexError(f"{path}: hookpoint labels must be unique; repeated: {dup}")
        for col in self.OPTIONAL_COLUMNS:
            if col not in table.columns:
                table[col] = ""
        bases = [path.parent.resolve(), self.run_dir.resolve()]
        raw = table[list(self.PATH_COLUMNS)].to_dict("records")
        for col in self.PATH_COLUMNS:
            table[col] = [_resolve(v, bases) for v in table[col]]
        roots = self.roots
        for i, row in enumerate(table.to_dict("records")):
            check_row_paths(row, roots, where=f"{path}: row {i}, ", raw=raw[i])
        return table.reset_index(drop=True)
