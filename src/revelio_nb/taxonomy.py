"""Automatic latent taxonomy: what kind of thing each SAE latent tracks, measured on held-out images.

For every latent of a k-SAE, from its **sparse code** (post-TopK image scores, :class:`latents.ImageScores`: the
activation for pooled SAEs, the maximum over positions for spatial ones; 0 where it does not fire) on the
held-out split:

* **class selectivity**: the one-vs-rest AUROC of its image score for each class; ``class_auroc`` is the best.
* **attribute selectivity**: for each attribute of :mod:`revelio_nb.attributes` measured on the same images, the
  Spearman rank correlation of image score and attribute **within classes** (ranks taken inside each class, scaled
  by the class size and pooled), so an attribute that merely differs between classes (elephants are large) does not
  make a class latent look like a size latent; ``attribute_rho`` is the signed value of the largest ``|rho|``. The
  plain (across-class) Spearman rho of the same attribute is reported beside it (``attribute_rho_raw``).
  Attributes undefined on the images are skipped, and of two attributes with ``|rho| > max_attribute_rho`` on the
  images the first in the registry's order is kept (on Animal-MNIST a silhouette's brightness is its size).

**The rule.** A latent that never fires on the held-out split is **dead**. A live latent is

* **class-specific** when ``class_auroc >= tau_class`` and ``|attribute_rho| < tau_attr``,
* **attribute-specific** when ``|attribute_rho| >= tau_attr`` and ``class_auroc < tau_class`` (``label`` = the
  attribute, its sign in ``attribute_rho``),
* **mixed** when both hold (a class latent that also orders the images of its classes by an attribute),
* **unexplained** when neither does.

**Thresholds** are calibrated against a null: the same scores recomputed after shuffling the class labels across
images (class null) and the attribute values within classes (attribute null), ``n_shuffles`` times; each
threshold is the ``null_quantile`` quantile of the null's best score over live latents and shuffles, and an effect
size must also be met (``min_class_auroc``, ``min_attribute_rho``: set near the 90th percentile of a random-init
model's SAE latents, the second null below, so that a kind means more than what architecture and pixels give).
For classes the null is taken on the AUROC's z-score (:func:`auroc_z`: a sparse latent's AUROC varies less by
chance than a dense one's), so a class-specific latent has ``class_auroc >= min_class_auroc`` *and* ``class_z``
beyond 99 % of what chance gives any latent.
The rule above reads "``class_auroc >= tau_class``" as both conditions. The second null, the same
taxonomy for the SAE of a random-init model of the same architecture (:func:`revelio_nb.probes.random_init_model`),
tells what the architecture alone gives (notebook 07).

**Stability**: :func:`match_latents` pairs the latents of two SAEs (another seed) by decoder cosine (Hungarian
matching) and :func:`stability` reports the fraction of live latents that keep their kind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import artifacts
from . import attributes as attrs_mod
from .latents import ImageScores, _segment_positions, auroc_from_entries
from .paths import atomic_write_json, atomic_write_text

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


# ------------------------------------------------------------------------------------------------- scores
def class_auroc(scores: ImageScores, labels: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """[M, C] one-vs-rest AUROC of every latent's image score for every class (exact, ties averaged)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != scores.n_images:
        raise TaxonomyError(f"{len(labels)} labels for {scores.n_images} images")
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    return auroc_from_entries(scores.latent_ids(), scores.values, labels[scores.images], labels,
                              scores.num_latents, n_classes)


def auroc_z(scores: ImageScores, labels: np.ndarray, auc: np.ndarray) -> np.ndarray:
    """[M, C] z-scores of one-vs-rest AUROCs under the permutation null (labels shuffled across images).

    The exact permutation variance of the Mann-Whitney statistic with ties, Var(AUC) = [(N + 1) - sum(t^3 - t) /
    (N (N - 1))] / (12 n1 n0), counting the tie of the N - f images where a latent does not fire (ties among its
    f firing scores are ignored, which only makes the z smaller). A sparse latent's AUROC varies less by chance
    than a dense one's, so significance is judged on z, effect size on the AUROC itself.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = float(len(labels))
    n1 = np.bincount(labels, minlength=auc.shape[1]).astype(np.float64)[None, :]
    n0 = n - n1
    t0 = (n - scores.counts.astype(np.float64))[:, None]
    var = ((n + 1) - (t0 ** 3 - t0) / max(n * (n - 1), 1)) / np.maximum(12 * n1 * n0, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (auc - 0.5) / np.sqrt(var)
    return np.where(var > 0, z, np.nan)


def centered_ranks(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """[N, J] within-group ranks (ties averaged) of each column, centred and divided by the group size; NaN -> 0
    (an image where an attribute is undefined sits at its group's middle and adds nothing to a correlation)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    from scipy.stats import rankdata

    g = np.zeros(len(v), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    out = np.zeros_like(v)
    for grp in np.unique(g):
        sel = np.flatnonzero(g == grp)
        for j in range(v.shape[1]):
            col = v[sel, j]
            ok = np.isfinite(col)
            if ok.sum() > 1:
                out[sel[ok], j] = (rankdata(col[ok]) - (ok.sum() + 1) / 2) / len(sel)
    return out


def rank_correlation(scores: ImageScores, values: np.ndarray | pd.DataFrame, groups: np.ndarray | None = None,
                     ranked: np.ndarray | None = None) -> np.ndarray:
    """[M, J] Spearman rho of every latent's image score with every column of ``values`` ([N, J]).

    With ``groups`` (e.g. class labels) the ranks are taken within each group and the correlation pooled: the
    association *inside* groups, not between them. Works on the sparse code: every non-firing image is a tie at 0,
    so only the firing entries are touched (exact, ties averaged). ``ranked``: precomputed
    :func:`centered_ranks` of ``values`` (for repeated calls). Latents that never fire (or an attribute constant
    within every group) give NaN.
    """
    n = scores.n_images
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    if len(g) != n:
        raise TaxonomyError(f"{len(g)} group labels for {n} images")
    v = centered_ranks(np.asarray(values, dtype=np.float64), g) if ranked is None else ranked
    if len(v) != n:
        raise TaxonomyError(f"attribute values have {len(v)} rows for {n} images")
    n_groups = int(g.max()) + 1 if n else 1
    m = scores.num_latents
    n_g = np.bincount(g, minlength=n_groups).astype(np.float64)
    lat, img, val = scores.latent_ids(), scores.images, scores.values
    key = lat * n_groups + g[img]
    order = np.lexsort((val, key))
    key_s, val_s, img_s, lat_s = key[order], val[order], img[order], lat[order]
    pos = _segment_positions(key_s).astype(np.float64)
    if len(key_s):  # average positions over ties (same latent, group and score)
        tie = np.r_[True, (key_s[1:] != key_s[:-1]) | (val_s[1:] != val_s[:-1])]
        run = np.cumsum(tie) - 1
        pos = (np.bincount(run, weights=pos) / np.bincount(run))[run]
    f = np.bincount(key, minlength=m * n_groups).astype(np.float64)
    ng_e = n_g[key_s % n_groups]
    f_e = f[key_s]
    u = (ng_e - f_e + pos + 1 - (ng_e + 1) / 2) / ng_e  # rank = zeros below + position among firing
    u0 = -f_e / (2 * ng_e)  # the centred rank of the tied zeros of the same (latent, group)
    from scipy.sparse import csr_matrix

    w = csr_matrix((u - u0, (lat_s, img_s)), shape=(m, n))
    num = np.asarray(w @ v)
    F = f.reshape(m, n_groups)
    NG = np.broadcast_to(n_g, F.shape)
    zeros_term = np.where(NG > 0, (NG - F) * (F / (2 * np.maximum(NG, 1))) ** 2, 0.0).sum(1)
    su = np.bincount(lat_s, weights=u * u, minlength=m) + zeros_term
    sv = (v * v).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / np.sqrt(su[:, None] * sv[None, :])
    rho[(su[:, None] * sv[None, :]) <= 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


def _best(x: np.ndarray, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, value) per row ignoring NaN; rows with nothing finite give (-1, NaN)."""
    key = np.abs(x) if absolute else x
    key = np.where(np.isfinite(key), key, -np.inf)
    arg = key.argmax(1) if x.shape[1] else np.zeros(len(x), dtype=np.int64)
    val = x[np.arange(len(x)), arg] if x.shape[1] else np.full(len(x), np.nan)
    ok = np.isfinite(key.max(1)) if x.shape[1] else np.zeros(len(x), bool)
    return np.where(ok, arg, -1), np.where(ok, val, np.nan)


def null_scores(scores: ImageScores, labels: np.ndarray, ranked: np.ndarray, n_classes: int, n_shuffles: int = 10,
                seed: int = 0) -> pd.DataFrame:
    """The shuffled null: per (shuffle, live latent) the best class AUROC (and its z, :func:`auroc_z`) with labels
    permuted across images, and the best |within-class rho| with the attribute rows permuted within classes."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    live = np.flatnonzero(scores.counts > 0)
    rows = []
    groups = [np.flatnonzero(labels == c) for c in range(n_classes)]
    for s in range(n_shuffles):
        perm_lab = labels[rng.permutation(len(labels))]
        auc = class_auroc(scores, perm_lab, n_classes)
        c_arg, c_val = _best(auc)
        z = auroc_z(scores, perm_lab, auc)[np.arange(len(c_arg)), np.maximum(c_arg, 0)]
        perm = np.arange(len(labels))
        for idx in groups:
            perm[idx] = rng.permutation(idx)
        rho = rank_correlation(scores, None, labels, ranked=ranked[perm]) if ranked.shape[1] else \
            np.full((scores.num_latents, 0), np.nan)
        rows.append(pd.DataFrame({"shuffle": s, "latent": live, "class_auroc": c_val[live], "class_z": z[live],
                                  "attribute_rho": np.abs(_best(rho, absolute=True)[1][live])}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["shuffle", "latent"])


def calibrate(null: pd.DataFrame, cfg: TaxonomyConfig) -> dict[str, float]:
    """Thresholds from a null table (:func:`null_scores`): the ``null_quantile`` quantile of the null's best class
    z (significance) and best |rho| (at least ``min_attribute_rho``); the class AUROC floor is the effect size."""
    def q(col, default):
        ok = len(null) and col in null and null[col].notna().any()
        return float(np.nanquantile(null[col], cfg.null_quantile)) if ok else default

    qz, qa, qc = q("class_z", 0.0), q("attribute_rho", 0.0), q("class_auroc", 0.5)
    return {"class_auroc": float(cfg.min_class_auroc), "class_z": qz,
            "attribute_rho": max(cfg.min_attribute_rho, qa),
            "null_class_auroc": qc, "null_class_z": qz, "null_attribute_rho": qa}


def assign_kinds(table: pd.DataFrame, thresholds: dict[str, float]) -> np.ndarray:
    """The kind of each latent from its ``n_images``, ``class_auroc`` (and ``class_z``) and ``attribute_rho``
    (module docstring)."""
    cls = table["class_auroc"].fillna(0).to_numpy() >= thresholds["class_auroc"]
    if "class_z" in thresholds and "class_z" in table:
        cls &= table["class_z"].fillna(-np.inf).to_numpy() >= thresholds["class_z"]
    att = table["attribute_rho"].abs().fillna(0).to_numpy() >= thresholds["attribute_rho"]
    kind = np.where(cls & att, "mixed", np.where(cls, "class", np.where(att, "attribute", "unexplained")))
    return np.where(table["n_images"].to_numpy() == 0, "dead", kind).astype(object)


def _labels(table: pd.DataFrame) -> np.ndarray:
    sign = np.where(table["attribute_rho"].fillna(0) >= 0, "+", "-")
    att = table["best_attribute"].astype(str) + sign
    k = table["kind"].to_numpy()
    return np.where(k == "class", table["best_class"], np.where(k == "attribute", att, np.where(
        k == "mixed", table["best_class"].astype(str) + " & " + att, ""))).astype(object)


# ------------------------------------------------------------------------------------------------- taxonomy
def prepare_attributes(values: pd.DataFrame, cfg: TaxonomyConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    """The attribute columns the taxonomy uses: requested, defined, not redundant; and why others were dropped."""
    names = cfg.attributes or list(values.columns)
    missing = [a for a in names if a not in values.columns]
    dropped = {a: str(values.attrs.get("undefined", {}).get(a, "not measured")) for a in missing}
    keep = [a for a in names if a in values.columns]
    v = values[keep]
    for a in list(v.columns):
        why = attrs_mod.undefined_reason(v[a].to_numpy())
        if why:
            dropped[a] = why
    v = v[[a for a in v.columns if a not in dropped]]
    v, redundant = attrs_mod.drop_redundant(v, cfg.max_attribute_rho)
    dropped.update({a: f"redundant with {why}" for a, why in redundant.items()})
    return v, dropped


def latent_taxonomy(scores: ImageScores, labels: np.ndarray, values: pd.DataFrame,
                    class_names: Sequence[str] | None = None, cfg: TaxonomyConfig | None = None,
                    thresholds: dict[str, float] | None = None) -> Taxonomy:
    """Score and classify every latent (module docstring). ``values``: attributes of the same images
    (:func:`revelio_nb.attributes.measure`), one row per image in ``scores``' order. ``thresholds``: use these
    instead of calibrating on this SAE's own shuffled null (e.g. to apply one model's thresholds to another)."""
    cfg = (cfg or TaxonomyConfig()).validate()
    labels = np.asarray(labels, dtype=np.int64)
    n = scores.n_images
    if len(labels) != n or len(values) != n:
        raise TaxonomyError(f"{scores.n_images} scored images but {len(labels)} labels and {len(values)} "
                            "attribute rows: all three must describe the same images in the same order")
    n_cls = len(class_names) if class_names is not None else int(labels.max()) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_cls)]
    vals, dropped = prepare_attributes(values.reset_index(drop=True), cfg)
    attr_names = list(vals.columns)
    ranked = centered_ranks(vals.to_numpy(), labels) if attr_names else np.zeros((n, 0))
    auc = class_auroc(scores, labels, n_cls)
    rho_w = rank_correlation(scores, None, labels, ranked=ranked) if attr_names else np.zeros((scores.num_latents, 0))
    rho_raw = rank_correlation(scores, vals.to_numpy()) if attr_names else rho_w
    c_arg, c_val = _best(auc)
    a_arg, a_val = _best(rho_w, absolute=True)
    counts = scores.counts
    table = pd.DataFrame({
        "latent": np.arange(scores.num_latents), "n_images": counts, "freq_images": counts / max(n, 1),
        "class_auroc": c_val,
        "class_z": np.where(c_arg >= 0, auroc_z(scores, labels, auc)[np.arange(len(c_arg)), np.maximum(c_arg, 0)], np.nan),
        "best_class": np.where(c_arg >= 0, np.asarray(names + [""], dtype=object)[c_arg], ""),
        "attribute_rho": a_val,
        "best_attribute": np.where(a_arg >= 0, np.asarray(attr_names + [""], dtype=object)[a_arg], ""),
        "attribute_rho_raw": np.where(a_arg >= 0, rho_raw[np.arange(len(a_arg)), np.maximum(a_arg, 0)], np.nan),
    })
    table.loc[counts == 0, ["class_auroc", "class_z", "attribute_rho", "attribute_rho_raw"]] = np.nan
    table.loc[counts == 0, ["best_class", "best_attribute"]] = ""
    null = null_scores(scores, labels, ranked, n_cls, cfg.n_shuffles, cfg.seed)
    own = calibrate(null, cfg)
    thr = dict(thresholds) if thresholds is not None else own
    table.insert(1, "kind", assign_kinds(table, thr))
    table.insert(2, "label", _labels(table))
    for j, c in enumerate(names):
        table[f"auroc:{c}"] = auc[:, j]
    for j, a in enumerate(attr_names):
        table[f"rho:{a}"] = rho_w[:, j]
    groups = {a: attrs_mod.ATTRIBUTES[a].group for a in attr_names}
    table.insert(table.columns.get_loc("best_attribute") + 1, "attribute_group",
                 table["best_attribute"].map(groups).fillna(""))
    meta = {"config": asdict(cfg), "thresholds": thr, "own_null": own, "n_images": int(n),
            "num_latents": int(scores.num_latents), "class_names": names, "attributes": attr_names,
            "attribute_groups": groups, "dropped_attributes": dropped,
            "null_quantiles": {f"q{q}": {c: float(np.nanquantile(null[c], q))
                                         for c in ("class_auroc", "class_z", "attribute_rho")}
                               for q in (0.5, 0.9, 0.99)} if len(null) else {},
            "counts": {k: int(v) for k, v in table["kind"].value_counts().reindex(list(KINDS), fill_value=0).items()}}
    return Taxonomy(table, meta, null)


def attribute_table(dataset, indices: np.ndarray, names: Sequence[str] | None = None,
                    cache: bool = True) -> pd.DataFrame:
    """:func:`revelio_nb.attributes.measure_dataset` of ``dataset.images[indices]``, cached (keyed by the dataset
    name, the names and a hash of the selected images) in ``<cache>/attributes/``."""
    idx = np.asarray(indices, dtype=np.int64)
    names = attrs_mod.check_names(names)
    folder = artifacts.attribute_table_dir(str(dataset.name), names, dataset.images[idx])
    if cache and (folder / "meta.json").is_file():
        df = pd.read_csv(folder / "attributes.csv")
        df.attrs["undefined"] = json.loads((folder / "meta.json").read_text())["undefined"]
        return df
    df = attrs_mod.measure_dataset(dataset, idx, names)
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "attributes.csv", df.to_csv(index=False))
        atomic_write_json(folder / "meta.json", {"undefined": df.attrs.get("undefined", {}), "names": names,
                                                 "dataset": str(dataset.name), "n_images": len(idx)})
    return df


def store_image_rows(store) -> tuple[np.ndarray, np.ndarray]:
    """(labels, dataset indices) of a feature store's images, in the order of its rows."""
    return np.asarray(store.labels, dtype=np.int64), np.asarray(store.indices, dtype=np.int64)


def sae_taxonomy(model, features, labels: np.ndarray, values: pd.DataFrame, class_names=None,
                 cfg: TaxonomyConfig | None = None, scores: ImageScores | None = None,
                 thresholds: dict[str, float] | None = None) -> Taxonomy:
    """:func:`latent_taxonomy` of an SAE on held-out ``features`` (array / store array; one image per row, or
    (N, C, H, W) maps), encoding them unless the sparse scores are given."""
    from .latents import image_scores

    scores = scores if scores is not None else image_scores(model, features)
    return latent_taxonomy(scores, labels, values, class_names, cfg, thresholds)


# ------------------------------------------------------------------------------------------------- stability
def decoder_directions(model) -> np.ndarray:
    """[M, d] unit decoder rows of an SAE (in input units; the input scale does not change directions)."""
    w = model.W_dec.detach().float().cpu().numpy().astype(np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def match_latents(a, b) -> pd.DataFrame:
    """Pair every latent of SAE ``a`` with one of SAE ``b`` (same number of latents or fewer) by maximal total
    decoder cosine (Hungarian matching, ``scipy.optimize.linear_sum_assignment``). Columns latent_a, latent_b,
    cosine. ``a`` / ``b`` may be SAEs or [M, d] decoder arrays."""
    from scipy.optimize import linear_sum_assignment

    wa = decoder_directions(a) if hasattr(a, "W_dec") else np.asarray(a, dtype=np.float64)
    wb = decoder_directions(b) if hasattr(b, "W_dec") else np.asarray(b, dtype=np.float64)
    if wa.shape[1] != wb.shape[1]:
        raise TaxonomyError(f"decoders have widths {wa.shape[1]} and {wb.shape[1]}: not the same input space")
    wa = wa / np.maximum(np.linalg.norm(wa, axis=1, keepdims=True), 1e-12)
    wb = wb / np.maximum(np.linalg.norm(wb, axis=1, keepdims=True), 1e-12)
    cos = wa @ wb.T
    ra, rb = linear_sum_assignment(-cos)
    return pd.DataFrame({"latent_a": ra, "latent_b": rb, "cosine": cos[ra, rb]})


def stability(tax_a: Taxonomy, tax_b: Taxonomy, matching: pd.DataFrame) -> dict[str, float]:
    """How much of taxonomy ``a`` survives in ``b`` (another seed), over the latents live in ``a``: the fraction
    whose matched latent has the same kind (``same_kind``), the same kind and label (``same_label``: class name
    or attribute and sign), the mean matched decoder cosine (all latents and live ones), and ``chance_kind``, the
    agreement expected if kinds were paired at random with the same kind shares (sum over kinds of the product of
    the two shares), with Cohen's ``kappa`` = (same_kind - chance_kind) / (1 - chance_kind): 0 = no better than
    chance, 1 = every kind kept. ``keep_<kind>``: the fraction of ``a``'s latents of that kind that keep it."""
    a = tax_a.table.set_index("latent")
    b = tax_b.table.set_index("latent")
    m = matching.assign(kind_a=a.loc[matching.latent_a, "kind"].to_numpy(),
                        kind_b=b.loc[matching.latent_b, "kind"].to_numpy(),
                        label_a=a.loc[matching.latent_a, "label"].to_numpy(),
                        label_b=b.loc[matching.latent_b, "label"].to_numpy())
    live = m[m.kind_a != "dead"]
    out = {"n_live": int(len(live)), "same_kind": float((live.kind_a == live.kind_b).mean()) if len(live) else np.nan,
           "same_label": float(((live.kind_a == live.kind_b) & (live.label_a == live.label_b)).mean())
           if len(live) else np.nan,
           "mean_cosine": float(m.cosine.mean()), "mean_cosine_live": float(live.cosine.mean()) if len(live) else np.nan}
    if len(live):
        pa = live.kind_a.value_counts(normalize=True)
        pb = live.kind_b.value_counts(normalize=True)
        chance = float(sum(pa.get(k, 0.0) * pb.get(k, 0.0) for k in KINDS))
        out["chance_kind"] = chance
        out["kappa"] = (out["same_kind"] - chance) / (1 - chance) if chance < 1 else np.nan
    else:
        out["chance_kind"] = out["kappa"] = np.nan
    for k in KINDS[:-1]:
        sel = live[live.kind_a == k]
        out[f"keep_{k}"] = float((sel.kind_b == k).mean()) if len(sel) else np.nan
    return out


def kind_confusion(tax_a: Taxonomy, tax_b: Taxonomy, matching: pd.DataFrame) -> pd.DataFrame:
    """Counts of (kind in a, kind of the matched latent in b)."""
    a = tax_a.table.set_index("latent")["kind"]
    b = tax_b.table.set_index("latent")["kind"]
    df = pd.DataFrame({"a": a.loc[matching.latent_a].to_numpy(), "b": b.loc[matching.latent_b].to_numpy()})
    return pd.crosstab(df.a, df.b).reindex(index=list(KINDS), columns=list(KINDS), fill_value=0)


# ------------------------------------------------------------------------------------------------- summaries
def summarize(rows: Sequence[dict], **extra: Any) -> pd.DataFrame:
    """:func:`summary_row` of each hookpoint row (from :func:`revelio_nb.hookpoint_saes.train_hookpoint`, or the index),
    with its hookpoint, block, t and a ``cell`` label "block @ t"."""
    out = []
    for r in rows:
        tax = Taxonomy.load(r["taxonomy_path"])
        out.append(summary_row(tax, hookpoint=r["hookpoint"], block=r["block"], t=int(r["t"]),
                               cell=f"{r['block']} @ {int(r['t'])}", **extra))
    return pd.DataFrame(out)


def summary_row(tax: Taxonomy, **extra: Any) -> dict[str, Any]:
    """Counts and fractions of kinds (of all latents; shares of live latents for the attribute groups)."""
    t = tax.table
    live = t[t.kind != "dead"]
    row = dict(extra)
    row.update({f"n_{k}": int((t.kind == k).sum()) for k in KINDS})
    row.update({f"frac_{k}": float((t.kind == k).mean()) if len(t) else np.nan for k in KINDS})
    row["n_live"] = int(len(live))
    has_attr = live[live.kind.isin(["attribute", "mixed"])]
    for g in attrs_mod.GROUPS:
        row[f"live_share_{g}"] = float((has_attr.attribute_group == g).sum() / len(live)) if len(live) else np.nan
    row["live_share_class"] = float(live.kind.isin(["class", "mixed"]).mean()) if len(live) else np.nan
    row["class_threshold"] = tax.meta.get("thresholds", {}).get("class_auroc", np.nan)
    row["attribute_threshold"] = tax.meta.get("thresholds", {}).get("attribute_rho", np.nan)
    return row


def kinds_long(summary: pd.DataFrame, by: str = "hookpoint") -> pd.DataFrame:
    """Long (``by``, kind, fraction) table from rows of :func:`summary_row`."""
    return summary.melt(id_vars=[by], value_vars=[f"frac_{k}" for k in KINDS], var_name="kind",
                        value_name="fraction").assign(kind=lambda d: d.kind.str[5:])


def plot_kinds(summary: pd.DataFrame, by: str = "hookpoint", title: str = "latent kinds", ax=None,
               groups: bool = True):
    """Stacked bars of latent kinds (fractions of all latents) per ``by`` (e.g. hookpoint or "block @ t"); with
    ``groups`` a second panel splits the attribute-tracking live latents (attribute + mixed) by attribute group."""
    import matplotlib.pyplot as plt

    n = len(summary)
    if ax is None:
        fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(13 if groups else 7, 0.45 * n + 1.6), squeeze=False)
        axes = axes[0]
    else:
        fig, axes = ax.figure, [ax]
        groups = False
    labels = summary[by].astype(str).tolist()
    y = np.arange(n)[::-1]
    left = np.zeros(n)
    for k in KINDS:
        v = summary[f"frac_{k}"].to_numpy(dtype=float)
        axes[0].barh(y, v, left=left, color=KIND_COLORS[k], label=k, edgecolor="white", linewidth=0.5)
        left += v
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel("fraction of latents")
    axes[0].set_title(title)
    axes[0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.06 if n < 4 else 1.02), ncol=len(KINDS), fontsize=7,
                   frameon=False)
    if groups:
        cmap = plt.get_cmap("Set2")
        left = np.zeros(n)
        for i, g in enumerate(attrs_mod.GROUPS):
            v = summary[f"live_share_{g}"].fillna(0).to_numpy(dtype=float)
            axes[1].barh(y, v, left=left, color=cmap(i), label=g, edgecolor="white", linewidth=0.5)
            left += v
        axes[1].set_yticks(y, [""] * n)
        axes[1].set_xlabel("share of live latents tracking an attribute (attribute + mixed)")
        axes[1].set_title("which attribute group")
        axes[1].set_xlim(0, max(0.05, float(left.max()) * 1.1))
        axes[1].legend(loc="lower center", bbox_to_anchor=(0.5, 1.06 if n < 4 else 1.02), ncol=len(attrs_mod.GROUPS),
                       fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_selectivity(taxes: dict[str, "Taxonomy"], title: str = ""):
    """ECDFs of the live latents' class AUROC and |attribute rho| for each taxonomy (e.g. trained model vs
    random-init model), with each one's shuffled null dashed and the thresholds of the first as vertical lines."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    colors = plt.get_cmap("tab10")
    for i, (name, tax) in enumerate(taxes.items()):
        live = tax.table[tax.table.kind != "dead"]
        for ax, col, f in ((axes[0], "class_auroc", lambda x: x), (axes[1], "attribute_rho", np.abs)):
            for data, ls, lab in ((live[col], "-", name), (None if tax.null is None else tax.null[col], "--",
                                                           f"{name}: shuffled null")):
                if data is None:
                    continue
                x = np.sort(f(data.dropna().to_numpy()))
                if len(x):
                    ax.plot(x, np.arange(1, len(x) + 1) / len(x), ls, color=colors(i), label=lab, lw=1.4)
    thr = next(iter(taxes.values())).meta.get("thresholds", {}) if taxes else {}
    for ax, key, xl in ((axes[0], "class_auroc", "best one-vs-rest AUROC"),
                        (axes[1], "attribute_rho", "|within-class Spearman rho| of the best attribute")):
        if key in thr:
            ax.axvline(thr[key], color="k", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("fraction of live latents")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def top_latents_by_kind(tax: Taxonomy, n: int = 3) -> dict[str, list[int]]:
    """The ``n`` most convincing latents of each live kind: class by AUROC, attribute by |rho|, mixed by the
    smaller margin over the two thresholds, unexplained by firing frequency."""
    t = tax.table
    thr = tax.meta.get("thresholds", {"class_auroc": 0.75, "attribute_rho": 0.3})
    out = {}
    for k in KINDS[:-1]:
        s = t[t.kind == k]
        if k == "class":
            s = s.sort_values("class_auroc", ascending=False)
        elif k == "attribute":
            s = s.assign(a=s.attribute_rho.abs()).sort_values("a", ascending=False)
        elif k == "mixed":
            margin = np.minimum(s.class_auroc - thr["class_auroc"], s.attribute_rho.abs() - thr["attribute_rho"])
            s = s.assign(m=margin).sort_values("m", ascending=False)
        else:
            s = s.sort_values("freq_images", ascending=False)
        out[k] = s.latent.head(n).astype(int).tolist()
    return out


def plot_kind_examples(tax: Taxonomy, stats, images: np.ndarray, n_latents: int = 3, n_images: int = 8,
                       class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """For each live kind, the top images of its most convincing latents (:func:`top_latents_by_kind`), one
    figure per kind titled with each latent's label."""
    from .latents import plot_top_images

    figs = {}
    t = tax.table.set_index("latent")
    for kind, ids in top_latents_by_kind(tax, n_latents).items():
        if not ids:
            continue
        fig = plot_top_images(stats, images, ids, n=n_images, class_names=class_names)
        for ax_row, lat in zip(fig.axes[::min(n_images, stats.top_rows.shape[1])], ids):
            r = t.loc[lat]
            ax_row.set_ylabel(f"#{lat}\n{r['label'] or kind}\nAUC {r['class_auroc']:.2f}\nrho {r['attribute_rho']:+.2f}",
                              fontsize=6, rotation=0, ha="right", va="center")
        fig.suptitle(f"{kind} latents", y=1.02)
        figs[kind] = fig
    return figs


# ------------------------------------------------------------------------------------------------- claims
PAPER_CLAIMS = (
    # (claim id, where, what the paper says, measure column of summary_row)
    ("bottleneck: pose / camera view", "bottleneck", "pose / camera-view latents", "live_share_pose"),
    ("middle up-block: fine-grained class", "middle up-block", "fine-grained class latents", "live_share_class"),
    ("last up-block: colour / texture", "last up-block", "colour / texture latents", "live_share_colour_texture"),
)


def claim_blocks(blocks: Sequence[str]) -> dict[str, str | None]:
    """Which block plays each role of the paper's claims in a UNet: bottleneck = ``mid_block``, middle up-block =
    ``up_blocks.<n // 2>``, last up-block = ``up_blocks.<n - 1>``, with n = 1 + the highest up-block index listed
    (so the last up block must be among ``blocks``). Roles without a block (a DiT) are None."""
    ups = [int(b.split(".")[1]) for b in blocks if re.fullmatch(r"up_blocks\.\d+", b)]
    n = max(ups) + 1 if ups else 0
    return {"bottleneck": "mid_block" if "mid_block" in blocks else None,
            "middle up-block": f"up_blocks.{n // 2}" if n else None,
            "last up-block": f"up_blocks.{n - 1}" if n else None}


def claim_table(summary: pd.DataFrame, null_summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Whether each of the paper's block claims holds, per timestep, generated from the numbers.

    ``summary``: rows of :func:`summary_row` with ``block`` and ``t`` columns (the trained model);
    ``null_summary``: the same for the random-init model's SAEs (optional). A claim about block B and measure S
    (share of live latents that are class-specific, or track a pose / colour-texture attribute) at timestep t

    * **holds** when B has the largest S of all blocks measured at t and (with a null) S exceeds the random-init
      model's S at B;
    * **partly** when only one of the two is true (or B ranks in the top half without being first);
    * **does not hold** otherwise (and **not measured** when B is not among the blocks).
    """
    s = summary.copy()
    s["live_share_colour_texture"] = s["live_share_colour"].fillna(0) + s["live_share_texture"].fillna(0)
    if null_summary is not None and len(null_summary):
        ns = null_summary.copy()
        ns["live_share_colour_texture"] = ns["live_share_colour"].fillna(0) + ns["live_share_texture"].fillna(0)
    else:
        ns = None
    roles = claim_blocks(list(dict.fromkeys(s["block"])))
    rows = []
    for t in sorted(s["t"].unique()):
        at = s[s.t == t]
        for claim, role, what, col in PAPER_CLAIMS:
            block = roles[role]
            row = {"t": int(t), "claim": claim, "block": block or "", "measure": col.replace("live_share_", "share: ")}
            if block is None or block not in set(at.block):
                rows.append({**row, "verdict": "not measured"})
                continue
            vals = at.groupby("block")[col].mean()
            v = float(vals[block])
            best_block = str(vals.idxmax())
            rank = int((vals > v).sum()) + 1
            row.update({"value": v, "rank": rank, "n_blocks": int(len(vals)), "best_block": best_block,
                        "best_value": float(vals.max())})
            first = rank == 1 and v > 0
            above = None
            if ns is not None:
                nb = ns[(ns.t == t) & (ns.block == block)]
                if len(nb):
                    row["random_init_value"] = float(nb[col].mean())
                    above = v > row["random_init_value"]
            top_half = rank <= max(1, len(vals) // 2) and v > 0
            if first and above in (None, True):
                verdict = "holds"
            elif first or (above and top_half) or (above is None and top_half):
                verdict = "partly"
            else:
                verdict = "does not hold"
            row["verdict"] = verdict
            row["why"] = (f"{row['measure']} = {v:.2f} at {block}, rank {rank} of {len(vals)} blocks "
                          f"(best: {best_block} {row['best_value']:.2f})"
                          + (f"; random-init model {row['random_init_value']:.2f}" if "random_init_value" in row else ""))
            rows.append(row)
    return pd.DataFrame(rows)


def finding_paragraph(claims: pd.DataFrame, summary: pd.DataFrame, stab: pd.DataFrame | None = None) -> str:
    """One paragraph stating the taxonomy's findings, generated from the tables (no hand-typed verdicts)."""
    parts = []
    if len(summary):
        live = summary["n_live"].sum()
        tot = summary[[f"n_{k}" for k in KINDS]].to_numpy().sum()
        shares = {k: summary[f"n_{k}"].sum() / max(live, 1) for k in KINDS[:-1]}
        parts.append(f"Over {len(summary)} hookpoints, {live} of {tot} SAE latents are live; of those "
                     + ", ".join(f"{shares[k]:.0%} {k}" for k in KINDS[:-1]) + ".")
    for _, r in claims.iterrows():
        if r["verdict"] == "not measured":
            continue
        parts.append(f"Claim '{r['claim']}' at t={r['t']}: {r['verdict']} ({r['why']}).")
    if stab is not None and len(stab):
        chance = (f", where random pairing with the same kind shares gives {stab['chance_kind'].mean():.0%} "
                  f"(Cohen's kappa {stab['kappa'].mean():.2f})") if "kappa" in stab else ""
        parts.append(f"With a second SAE seed, {stab['same_kind'].mean():.0%} of live latents keep their kind"
                     f"{chance}; {stab['same_label'].mean():.0%} keep kind and label; mean matched decoder cosine "
                     f"{stab['mean_cosine_live'].mean():.2f}.")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------- naming
def word_targets(class_names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Caption words -> what they name: ("attribute", name) for the attribute words of
    :data:`revelio_nb.captions.ATTRIBUTES` (large -> size, left -> facing, ...), ("class", name) for class nouns."""
    from .captions import ATTRIBUTES as CAPTION_ATTRIBUTES

    out: dict[str, tuple[str, str]] = {}
    for name, a in CAPTION_ATTRIBUTES.items():
        for w in a.words:
            out[w] = ("attribute", name)
    for c in class_names:
        out[str(c)] = ("class", str(c))
    return out


def compare_with_names(named: pd.DataFrame, tax: Taxonomy, top_words: int = 1,
                       latent_pattern: str = r"latent (\d+)") -> pd.DataFrame:
    """Does the word naming of SAE latents (Decoding Diffusion, notebook 06: :meth:`directions.WordMap.name`)
    agree with the measured kind?

    ``named``: rows (direction, side, rank, word, score); each direction's latent id is read with
    ``latent_pattern``. For each latent, its top ``top_words`` positive words are mapped to an attribute or a class
    (:func:`word_targets`) and compared with the taxonomy: a word naming attribute A agrees when the latent tracks
    A (|within-class rho of A| >= the taxonomy's attribute threshold, whatever its kind); a word naming class C
    agrees when the latent separates C (its AUROC for C >= the class threshold). One row per (latent, word).
    """
    thr = tax.meta.get("thresholds", {"class_auroc": 0.75, "attribute_rho": 0.3})
    t = tax.table.set_index("latent")
    targets = word_targets(tax.meta.get("class_names", []))
    rows = []
    pos = named[(named.get("side", "+") == "+") & (named["rank"] <= top_words)] if "side" in named else \
        named[named["rank"] <= top_words]
    for _, r in pos.iterrows():
        m = re.search(latent_pattern, str(r["direction"]))
        if m is None:
            raise TaxonomyError(f"cannot read a latent id from direction {r['direction']!r} "
                                f"(pattern {latent_pattern!r})")
        lat = int(m.group(1))
        if lat not in t.index:
            raise TaxonomyError(f"latent {lat} is not in the taxonomy (0..{len(t) - 1})")
        row = t.loc[lat]
        what, target = targets.get(str(r["word"]), ("other", ""))
        if what == "attribute":
            col = f"rho:{target}"
            measured = float(row[col]) if col in row.index else np.nan
            agree = bool(np.isfinite(measured) and abs(measured) >= thr["attribute_rho"])
        elif what == "class":
            col = f"auroc:{target}"
            measured = float(row[col]) if col in row.index else np.nan
            agree = bool(np.isfinite(measured) and measured >= thr["class_auroc"])
        else:
            measured, agree = np.nan, False
        rows.append({"latent": lat, "word": r["word"], "word_score": float(r.get("score", np.nan)),
                     "names": what, "target": target, "measured": measured, "agree": agree,
                     "kind": row["kind"], "label": row["label"]})
    return pd.DataFrame(rows)


def naming_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Agreement of word naming with the measured taxonomy, per kind of word target (attribute / class)."""
    if not len(comparison):
        return pd.DataFrame(columns=["names", "target", "n", "agree"])
    return (comparison.groupby(["names", "target"]).agg(n=("agree", "size"), agree=("agree", "mean"))
            .reset_index())
