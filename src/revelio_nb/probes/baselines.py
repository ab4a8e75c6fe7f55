"""The baselines probes are judged against, on the same splits: raw pixels (:func:`pixel_probe_data`, for a logistic
regression and for the supervised CNN = the Diff-C architecture trained from scratch on pixels,
:func:`train_supervised_cnn`; both in :func:`baseline_runs`) and :func:`random_init_model` (the same denoiser
architecture with seeded random weights and no training: what training added).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import pandas as pd

from ..data import ImageDataset
from ..features import stratified_subset
from ..models import DiffusionModel
from ..pooling import FLAT
from .data import SPLITS, ProbeData, ProbeError, ProbeResult
from .diffc import DiffCConfig, train_diffc
from .linear import LinearProbeConfig, fit_linear_probe


def pixel_probe_data(dataset: ImageDataset, size: int = 32, max_images: int | None = None, seed: int = 0,
                     channels: int | None = None) -> ProbeData:
    """Raw pixels in [-1, 1] (N, C, size, size) of the dataset's three splits (same images a feature store sees).

    ``max_images`` takes the same seeded stratified subset of each split as :class:`ExtractionConfig` does.
    """
    xs, ys = {}, {}
    for s in SPLITS:
        idx = dataset.split(s)
        if max_images is not None:
            idx = stratified_subset(idx, dataset.labels[idx], max_images, seed)
        xs[s] = dataset.tensor(idx, size=size, channels=channels).numpy()
        ys[s] = dataset.labels[idx]
    return ProbeData(xs["train"], ys["train"], xs["val"], ys["val"], xs["test"], ys["test"],
                     name=f"pixels {size}x{size}", pool=FLAT, n_classes=len(dataset.class_names))


def train_supervised_cnn(pixels: ProbeData, cfg: DiffCConfig | None = None, progress: bool = True) -> ProbeResult:
    """The supervised reference: the same conv classifier trained from scratch on raw pixels."""
    if not pixels.spatial:
        raise ProbeError("the supervised CNN needs images (N, C, H, W); use pixel_probe_data()")
    return train_diffc(pixels, cfg, method="supervised CNN", progress=progress)


def random_init_model(name: str = "animals-unet", seed: int = 0) -> DiffusionModel:
    """The architecture of embedded model ``name`` with seeded random weights and no training
    (:func:`revelio_nb.models.random_init_model`; ``load_model("random:<name>")`` gives the same)."""
    from ..models import ModelLoadError
    from ..models import random_init_model as _random_init

    try:
        return _random_init(name, seed=seed)
    except ModelLoadError as e:
        raise ProbeError(str(e)) from e


def baseline_runs(dataset: ImageDataset, seeds: Sequence[int] = (0, 1, 2), size: int = 32,
                  max_images: int | None = None, linear: LinearProbeConfig | None = None,
                  cnn: DiffCConfig | None = None, progress: bool = True, **extra: Any) -> pd.DataFrame:
    """Pixel logistic regression (deterministic: fitted once, reported with std 0) and the supervised CNN
    from scratch over ``seeds``, on the same splits the probes use."""
    pix = pixel_probe_data(dataset, size=size, max_images=max_images)
    rows = [fit_linear_probe(pix, linear, method="pixels (logistic)").row(block="pixels", t=-1, **extra)]
    for seed in seeds:
        r = train_supervised_cnn(pix, replace(cnn or DiffCConfig(), seed=int(seed)), progress=progress)
        rows.append(r.row(block="pixels", t=-1, **extra))
    return pd.DataFrame(rows)
