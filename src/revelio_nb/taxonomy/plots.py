"""Summaries per hookpoint and the taxonomy figures (kind bars, selectivity, example grids)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import attributes as attrs_mod
from .config import KIND_COLORS, KINDS, Taxonomy


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
    from ..latents import plot_top_images

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
