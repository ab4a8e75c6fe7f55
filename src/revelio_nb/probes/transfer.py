"""Notebook 04's transfer study over a list of datasets: how much class information the blocks x timesteps of ONE
diffusion model hold on each dataset (as Revelio probes Stable Diffusion on several datasets), judged against the
same controls on the same splits: the architecture with random weights, pixels, a supervised CNN, and pretrained
vision encoders (CLIP, DINOv2, ...; :mod:`revelio_nb.encoders`).

Per dataset: :func:`linear_sweep` (a linear probe for every block x timestep; the dataset's pooled stores are
notebook 01's when the config matches, so they are read, not re-extracted), then :func:`probe_runs` (linear probe
and Diff-C at the cells best on validation, the random-init control at the same cells, the pixel baselines) and
:func:`encoder_runs` (linear probe on the encoders' pooled vectors, Diff-C on their patch grids). Every row carries
a ``dataset`` column, so one table (``probes.summarize(..., by=TABLE_KEYS)``; :mod:`.columns`) holds every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import pandas as pd

from ..data import ImageDataset, load_dataset
from ..encoders import BASE_BLOCKS, VisionEncoder, load_encoder
from ..features import ExtractionConfig
from ..models import DiffusionModel
from . import sweep as probe_sweep
from .baselines import baseline_runs
from .columns import PROBE_KEYS
from .data import ProbeError
from .diffc import DiffCConfig
from .plots import sweep_heatmap
from .sweep import best_cells, extract_splits, main_blocks, probe_cells
from .vision import encoder_runs as _encoder_runs

TABLE_KEYS = PROBE_KEYS  # one row of the summary table


@dataclass
class TransferConfig:
    """Sizes and budgets of notebook 04 (its parameters cell, field by field)."""

    blocks: list[str] | None = None  # None: the model's main blocks (main_blocks)
    timesteps: list[int] = field(default_factory=lambda: [0, 25, 50, 100, 250, 500, 750])
    sweep_max_images: int | None = None  # per-split cap of the sweep stores (None: whole splits = notebook 01's)
    sweep_max_train: int | None = 2000  # each sweep probe is fitted on a seeded stratified subset of the train rows
    max_images: int | None = None  # per-split cap for Diff-C, the control, the baselines and the encoders
    top_k: int = 1  # best cells (on validation) given to Diff-C
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    vary_noise: bool = False  # True: a seed also re-draws the extraction noise
    diffc_max_epochs: int = 10
    diffc_max_map_size: int | None = 16
    cnn_max_epochs: int | None = None  # the supervised CNN's epochs (None: diffc_max_epochs, the same recipe)
    batch_size: int = 64  # diffusion stores' chunk size (part of a store's identity: as notebook 01)
    map_dtype: str = "float16"  # spatial maps on disk
    train_steps: int | None = None  # embedded model's training budget override (smoke runs)
    encoder_blocks: list[str] = field(default_factory=lambda: list(BASE_BLOCKS))
    encoder_batch_size: int = 32
    encoder_precision: str = "fp32"  # "fp16" / "bf16" on a GPU

    def diffc(self) -> DiffCConfig:
        return DiffCConfig(max_epochs=self.diffc_max_epochs, max_map_size=self.diffc_max_map_size)


def _dataset(dataset: str | ImageDataset) -> ImageDataset:
    return dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)


def linear_sweep(model: DiffusionModel, dataset: str | ImageDataset, cfg: TransferConfig,
                 progress: bool = True) -> pd.DataFrame:
    """A linear probe for every block x timestep of the model on one dataset (pooled features, ``C`` chosen on
    validation per cell); rows tagged ``features="diffusion (trained)"`` and ``dataset``."""
    ds = _dataset(dataset)
    sweep_cfg = ExtractionConfig(model=model.model_id, dataset=ds.name, blocks=cfg.blocks or main_blocks(model),
                                 timesteps=list(cfg.timesteps), max_images=cfg.sweep_max_images,
                                 batch_size=cfg.batch_size, train_steps=cfg.train_steps)
    stores = extract_splits(sweep_cfg, model, ds, progress=progress)
    return probe_sweep.linear_sweep(stores, max_train=cfg.sweep_max_train, progress=progress,
                               features="diffusion (trained)", dataset=ds.name)


def probe_runs(model: DiffusionModel, dataset: str | ImageDataset, sweep: pd.DataFrame, cfg: TransferConfig,
               random_model: DiffusionModel | None = None, progress: bool = True) -> pd.DataFrame:
    """At the ``top_k`` cells of ``sweep`` best on validation: linear probe + Diff-C on the model's spatial maps
    over seeds; the same for ``random_model`` (the random-init control, same cells); the pixel logistic regression
    and the supervised CNN. One tidy row per (features, cell, method, seed), tagged with ``dataset``."""
    ds = _dataset(dataset)
    if "dataset" in sweep.columns and set(sweep["dataset"]) != {ds.name}:
        raise ProbeError(f"the sweep is of dataset(s) {sorted(set(sweep['dataset']))}, not {ds.name!r}")
    cells = best_cells(sweep, cfg.top_k)
    final = ExtractionConfig(model=model.model_id, dataset=ds.name, max_images=cfg.max_images,
                             batch_size=cfg.batch_size, train_steps=cfg.train_steps, store_dtype=cfg.map_dtype)
    common = dict(seeds=cfg.seeds, diffc=cfg.diffc(), vary_noise=cfg.vary_noise, dataset=ds, progress=progress)
    parts = [probe_cells(model, final, cells, features="diffusion (trained)", **common)]
    if random_model is not None:
        control = replace(final, model=random_model.model_id, train_steps=None)
        parts.append(probe_cells(random_model, control, cells, features="random init (same arch)", **common))
    cnn = DiffCConfig(max_epochs=cfg.cnn_max_epochs or cfg.diffc_max_epochs)
    parts.append(baseline_runs(ds, seeds=cfg.seeds, size=model.native_image_size, max_images=cfg.max_images,
                                      cnn=cnn, progress=progress, features="pixels"))
    return pd.concat(parts, ignore_index=True).assign(dataset=ds.name)


def encoder_runs(encoders: Sequence[str | VisionEncoder], datasets: Sequence[str | ImageDataset],
                 cfg: TransferConfig, progress: bool = True) -> pd.DataFrame:
    """Every encoder's rows (:func:`revelio_nb.probes.vision.encoder_runs`) on every dataset, with the notebook's sizes
    (same ``max_images`` subsets and Diff-C recipe as the diffusion rows). Empty when no encoder is given."""
    if not encoders:
        return pd.DataFrame(columns=[*TABLE_KEYS, "seed", "val_acc", "test_acc", "n_train", "n_test"])
    encs = [e if isinstance(e, VisionEncoder) else load_encoder(e) for e in encoders]
    rows = []
    for d in datasets:
        ds = _dataset(d)
        for enc in encs:
            rows.append(_encoder_runs(enc, ds, blocks=cfg.encoder_blocks, seeds=cfg.seeds, max_images=cfg.max_images,
                                      diffc=cfg.diffc(), batch_size=cfg.encoder_batch_size,
                                      store_dtype=cfg.map_dtype, precision=cfg.encoder_precision, progress=progress))
    return pd.concat(rows, ignore_index=True)


def sweep_heatmaps(sweep: pd.DataFrame):
    """Validation (selection) and test accuracy heatmaps of the linear sweep, one row of panels per dataset."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(sweep["dataset"])) if "dataset" in sweep.columns else [None]
    n_blocks = sweep["block"].nunique()
    fig, axes = plt.subplots(len(names), 2, figsize=(15, (0.8 + 0.5 * n_blocks) * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        d = sweep if name is None else sweep[sweep["dataset"] == name]
        tag = "" if name is None else f"{name}: "
        sweep_heatmap(d, "val_acc", f"{tag}linear probe, validation accuracy (selection)", ax=row[0])
        sweep_heatmap(d, "test_acc", f"{tag}linear probe, test accuracy", ax=row[1])
    fig.tight_layout()
    return fig
