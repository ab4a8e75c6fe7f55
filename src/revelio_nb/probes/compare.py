"""Notebook 05's comparisons at equal budget (the paper's architecture / data / conditioning comparisons): each
:class:`ComparisonEntry` is a model probed on some data; :func:`compare_models` picks each model's best cell on
validation with a linear sweep, then runs linear + Diff-C there over seeds; :func:`comparison_summary` is the
table the README reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..data import load_dataset
from ..features import ExtractionConfig
from ..models import DiffusionModel, load_model
from ..pooling import MEAN
from . import columns as C
from .baselines import random_init_model
from .data import ProbeError
from .diffc import DiffCConfig
from .linear import LinearProbeConfig
from .summary import fmt_pm
from .sweep import best_cells, extract_splits, linear_sweep, main_blocks, probe_cells


@dataclass
class ComparisonEntry:
    """One model in a comparison: what it is, and on which data (classes) it is probed."""

    comparison: str  # e.g. "architecture"
    label: str  # e.g. "UNet"
    model: str  # "embedded:<name>" or "random:<name>"
    dataset: str = "animal-mnist"
    probe_classes: list[int] | None = None  # probe on these classes (labels re-numbered)
    train_steps: int | None = None  # override the embedded model's budget (smoke runs)


def on_datasets(entries: Sequence[ComparisonEntry], datasets: Sequence[str]) -> list[ComparisonEntry]:
    """Every entry probed on every dataset of ``datasets`` (the same model, trained once, read on each: Revelio
    probes one model on several datasets), dataset by dataset. Entries with ``probe_classes`` are refused: a class
    subset is specific to its dataset."""
    if not datasets:
        raise ProbeError("datasets is empty; give at least one, e.g. ['animal-mnist']")
    tied = [e.label for e in entries if e.probe_classes]
    if tied:
        raise ProbeError(f"entries {tied} probe a class subset of their own dataset; keep them out of on_datasets")
    return [replace(e, dataset=d) for d in datasets for e in entries]


def load_any(model_id: str, train_steps: int | None = None, seed: int = 0) -> DiffusionModel:
    """``embedded:<name>`` / folder / hub id through :func:`load_model`, or ``random:<name>`` (random init)."""
    if model_id.startswith("random:"):
        return random_init_model(model_id.split(":", 1)[1], seed=seed)
    return load_model(model_id, train_steps=train_steps)


def compare_models(entries: Sequence[ComparisonEntry], timesteps: Sequence[int] = (25, 100),
                   seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                   max_images: int | None = None, select_max_images: int | None = None,
                   linear: LinearProbeConfig | None = None, diffc: DiffCConfig | None = None,
                   vary_noise: bool = False, batch_size: int = 128, map_dtype: str = "float16",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each model: a linear sweep over its main blocks x ``timesteps`` (noise seed 0, pooled, train + val
    only) picks its best cell on validation; then linear + Diff-C at that cell over ``seeds`` (see
    :func:`probe_cells`). Returns (selection sweep rows, final rows), both tagged with comparison and label.

    ``select_max_images`` caps each split during the selection sweep; ``max_images`` caps the final runs, whose
    spatial maps are stored as ``map_dtype``. A model probed on the same data in several comparisons is computed
    once.
    """
    sweeps, runs, done = [], [], {}
    for e in tqdm(entries, desc="models", unit="model", disable=not progress):
        key = (e.model, e.dataset, tuple(e.probe_classes or ()), e.train_steps)
        if key not in done:
            model = load_any(e.model, e.train_steps)
            ds = load_dataset(e.dataset, classes=e.probe_classes)
            info = {"model": model.model_id, "dataset": ds.name, "train_steps": _train_steps(model)}
            sel_cap = select_max_images if select_max_images is not None else max_images
            base = ExtractionConfig(model=model.model_id, dataset=e.dataset, classes=e.probe_classes,
                                    blocks=main_blocks(model), timesteps=list(timesteps), pooling=MEAN,
                                    max_images=sel_cap, batch_size=batch_size, train_steps=e.train_steps)
            stores = extract_splits(base, model, ds, splits=("train", "val"), progress=progress)
            sw = linear_sweep(stores, cfg=linear, progress=progress).assign(**info)
            cell = best_cells(sw, 1)[0]
            final = replace(base, max_images=max_images, store_dtype=map_dtype)
            rn = probe_cells(model, final, [cell], seeds=seeds, methods=methods,
                             linear=linear, diffc=diffc, vary_noise=vary_noise, dataset=ds, progress=progress)
            done[key] = (sw, rn.assign(**info))
        sw, rn = done[key]
        sweeps.append(sw.assign(comparison=e.comparison, label=e.label))
        runs.append(rn.assign(comparison=e.comparison, label=e.label))
    return pd.concat(sweeps, ignore_index=True), pd.concat(runs, ignore_index=True)


def _train_steps(model: DiffusionModel) -> int:
    spec = model.info.get("spec") or {}
    if model.info.get("trained") is False:
        return 0
    return int((spec.get("train") or {}).get("steps", 0))


def comparison_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, probed dataset, model): its cell and linear / Diff-C test accuracy as
    "mean ± std" (%) (the columns of :data:`.columns.COMPARISON_SUMMARY_COLUMNS`, plus means, stds and seeds)."""
    rows = []
    for (comp, dataset, label), d in runs.groupby([C.COMPARISON, C.DATASET, C.LABEL], sort=False):
        row = {C.COMPARISON: comp, C.LABEL: label, C.MODEL: d[C.MODEL].iloc[0], C.DATASET: dataset,
               C.TRAIN_STEPS: int(d[C.TRAIN_STEPS].iloc[0]), C.BLOCK: d[C.BLOCK].iloc[0], C.T: int(d[C.T].iloc[0])}
        for m in (C.LINEAR, C.DIFFC):
            dm = d[d[C.METHOD] == m]
            acc = dm[C.TEST_ACC]
            row[m] = fmt_pm(acc.mean(), acc.std() if len(dm) > 1 else 0.0) if len(dm) else "n/a"
            row[f"{m}_mean"] = acc.mean() if len(dm) else float("nan")
            row[f"{m}_std"] = (acc.std() if len(dm) > 1 else 0.0) if len(dm) else float("nan")
            row[f"{m}_seeds"] = int(dm[C.SEED].nunique())
        rows.append(row)
    return pd.DataFrame(rows)
