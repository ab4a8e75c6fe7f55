"""Per-latent selectivity scores from the sparse code: class AUROC (and its z), within-class attribute rank
correlation, the shuffled-label nulls and the rule that assigns kinds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..latent_store import ImageScores
from ..latents import _segment_positions, auroc_from_entries
from .config import TaxonomyConfig, TaxonomyError


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
