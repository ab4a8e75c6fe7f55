"""Figures of probe results: :func:`sweep_heatmap` (accuracy over block x timestep), :func:`summary_barplot`
(notebook 04), :func:`comparison_barplot` and :func:`layer_profile` (notebook 05).
"""

from __future__ import annotations

import pandas as pd

from .data import ProbeError
from .sweep import best_cells


def sweep_heatmap(df: pd.DataFrame, value: str = "test_acc", title: str | None = None, ax=None,
                  mark_best_val: bool = True):
    """Seaborn heatmap of accuracy (%) over block (rows, in the order given) x timestep (columns); the cell
    with the best validation accuracy is outlined."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Rectangle

    blocks = list(dict.fromkeys(df["block"]))
    ts = sorted(df["t"].unique())
    grid = df.pivot_table(index="block", columns="t", values=value).reindex(index=blocks, columns=ts) * 100
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(ts), 0.8 + 0.45 * len(blocks)))
    else:
        fig = ax.figure
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": f"{value} (%)"}, ax=ax)
    if mark_best_val:
        b, t = best_cells(df, 1)[0]
        ax.add_patch(Rectangle((ts.index(t), blocks.index(b)), 1, 1, fill=False, edgecolor="red", lw=2.5))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("block")
    ax.set_title(title or f"linear probe {value} (red: best on validation)")
    fig.tight_layout()
    return fig


def comparison_barplot(runs: pd.DataFrame, comparison: str, ax=None):
    """Test accuracy (mean ± std over seeds) per model (and probed dataset) and method for one comparison."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = runs[runs["comparison"] == comparison].copy()
    d["test %"] = d["test_acc"] * 100
    if "dataset" in d.columns and d["dataset"].nunique() > 1:  # the same models probed on several datasets
        d["label"] = d["label"] + "\n" + d["dataset"]
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 1.3 * d["label"].nunique(), 3.2))
    else:
        fig = ax.figure
    sns.barplot(data=d, x="label", y="test %", hue="method", errorbar="sd", ax=ax)
    lo = max(0.0, float(d["test %"].min()) - 10)
    ax.set_ylim(lo, 100)
    ax.set_xlabel("")
    ax.set_title(comparison)
    if d["label"].nunique() > 4:  # several models x datasets: keep the labels apart
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.tight_layout()
    return fig


def summary_barplot(runs: pd.DataFrame, best: pd.DataFrame, ax=None):
    """Test accuracy per seed (points) and mean ± std (bars) of the validation-best cell of each (features, method);
    one panel per dataset when the tables have a ``dataset`` column (``ax`` only for a single dataset)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    key = [c for c in ("dataset", "features", "method", "block", "t") if c in best.columns and c in runs.columns]
    keys = set(map(tuple, best[key].astype(str).values))
    d = runs[[k in keys for k in map(tuple, runs[key].astype(str).values)]].copy()
    d["test %"] = d["test_acc"] * 100
    family = {"linear": "linear (probe / pixel logistic)", "pixels (logistic)": "linear (probe / pixel logistic)",
              "diffc": "conv (Diff-C / supervised CNN)", "supervised CNN": "conv (Diff-C / supervised CNN)"}
    d["probe"] = [family.get(m, m) for m in d["method"]]
    names = list(dict.fromkeys(d["dataset"])) if "dataset" in d.columns else [None]
    if ax is None:
        n_feat = d["features"].nunique()
        fig, axes = plt.subplots(len(names), 1, figsize=(max(8, 1.9 * n_feat), 3.6 * len(names)), squeeze=False)
        axes = axes[:, 0]
    else:
        if len(names) > 1:
            raise ProbeError(f"one ax cannot hold {len(names)} datasets ({names}); leave ax=None")
        fig, axes = ax.figure, [ax]
    hue_order = sorted(set(d["probe"]), key=lambda p: not p.startswith("linear"))
    for a, name in zip(axes, names):
        dd = d if name is None else d[d["dataset"] == name]
        sns.barplot(data=dd, x="features", y="test %", hue="probe", errorbar="sd", ax=a, alpha=0.85,
                    hue_order=hue_order)
        a.set_ylim(max(0.0, float(dd["test %"].min()) - 10), 100)
        a.set_xlabel("")
        a.set_title(("" if name is None else f"{name}: ")
                    + "test accuracy at the validation-best cell (mean ± std over seeds)")
        a.legend(fontsize=8, loc="lower right")
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def layer_profile(sweeps: pd.DataFrame, comparison: str, value: str = "val_acc", ax=None, dataset: str | None = None):
    """Validation accuracy of the linear probe along each model's depth (blocks in execution order, x scaled
    to 0..1 so a UNet and a DiT can share the axis); one line per (model, t), on one probed ``dataset`` (default:
    the comparison's first)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = sweeps[sweeps["comparison"] == comparison].copy()
    if "dataset" in d.columns and len(d):
        names = list(dict.fromkeys(d["dataset"]))
        dataset = names[0] if dataset is None else dataset
        if dataset not in names:
            raise ProbeError(f"comparison {comparison!r} was not probed on {dataset!r}; it was on {names}")
        d = d[d["dataset"] == dataset]
    pos = {}
    for label, g in d.groupby("label", sort=False):
        order = list(dict.fromkeys(g["block"]))
        for i, b in enumerate(order):
            pos[(label, b)] = i / max(1, len(order) - 1)
    d["relative depth"] = [pos[(lab, b)] for lab, b in zip(d["label"], d["block"])]
    d[f"{value} %"] = d[value] * 100
    d["t"] = d["t"].astype(str)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.4))
    else:
        fig = ax.figure
    sns.lineplot(data=d, x="relative depth", y=f"{value} %", hue="label", style="t", marker="o", ax=ax)
    ax.set_title(f"{comparison}: linear probe along depth" + (f" ({dataset})" if dataset else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
