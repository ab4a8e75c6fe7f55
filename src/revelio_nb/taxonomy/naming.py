"""Word naming of SAE latents (Decoding Diffusion) compared with their measured kind."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from .config import Taxonomy, TaxonomyError


# ------------------------------------------------------------------------------------------------- naming
def word_targets(class_names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Caption words -> what they name: ("attribute", name) for the attribute words of
    :data:`revelio_nb.captions.ATTRIBUTES` (large -> size, left -> facing, ...), ("class", name) for class nouns."""
    from ..captions import ATTRIBUTES as CAPTION_ATTRIBUTES

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
