"""Tidy probe rows summarised: :func:`summarize` (mean +- std over seeds per group), :func:`best_by_validation`
(the group's validation-best cell), :func:`headline` (a plain-text verdict) and :func:`fmt_pm`.
The columns they write are the constants of :mod:`.columns`.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from . import columns as C


def summarize(df: pd.DataFrame, by: Sequence[str] = ("method", "block", "t")) -> pd.DataFrame:
    """Mean and std of val/test accuracy over seeds, per group; ``test`` is a "mean ± std" string in %."""
    by = [c for c in by if c in df.columns]
    g = df.groupby(by, sort=False, dropna=False)
    out = g.agg(**{C.VAL_ACC: (C.VAL_ACC, "mean"), C.TEST_MEAN: (C.TEST_ACC, "mean"), C.TEST_STD: (C.TEST_ACC, "std"),
                   C.N_SEEDS: (C.SEED, "nunique")}).reset_index()
    out[C.TEST_STD] = out[C.TEST_STD].fillna(0.0)
    out[C.TEST] = [fmt_pm(m, s) for m, s in zip(out[C.TEST_MEAN], out[C.TEST_STD])]
    return out


def fmt_pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def best_by_validation(summary: pd.DataFrame, by: Sequence[str] = (C.DATASET, C.FEATURES, C.METHOD)) -> pd.DataFrame:
    """Per group (per dataset when the table has that column), the row of :func:`summarize` with the best mean
    validation accuracy (test is only reported)."""
    by = [c for c in by if c in summary.columns]
    idx = summary.groupby(by, sort=False)[C.VAL_ACC].idxmax()
    return summary.loc[idx.values].reset_index(drop=True)


def headline(summary: pd.DataFrame, target: float = 0.92) -> str:
    """A plain-text verdict from a :func:`summarize` table with features in {diffusion (trained), random init
    (same arch), pixels, encoder: <name>}: best linear / Diff-C (chosen on validation) vs pixels, the control, the
    CNN and the vision encoders; one paragraph per dataset when the table has a ``dataset`` column."""
    if "dataset" in summary.columns and summary["dataset"].nunique() > 1:
        return "\n\n".join(f"== {name}\n" + headline(d.drop(columns="dataset"), target)
                            for name, d in summary.groupby("dataset", sort=False))
    best = best_by_validation(summary).set_index(["features", "method"])

    def get(f, m):
        return best.loc[(f, m)] if (f, m) in best.index else None

    lines = []
    for (f, m), r in best.iterrows():
        t = f" t={int(r['t'])}" if int(r["t"]) >= 0 else ""  # encoders have no timestep
        cell = "" if r["block"] == "pixels" else f" at {r['block']}{t}"
        lines.append(f"{f:28s} {m:20s} {r['test']:>14s} %  ({int(r['n_seeds'])} seed(s){cell})")
    lin, dc = get("diffusion (trained)", "linear"), get("diffusion (trained)", "diffc")
    pix, ctrl = get("pixels", "pixels (logistic)"), get("random init (same arch)", "diffc")
    ctrl_lin = get("random init (same arch)", "linear")
    if lin is not None and dc is not None:
        best_acc = max(lin["test_mean"], dc["test_mean"])
        lines.append(f"best diffusion-feature accuracy {best_acc * 100:.1f} % (target >= {target * 100:.0f} %): "
                     f"{'reached' if best_acc >= target else 'NOT reached'}")
        lines.append(f"Diff-C {'>=' if dc['test_mean'] >= lin['test_mean'] else '<'} linear probe "
                     f"({dc['test_mean'] * 100:.1f} vs {lin['test_mean'] * 100:.1f} %)")
        if pix is not None:
            lines.append(f"linear probe on diffusion features vs on pixels: {lin['test_mean'] * 100:.1f} vs "
                         f"{pix['test_mean'] * 100:.1f} %")
        if ctrl is not None and ctrl_lin is not None:
            lines.append(f"random-init control: linear {ctrl_lin['test_mean'] * 100:.1f} %, Diff-C "
                         f"{ctrl['test_mean'] * 100:.1f} % (trained: {lin['test_mean'] * 100:.1f} / "
                         f"{dc['test_mean'] * 100:.1f} %)")
        for f in dict.fromkeys(best.index.get_level_values(0)):
            if str(f).startswith("encoder:"):
                el, ed = get(f, "linear"), get(f, "diffc")
                parts = [f"{what} {e['test_mean'] * 100:.1f} vs {ref['test_mean'] * 100:.1f} %"
                         for what, e, ref in (("linear", el, lin), ("Diff-C", ed, dc)) if e is not None]
                lines.append(f"{f[len('encoder:'):].strip()} vs diffusion features: " + ", ".join(parts))
    return "\n".join(lines)
