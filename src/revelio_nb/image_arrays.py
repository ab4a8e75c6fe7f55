"""Image batches as float arrays: the one conversion every image measurement starts from.

Images may be uint8 (N, H, W[, C]) in 0..255, or float (N, C, H, W) / (N, H, W, C) in [-1, 1] (the float range of
this package, what :func:`revelio_nb.sampling.sample` returns) or [0, 1], numpy or torch, with C in {1, 3} (the
channel axis is found by its size, the last axis first). :func:`to_rgb01` gives float32 (N, H, W, C) in [0, 1],
:func:`to_gray` its channel mean (N, H, W). Used by :mod:`revelio_nb.attributes` and :mod:`revelio_nb.captions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ImageArrayError(ValueError):
    """Images of a shape or range that cannot be read (the message names the shape and what is accepted)."""


def channels_last(images: Any, error: type[ValueError] = ImageArrayError) -> np.ndarray:
    """Any image batch as a numpy array (N, H, W, C), C in {1, 3} (the channel axis is found by its size, the last
    axis first); values untouched. Unreadable images raise ``error`` (a caller's own error class)."""
    try:
        import torch

        if torch.is_tensor(images):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise error(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {x.shape}")
    if x.shape[-1] not in (1, 3):
        if x.shape[1] in (1, 3):
            x = np.moveaxis(x, 1, -1)
        else:
            raise error(f"cannot tell the channel axis of images with shape {x.shape}: put C (1 or 3) first or last")
    return x


def scaled01(x: np.ndarray, error: type[ValueError] = ImageArrayError) -> np.ndarray:
    """Pixel values as float32 in [0, 1]: uint8 / 255; floats in [-1, 1] (the float range of this package) mapped
    to [0, 1], floats in [0, 1] kept, anything above 1 refused."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.size and x.min() < -1e-6:  # [-1, 1], the float range of this package
        x = (x + 1) / 2
    elif x.size and x.max() > 1.0 + 1e-6:
        raise error("float images must be in [-1, 1] (or [0, 1]); use uint8 for 0..255")
    return np.clip(x, 0.0, 1.0)


def to_rgb01(images: Any, error: type[ValueError] = ImageArrayError) -> np.ndarray:
    """Any image batch -> float32 (N, H, W, C) in [0, 1], C in {1, 3}."""
    return scaled01(channels_last(images, error), error)


def to_gray(images: Any, error: type[ValueError] = ImageArrayError) -> np.ndarray:
    """Any image batch -> float32 (N, H, W) in [0, 1], colour averaged (float images are averaged before their
    range is mapped, so the result is exactly what the silhouette measures were calibrated on)."""
    x = channels_last(images, error)
    if x.dtype == np.uint8:
        return scaled01(x, error).mean(-1)
    return scaled01(x.astype(np.float32).mean(-1), error)
