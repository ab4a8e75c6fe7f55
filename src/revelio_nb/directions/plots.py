"""Figures of notebook 06: prompt samples, bias heatmaps and rho intervals, word bars, steering, retrieval."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..captions import ATTRIBUTES, neutral_prompt
from ..models import DiffusionModel
from .prompt_runs import SampleConfig, generate

if TYPE_CHECKING:
    from .study import BiasStudy


def plot_prompt_samples(model: DiffusionModel, nouns: Sequence[str], guidance_scales: Sequence[float] = (1.0, 3.0),
                        steps: int = 10, seed: int = 0, n_seeds: int = 4, template: str | None = None):
    """Each noun's neutral prompt drawn ``n_seeds`` times (paired seeds) at each guidance scale: one row per
    noun, one block of columns per scale."""
    import matplotlib.pyplot as plt

    from ..sampling import to_uint8

    kw = {} if template is None else {"template": template}
    prompts = [neutral_prompt(n, **kw) for n in nouns]
    rows = {g: to_uint8(generate(model, prompts, SampleConfig(n_seeds=n_seeds, steps=steps, seed=seed,
                                                             guidance_scale=g), progress=False))
            for g in guidance_scales}
    ncol = len(rows) * n_seeds
    fig, axes = plt.subplots(len(prompts), ncol, figsize=(0.6 * ncol + 0.8, 0.6 * len(prompts) + 0.4), squeeze=False)
    for b, (g, imgs) in enumerate(rows.items()):
        for p in range(len(prompts)):
            for j in range(n_seeds):
                ax = axes[p, b * n_seeds + j]
                im = imgs[p * n_seeds + j]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if p == 0 and j == 0:
                    ax.set_title(f"CFG {g:g}", fontsize=7, loc="left")
        for p, noun in enumerate(nouns):
            axes[p, 0].set_ylabel(noun, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"'{neutral_prompt('<class>', **kw)}', {n_seeds} paired seeds, DDIM {steps} steps", fontsize=8)
    fig.tight_layout(pad=0.2)
    return fig


def plot_bias_heatmaps(panels: dict[str, pd.DataFrame], center: dict[str, float] | None = None, cmap: str = "vlag",
                       annot: bool = True, title: str = ""):
    """Class x attribute heatmaps side by side (e.g. ground truth, diffusion bias, text-encoder bias).

    Each panel is standardised per attribute column for colour (z-scores) and annotated with its raw values.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.8), squeeze=False)
    for ax, (name, table) in zip(axes[0], panels.items()):
        t = table.astype(float)
        z = (t - t.mean()) / t.std(ddof=0).replace(0, 1)
        sns.heatmap(z, ax=ax, cmap=cmap, center=0, vmin=-2.2, vmax=2.2, annot=t.round(2) if annot else False,
                    fmt="", cbar=False, annot_kws={"fontsize": 6})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_stepwise_rho(df: pd.DataFrame, title: str = ""):
    """rho against denoising step (0 = pure noise), one line per attribute."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for attr, g in df.groupby("attribute", sort=False):
        ax.plot(g["step"], g["rho"], marker="o", ms=3, label=attr)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("Spearman rho vs truth")
    ax.legend(fontsize=7, ncol=len(df["attribute"].unique()), loc="lower left")
    ax.set_title(title or "bias score of each step's h alone vs ground truth", fontsize=9)
    fig.tight_layout()
    return fig


def plot_word_bars(named: pd.DataFrame, ncols: int = 3, title: str = ""):
    """Word-alignment bars from :meth:`WordMap.name` (one panel per direction, + words right, - words left)."""
    import matplotlib.pyplot as plt

    dirs = list(dict.fromkeys(named["direction"]))
    ncols = min(ncols, len(dirs))
    nrows = (len(dirs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat[len(dirs):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, dirs):
        g = named[named["direction"] == d].sort_values("score")
        colors = ["tab:blue" if s < 0 else "tab:red" for s in g["score"]]
        ax.barh(np.arange(len(g)), g["score"], color=colors)
        ax.set_yticks(np.arange(len(g)))
        ax.set_yticklabels(g["word"], fontsize=7)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(str(d), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("cosine", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_steering_strips(strips: dict[str, dict[float, Any]], n_show: int = 4, cell: float = 0.75,
                         row_names: Sequence[str] | None = None):
    """Images along directions: one block of ``n_show`` rows per named direction (rows = the first ``n_show``
    images of each strength batch, e.g. one seed of several prompts, labelled by ``row_names``), columns =
    strengths."""
    import matplotlib.pyplot as plt

    from ..sampling import to_uint8

    rows = [(name, k) for name in strips for k in range(n_show)]
    strengths = {name: sorted(v) for name, v in strips.items()}
    ncols = max(len(s) for s in strengths.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols + 1.6, cell * len(rows) + 0.3), squeeze=False)
    for r, (name, k) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c >= len(strengths[name]):
                continue
            s = strengths[name][c]
            imgs = strips[name][s]
            imgs = to_uint8(imgs) if torch.is_tensor(imgs) else np.asarray(imgs)
            if k < len(imgs):
                im = imgs[k]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
            if k == 0:
                ax.set_title(f"{s:+g}", fontsize=7)
        label = (f"{name}\n" if k == 0 else "") + (str(row_names[k]) if row_names is not None and k < len(row_names) else "")
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    return fig


def plot_dendrogram(clusters: dict[str, Any], title: str = "", label_fn: Callable[[str], str] | None = None):
    """Dendrogram of :func:`cluster_prompts`."""
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    labels = [label_fn(p) if label_fn else p for p in clusters["labels"]]
    fig, ax = plt.subplots(figsize=(6, 0.22 * len(labels) + 1))
    dendrogram(clusters["linkage"], labels=labels, orientation="left", ax=ax, color_threshold=None)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_steering_effect(effects: pd.DataFrame, title: str = ""):
    """Measured attribute (mean +- sem) against steering strength, one panel per attribute."""
    import matplotlib.pyplot as plt

    attrs = list(dict.fromkeys(effects["attribute"]))
    fig, axes = plt.subplots(1, len(attrs), figsize=(2.8 * len(attrs), 2.5), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        g = effects[effects["attribute"] == a]
        for key, gg in g.groupby("direction", sort=False) if "direction" in g else [(a, g)]:
            ax.errorbar(gg["strength"], gg["mean"], yerr=gg["sem"], marker="o", ms=3, capsize=2, label=str(key))
        ax.set_xlabel("strength", fontsize=8)
        ax.set_ylabel(a, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{a}: {ATTRIBUTES[a].low} -> {ATTRIBUTES[a].high}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_rho_intervals(studies: Sequence[BiasStudy], target: float | None = 0.8, title: str = ""):
    """rho against the truth per attribute: every seed set of every study with its bootstrap interval (the
    study's all-sets value as a black diamond), and the target as a dashed line."""
    import matplotlib.pyplot as plt

    attrs = list(studies[0].config.attributes)
    fig, axes = plt.subplots(1, len(studies), figsize=(1.3 * len(attrs) * len(studies) + 1.5, 3.0), squeeze=False,
                             sharey=True)
    for ax, st in zip(axes[0], studies):
        sets = st.seed_set_labels
        width = 0.7 / max(1, len(sets))
        for k, label in enumerate(sets + ["all seed sets"]):
            g = st.rho[st.rho.seed_set == label].set_index("attribute").reindex(attrs)
            if g.rho.isna().all():
                continue
            x = np.arange(len(attrs)) + (k - len(sets) / 2) * width
            pooled = label == "all seed sets"
            # the interval as drawn lines, not errorbar's distances: a percentile bootstrap interval of a few seeds
            # can lie beside its point estimate (negative distances, which errorbar refuses)
            (line,) = ax.plot(x, g.rho, "D" if pooled else "o", ms=4, color="k" if pooled else None, label=label)
            ax.vlines(x, g.ci_low, g.ci_high, color=line.get_color(), lw=1)
        if target is not None:
            ax.axhline(target, ls="--", color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(attrs)))
        ax.set_xticklabels(attrs, fontsize=8)
        ax.set_ylim(min(-0.1, float(np.nanmin(st.rho.ci_low)) - 0.05), 1.02)
        ax.set_title(f"{st.label} ({st.config.sampler}, {st.config.n_seeds} seeds per set)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel(f"Spearman rho vs truth ({int(100 * studies[0].config.ci)} % CI)", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_retrieval(retrieval: pd.DataFrame, title: str = ""):
    """Top-1 / top-5 retrieval accuracy of the image-conditioning check against t, with chance levels."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    for k, c in (("top1", "tab:blue"), ("top5", "tab:orange")):
        ax.plot(retrieval.t, retrieval[k], marker="o", color=c, label=k)
        ax.plot(retrieval.t, retrieval[f"chance_{k}"], ls=":", color=c, label=f"chance {k}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("t (real images noised to t)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title or "does h of a real image retrieve its class's prompt h?", fontsize=9)
    fig.tight_layout()
    return fig
