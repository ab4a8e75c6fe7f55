"""Seed stability: latents of two SAEs matched by decoder cosine (Hungarian), and the fraction that keep their kind."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .config import KINDS, Taxonomy, TaxonomyError


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
