"""Kinds, the taxonomy config and result: what every other module of the taxonomy shares."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import attributes as attrs_mod
from ..paths import atomic_write_json, atomic_write_text

KINDS = ("class", "mixed", "attribute", "unexplained", "dead")
KIND_COLORS = {"class": "#4c72b0", "mixed": "#8172b3", "attribute": "#dd8452", "unexplained": "#c8c8c8",
               "dead": "#404040"}
TABLE_FILE, META_FILE, NULL_FILE = "taxonomy.csv", "meta.json", "null.csv"


class TaxonomyError(ValueError):
    """Bad inputs or settings of the taxonomy (the message names the value and the valid choices)."""


@dataclass
class TaxonomyConfig:
    """How latents are scored and classified (see the module docstring for the rule)."""

    attributes: list[str] | None = None
    """Attribute names (:data:`revelio_nb.attributes.ATTRIBUTES`); None = all. Undefined ones are skipped."""
    max_attribute_rho: float = 0.9
    """Of two attributes correlated beyond this on the images (|Spearman|), keep the first (registry order)."""
    min_class_auroc: float = 0.75
    """Effect floor of a class-specific latent (best one-vs-rest AUROC). About the 90th-95th percentile of the
    latents of a random-init model's SAEs on the embedded default (notebook 07 re-measures it every run)."""
    min_attribute_rho: float = 0.3
    """Effect floor of an attribute-specific latent (|within-class Spearman rho|). About the 90th percentile of
    the latents of a random-init model's SAEs on the embedded default (mid and up blocks, t = 25): pixels and a
    random architecture already order silhouettes by shape or size, so a lower floor would call that learned."""
    null_quantile: float = 0.99
    n_shuffles: int = 10
    seed: int = 0

    def validate(self) -> "TaxonomyConfig":
        if self.attributes is not None:
            self.attributes = attrs_mod.check_names(self.attributes)
        if not 0.5 <= self.min_class_auroc <= 1:
            raise TaxonomyError(f"min_class_auroc must be in [0.5, 1], got {self.min_class_auroc}")
        if not 0 <= self.min_attribute_rho <= 1:
            raise TaxonomyError(f"min_attribute_rho must be in [0, 1], got {self.min_attribute_rho}")
        if not 0 < self.null_quantile < 1:
            raise TaxonomyError(f"null_quantile must be in (0, 1), got {self.null_quantile}")
        if self.n_shuffles < 1:
            raise TaxonomyError(f"n_shuffles must be >= 1, got {self.n_shuffles}")
        return self


@dataclass
class Taxonomy:
    """One row per latent (``table``) and how it was made (``meta``: thresholds, nulls, attributes used)."""

    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    null: pd.DataFrame | None = None
    """The shuffled null's best scores per (shuffle, live latent) (:func:`null_scores`)."""

    def counts(self) -> pd.Series:
        return self.table["kind"].value_counts().reindex(list(KINDS), fill_value=0)

    def fractions(self) -> pd.Series:
        return self.counts() / max(len(self.table), 1)

    def save(self, folder: str | os.PathLike) -> Path:
        """``taxonomy.csv``, ``null.csv``, then ``meta.json`` (each atomic; meta.json is the commit marker)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TABLE_FILE, self.table.to_csv(index=False))
        if self.null is not None:
            atomic_write_text(folder / NULL_FILE, self.null.to_csv(index=False))
        atomic_write_json(folder / META_FILE, self.meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Taxonomy":
        folder = Path(folder)
        if folder.name == TABLE_FILE:
            folder = folder.parent
        if not (folder / META_FILE).is_file() or not (folder / TABLE_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no finished taxonomy ({TABLE_FILE} + {META_FILE})")
        table = pd.read_csv(folder / TABLE_FILE, keep_default_na=False, na_values=[""])
        for c in ("label", "best_class", "best_attribute", "attribute_group"):
            if c in table:
                table[c] = table[c].fillna("").astype(str)
        null = pd.read_csv(folder / NULL_FILE) if (folder / NULL_FILE).is_file() else None
        return cls(table, json.loads((folder / META_FILE).read_text()), null)
