"""One k-SAE per hookpoint (model, block, timestep): train, evaluate on held-out data, compute latent statistics.

Each step is cached: the feature stores by :mod:`revelio_nb.features`, the SAE folder (sparsify layout) by a hash
of the training store's key and the SAE config, and the latent statistics beside the SAE (keys and folders:
:mod:`revelio_nb.artifacts`). The run's index,
``<run_dir>/sae/hookpoints.csv`` (:class:`revelio_nb.run_index.HookpointIndex`: its columns, locked writes, validated
reads), is what the latent browser (:mod:`revelio_nb.browse`) reads. Each row of :func:`train_hookpoint` holds the
index's columns, the metrics fvu, l0, dead_fraction, mean_purity, num_latents, k, n_eval_tokens, taxonomy_path (the
taxonomy table, empty when not computed) and the kind counts n_class, n_mixed, n_attribute, n_unexplained, n_dead.

The latent taxonomy (:mod:`revelio_nb.taxonomy`: each latent's kind on the eval split) is cached beside the latent
statistics, in ``taxonomy-<hash of its config>/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import artifacts, features, latent_store, latents, sae
from .data import ImageDataset, load_dataset
from .models import DiffusionModel, load_model
from .pooling import MAP, MEAN
from .run_index import HookpointIndex

if TYPE_CHECKING:  # pragma: no cover - types only
    from .taxonomy import TaxonomyConfig


@dataclass
class HookpointRun:
    """Which features to read (the store config is shared with notebook 01 so its stores are reused) and how to
    train the SAEs."""

    model: str = "embedded:animals-unet"
    dataset: str = "animal-mnist"
    store_blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    store_timesteps: list[int] = field(default_factory=lambda: [25])
    pooling: str = MEAN  # of the stores: MEAN (vectors) or MAP (maps: one SAE token per position)
    train_split: str = "train"
    eval_split: str = "test"
    max_images: int | None = None
    train_steps: int | None = None  # embedded model budget override (smoke runs)
    batch_size: int = 64
    seed: int = 0
    sae: sae.TrainConfig = field(default_factory=sae.TrainConfig)
    top_n: int = 16
    taxonomy: "TaxonomyConfig | None" = field(default_factory=lambda: _taxonomy_config())
    """How each latent's kind is measured on the eval split (:class:`revelio_nb.taxonomy.TaxonomyConfig`; None: no
    taxonomy)."""

    def store_config(self, split: str, pooling: str | None = None) -> features.ExtractionConfig:
        return features.ExtractionConfig(
            model=self.model, dataset=self.dataset, split=split, blocks=list(self.store_blocks),
            timesteps=list(self.store_timesteps), pooling=pooling or self.pooling, max_images=self.max_images,
            train_steps=self.train_steps, batch_size=self.batch_size, seed=self.seed)


def label(model: str, block: str, t: int, pooling: str) -> str:
    kind = "spatial" if pooling == MAP else "pooled"  # words of the label, not pooling values
    return f"{model.replace('embedded:', '')} · {block} · t={t} · {kind}"


def train_hookpoint(run: HookpointRun, block: str, t: int, model: DiffusionModel | None = None,
                    dataset: ImageDataset | None = None, progress: bool = True) -> dict:
    """Train (or load) the SAE of one hookpoint; evaluate it and compute latent statistics on the held-out split."""
    if block not in run.store_blocks or t not in run.store_timesteps:
        raise ValueError(f"hookpoint ({block!r}, t={t}) is not in the store: blocks {run.store_blocks}, "
                         f"timesteps {run.store_timesteps}")
    model = model or load_model(run.model, train_steps=run.train_steps)
    dataset = dataset or load_dataset(run.dataset)
    train_store = features.extract_features(run.store_config(run.train_split), model=model, dataset=dataset,
                                            progress=progress)
    eval_store = features.extract_features(run.store_config(run.eval_split), model=model, dataset=dataset,
                                           progress=progress)
    cfg = copy.deepcopy(run.sae)
    cfg.sae.hookpoint, cfg.sae.timestep, cfg.sae.model_id = block, int(t), run.model
    sae_dir = artifacts.sae_dir(cfg, train_store, block, t)
    model_sae = sae.train_sae(train_store.array(block, t), cfg, sae_dir, progress=progress)

    eval_features = eval_store.array(block, t)
    metrics = sae.evaluate_sae(model_sae, eval_features)
    lat_dir = artifacts.latents_dir(sae_dir, eval_store, run.top_n)
    stats = latent_store.load_or_compute(  # only committed, intact statistics count as computed
        lat_dir, lambda: latents.latent_stats(model_sae, eval_features, eval_store.labels, top_n=run.top_n,
                                              image_index=eval_store.indices, class_names=eval_store.class_names,
                                              progress=progress))
    embedding_store = eval_store
    if run.pooling == MAP:  # the browser's 2-D view needs pooled vectors of the same images
        embedding_store = features.extract_features(run.store_config(run.eval_split, pooling=MEAN), model=model,
                                                    dataset=dataset, progress=progress)
    return {
        "hookpoint": label(run.model, block, t, run.pooling), "model": run.model, "block": block, "t": int(t),
        "pooling": run.pooling, "sae_dir": str(sae_dir), "latents_dir": str(lat_dir),
        "store_dir": str(eval_store.path), "embedding_store_dir": str(embedding_store.path),
        "dataset": run.dataset, "split": run.eval_split,
        "fvu": metrics["fvu"], "l0": metrics["l0"], "dead_fraction": metrics["dead_fraction"],
        "mean_purity": float(np.nanmean(stats.table["purity"])) if "purity" in stats.table else np.nan,
        "num_latents": metrics["num_latents"], "k": metrics["k"], "n_eval_tokens": metrics["n_tokens"],
        **hookpoint_taxonomy(run, model_sae, eval_store, eval_features, dataset, lat_dir, stats.scores),
        "_firing_frequency": metrics["firing_frequency"],
    }


def _taxonomy_config():
    from .taxonomy import TaxonomyConfig

    return TaxonomyConfig()


def taxonomy_dir(run: HookpointRun, lat_dir):
    """Where the taxonomy of a hookpoint's SAE is cached: beside its latent statistics, keyed by the config."""
    return artifacts.taxonomy_dir(lat_dir, run.taxonomy.validate())


def hookpoint_taxonomy(run: HookpointRun, model_sae, eval_store, eval_features, dataset, lat_dir,
                       scores: latent_store.ImageScores | None = None) -> dict:
    """Compute (or load) the taxonomy of one hookpoint's SAE on the eval split; the index columns it adds.

    ``scores``: the sparse image scores of the latent-statistics pass when it kept them
    (``latent_stats(..., keep_scores=True)``); otherwise the eval split is encoded again (about a second)."""
    from . import taxonomy

    if run.taxonomy is None:
        return {"taxonomy_path": ""}
    folder = taxonomy_dir(run, lat_dir)
    try:
        tax = taxonomy.Taxonomy.load(folder)
    except FileNotFoundError:
        labels, index = taxonomy.store_image_rows(eval_store)
        values = taxonomy.attribute_table(dataset, index, run.taxonomy.attributes)
        tax = taxonomy.sae_taxonomy(model_sae, eval_features, labels, values, eval_store.class_names,
                                    run.taxonomy, scores=scores)
        tax.save(folder)
    return {"taxonomy_path": str(folder / taxonomy.TABLE_FILE),
            **{f"n_{k}": int(v) for k, v in tax.counts().items()}}


def train_hookpoints(run: HookpointRun, hookpoints: list[tuple[str, int]], progress: bool = True,
                     model: DiffusionModel | None = None, dataset: ImageDataset | None = None) -> list[dict]:
    """:func:`train_hookpoint` for several (block, t) pairs sharing one model, dataset and stores (``model``: an
    already loaded model, e.g. :func:`revelio_nb.probes.random_init_model`, instead of loading ``run.model``)."""
    model = model or load_model(run.model, train_steps=run.train_steps)
    dataset = dataset or load_dataset(run.dataset)
    return [train_hookpoint(run, b, int(t), model=model, dataset=dataset, progress=progress) for b, t in hookpoints]


def write_index(run_dir, rows: list[dict]) -> pd.DataFrame:
    """Merge rows into ``<run_dir>/sae/hookpoints.csv`` (:meth:`HookpointIndex.write`: same hookpoint label
    replaced, under a file lock, atomically) and return the table."""
    return HookpointIndex(run_dir).write(rows)


def firing_table(rows: list[dict]) -> pd.DataFrame:
    """Long table (hookpoint, latent, firing_frequency) for histograms."""
    return pd.concat([pd.DataFrame({"hookpoint": r["hookpoint"], "latent": np.arange(len(r["_firing_frequency"])),
                                    "firing_frequency": r["_firing_frequency"]}) for r in rows], ignore_index=True)


def plot_summary(table: pd.DataFrame, firing: pd.DataFrame):
    """FVU, dead fraction and mean purity per hookpoint, plus firing-frequency histograms (log10)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    order = list(table.hookpoint)
    for ax, col, title in zip(axes, ["fvu", "dead_fraction", "mean_purity"],
                              ["FVU (held-out)", "dead fraction (held-out)", "mean purity of top images"]):
        sns.barplot(data=table, y="hookpoint", x=col, order=order, ax=ax, color="steelblue")
        ax.set_title(title)
        ax.set_ylabel("" if ax is not axes[0] else "hookpoint")
        if ax is not axes[0]:
            ax.set_yticklabels([])
    f = firing[firing.firing_frequency > 0].assign(log10_freq=lambda d: np.log10(d.firing_frequency))
    sns.histplot(data=f, x="log10_freq", hue="hookpoint", element="step", fill=False, bins=40, ax=axes[3], legend=False)
    axes[3].set_title("firing frequency (log10, live latents)")
    fig.tight_layout()
    return fig
