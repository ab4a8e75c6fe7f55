"""Probes over the cells of a model: :func:`linear_sweep` (a linear probe for every block x timestep of some
stores), :func:`best_cells` (selection on validation, never on test) and :func:`probe_cells` (linear probe and
Diff-C at chosen cells over seeds; features extracted through :func:`extract_splits`).

Seeds: with ``vary_noise=True`` (the default of :func:`probe_cells`) seed ``s`` draws the noise of the feature
extraction (``ExtractionConfig.seed``) *and* the classifier's initialisation and batch order, so mean +- std
over seeds measures both sources of run-to-run variation; the linear probe is convex (deterministic given the
features), so its spread comes from the noise draws alone. With ``vary_noise=False`` the features come from one
noise draw, only Diff-C's seed varies, and the linear probe is fitted once (std 0, ``n_seeds`` 1).
Selection (``C``, early-stopping epoch, best block/timestep) only ever reads the validation split.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..data import ImageDataset, load_dataset
from ..features import ExtractionConfig, FeatureStore, extract_features, stratified_subset
from ..models import DiffusionModel, load_model
from ..pooling import MAP
from .data import SPLITS, ProbeError, probe_data
from .diffc import DiffCConfig, train_diffc
from .linear import LinearProbeConfig, fit_linear_probe


def main_blocks(model: DiffusionModel) -> list[str]:
    """The top-level blocks worth probing, in execution order: the UNet's down / mid / up blocks, or every
    transformer block (FLUX: double then single blocks); see the model's adapter."""
    return list(model.main_blocks)


def extract_splits(cfg: ExtractionConfig, model: DiffusionModel | None = None, dataset: ImageDataset | None = None,
                   splits: Sequence[str] = SPLITS, progress: bool = True) -> dict[str, FeatureStore]:
    """:func:`extract_features` for several splits of one config (cached; each split its own store)."""
    model = model or load_model(cfg.model, train_steps=cfg.train_steps, progress=progress)
    dataset = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    return {s: extract_features(replace(cfg, split=s), model=model, dataset=dataset, progress=progress) for s in splits}


def linear_sweep(stores: dict[str, FeatureStore], blocks: Sequence[str] | None = None,
                 timesteps: Sequence[int] | None = None, cfg: LinearProbeConfig | None = None,
                 max_train: int | None = None, seed: int = 0, progress: bool = True, **extra: Any) -> pd.DataFrame:
    """A linear probe for every (block, t) of the stores: one tidy row each (``C`` chosen on val per cell).

    ``max_train``: fit each probe on a seeded, class-stratified subset of that many training rows (the same rows
    for every cell), so a sweep can read the full stores of notebook 01 yet stay cheap; val / test stay whole.
    """
    blocks = list(blocks or stores["train"].blocks)
    timesteps = [int(t) for t in (timesteps or stores["train"].timesteps)]
    missing = [b for b in blocks if b not in stores["train"].blocks]
    if missing:
        raise ProbeError(f"blocks {missing} are not in the store; it holds {list(stores['train'].blocks)}")
    rows_sel = None
    if max_train is not None:
        if int(max_train) < 1:
            raise ProbeError(f"max_train must be None or a positive integer, got {max_train!r}")
        labels = stores["train"].labels
        rows_sel = np.sort(stratified_subset(np.arange(len(labels)), labels, int(max_train), seed))
    rows = []
    cells = [(b, t) for b in blocks for t in timesteps]
    for b, t in tqdm(cells, desc="linear probes", unit="cell", disable=not progress):
        data = probe_data(stores, (b, t))
        if rows_sel is not None:
            data = replace(data, x_train=np.asarray(data.x_train[rows_sel]), y_train=data.y_train[rows_sel])
        r = fit_linear_probe(data, cfg)
        rows.append(r.row(block=b, t=t, dim=int(stores["train"].array(b, t).shape[1]), **extra))
    return pd.DataFrame(rows)


def best_cells(df: pd.DataFrame, k: int = 1, metric: str = "val_acc") -> list[tuple[str, int]]:
    """The ``k`` best (block, t) cells by a validation metric (never by test)."""
    if metric.startswith("test"):
        raise ProbeError("cells are selected on validation, not on the test split; use metric='val_acc'")
    top = df.sort_values([metric, "t"], ascending=[False, True]).head(k)
    return [(str(b), int(t)) for b, t in zip(top["block"], top["t"])]


def probe_cells(model: DiffusionModel, base: ExtractionConfig, cells: Sequence[tuple[str, int]],
                seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                linear: LinearProbeConfig | None = None, diffc: DiffCConfig | None = None,
                vary_noise: bool = True, dataset: ImageDataset | None = None, progress: bool = True,
                **extra: Any) -> pd.DataFrame:
    """Linear probe and/or Diff-C at some (block, t) cells over seeds; one tidy row per (cell, method, seed).

    Spatial maps are extracted once per timestep into a cached store holding only the blocks needed there (so
    early exit applies). ``vary_noise=True``: seed ``s`` is also the noise seed of the extraction (features are
    re-extracted per seed) and the linear probe gets one row per seed. ``vary_noise=False``: features come from
    ``base.seed`` once; Diff-C varies its seed, and the linear probe, deterministic on fixed features, is fitted
    once (one row, std 0).
    """
    bad = [m for m in methods if m not in ("linear", "diffc")]
    if bad:
        raise ProbeError(f"unknown methods {bad}; valid: ['linear', 'diffc']")
    if not seeds:
        raise ProbeError("seeds is empty; give at least one (>= 3 for mean +- std)")
    dataset = dataset or load_dataset(base.dataset, classes=base.classes)
    by_t: dict[int, list[str]] = {}
    for b, t in cells:
        by_t.setdefault(int(t), []).append(b)
    rows = []
    for noise_seed in (seeds if vary_noise else [base.seed]):
        clf_seeds = [noise_seed] if vary_noise else list(seeds)
        for t, blocks in by_t.items():
            cfg = replace(base, blocks=sorted(set(blocks)), timesteps=[t], pooling=MAP, seed=int(noise_seed))
            stores = extract_splits(cfg, model, dataset, progress=progress)
            for b in blocks:
                d = probe_data(stores, (b, t))
                info = dict(block=b, t=t, model=model.model_id, noise_seed=int(noise_seed), **extra)
                if "linear" in methods:
                    r = fit_linear_probe(d, replace(linear or LinearProbeConfig(), seed=int(noise_seed)))
                    rows.append(r.row(**info))
                if "diffc" in methods:
                    for s in clf_seeds:
                        r = train_diffc(d, replace(diffc or DiffCConfig(), seed=int(s)), progress=progress)
                        rows.append(r.row(**info))
    return pd.DataFrame(rows)
