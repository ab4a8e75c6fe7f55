"""Vision encoders as probe baselines (the paper's CLIP / DINOv2 / ... rows): :func:`encoder_runs` extracts an
encoder's features on a dataset's three splits (:mod:`revelio_nb.encoders`) and fits the same probes as on diffusion
features: a linear probe on every pooled block, Diff-C on every grid block.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import pandas as pd

from ..data import ImageDataset, load_dataset
from ..encoders import (BASE_BLOCKS, NO_TIMESTEP, EncoderExtractionConfig, VisionEncoder, extract_encoder_splits,
                        load_encoder)
from .data import ProbeError, probe_data
from .diffc import DiffCConfig, train_diffc
from .linear import LinearProbeConfig, fit_linear_probe


def encoder_runs(encoder: str | VisionEncoder, dataset: str | ImageDataset, blocks: Sequence[str] = BASE_BLOCKS,
                 seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                 max_images: int | None = None, linear=None, diffc=None, batch_size: int = 32,
                 store_dtype: str = "float16", precision: str = "fp32", device: str = "auto", progress: bool = True,
                 **extra: Any):
    """The encoder's rows of the transfer table, on the dataset's train / val / test splits (the splits the
    diffusion probes use; ``max_images``: the same seeded stratified subset per split).

    A linear probe (``C`` chosen on validation) on every pooled block: ``cls``, ``mean``, and the spatial mean of
    each ``layers.N`` grid (the ``patch`` grid's mean *is* ``mean``, so it is fitted only when ``mean`` is not asked
    for); features are deterministic, so it is fitted once. Diff-C on every grid block (``patch``, ``layers.N``),
    once per seed. One tidy row per (block, method, seed) with ``features = "encoder: <name>"``,
    ``t = NO_TIMESTEP``, ``dataset`` and ``model``.
    """
    bad = [m for m in methods if m not in ("linear", "diffc")]
    if bad:
        raise ProbeError(f"unknown methods {bad}; valid: ['linear', 'diffc']")
    enc = encoder if isinstance(encoder, VisionEncoder) else load_encoder(encoder)
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    blocks = enc.check_blocks(blocks)
    cfg = EncoderExtractionConfig(encoder=enc.encoder_id, dataset=ds.name, blocks=blocks, max_images=max_images,
                                  batch_size=batch_size, store_dtype=store_dtype, precision=precision, device=device)
    stores = extract_encoder_splits(cfg, enc, ds, progress=progress)
    info = {"features": f"encoder: {enc.name}", "model": enc.encoder_id, "dataset": ds.name, **extra}
    rows = []
    for b in blocks:
        d = probe_data(stores, (b, NO_TIMESTEP))
        if "linear" in methods and (not d.spatial or b != "patch" or "mean" not in blocks):
            rows.append(fit_linear_probe(d, linear or LinearProbeConfig()).row(block=b, t=NO_TIMESTEP, **info))
        if "diffc" in methods and d.spatial:
            for s in seeds:
                r = train_diffc(d, replace(diffc or DiffCConfig(), seed=int(s)), progress=progress)
                rows.append(r.row(block=b, t=NO_TIMESTEP, **info))
    return pd.DataFrame(rows)
