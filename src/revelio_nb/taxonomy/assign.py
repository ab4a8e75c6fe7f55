"""The taxonomy of one SAE: attributes measured on the images (cached), scores, calibrated thresholds and kinds."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Sequence

import numpy as np
import pandas as pd

from .. import artifacts
from .. import attributes as attrs_mod
from ..latent_store import ImageScores
from ..paths import atomic_write_json, atomic_write_text
from .config import KINDS, Taxonomy, TaxonomyConfig, TaxonomyError
from .scores import (
    _best,
    _labels,
    assign_kinds,
    auroc_z,
    calibrate,
    centered_ranks,
    class_auroc,
    null_scores,
    rank_correlation,
)


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
    from ..latents import image_scores

    scores = scores if scores is not None else image_scores(model, features)
    return latent_taxonomy(scores, labels, values, class_names, cfg, thresholds)
