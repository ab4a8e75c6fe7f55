"""Attributes measured on the images themselves: one registry, any dataset (grayscale or RGB, any size).

Every attribute is a function of a batch of images that returns one float per image, or NaN where it is undefined
for that image (e.g. a hue on a colourless image, a silhouette measure on a photo without a dark background).
:func:`measure` runs several at once and **skips** (reports, never raises on) an attribute that is undefined on the
whole batch: NaN on more than half of the images, or constant (saturation on a grayscale dataset is 0 everywhere).

=============  ===========  ============================================================================
name           group        what it measures
=============  ===========  ============================================================================
size           geometry     :func:`revelio_nb.captions.silhouette_area`: foreground area fraction
shape          pose         :func:`revelio_nb.captions.aspect_ratio`: log(width / height) of the box
facing         pose         :func:`revelio_nb.captions.facing`: head side (> 0 right, < 0 left)
tilt           pose         principal-axis tilt of the silhouette: sin(2 angle) x elongation
                            (> 0 rising to the right, < 0 falling; 0 for round or axis-aligned)
centroid_x     position     foreground centroid, 0 = left edge, 1 = right edge
centroid_y     position     foreground centroid, 0 = top edge, 1 = bottom edge
texture        texture      :func:`revelio_nb.captions.texture`: dark pixels inside the silhouette
high_freq      texture      share of the (mean-removed) luminance power spectrum above half the Nyquist
                            radius: fine detail, stripes, noise
edge_density   texture      fraction of pixels whose luminance gradient (Sobel) exceeds 0.1 per pixel
brightness     colour       mean luminance (Rec. 601 luma of RGB; the intensity of grayscale)
contrast       colour       standard deviation of the luminance (RMS contrast)
saturation     colour       mean HSV saturation (max - min) / max over the pixels (RGB only)
hue_cos        colour       cos of the dominant hue: saturation-weighted circular mean over colourful
hue_sin        colour       pixels (saturation >= 0.2, value >= 0.1), as two coordinates (hue is circular)
=============  ===========  ============================================================================

The order is a priority: where two attributes measure nearly the same thing on a dataset (on Animal-MNIST the
mean brightness of a silhouette is its area, its tilt is its facing), :mod:`revelio_nb.taxonomy` keeps the first.

Silhouette measures (``size``, ``centroid_*``, ``shape``, ``tilt``, ``facing``, ``texture``) reuse the
measurements of :mod:`revelio_nb.captions` (bright object on a dark background, largest 8-connected component of
the pixels brighter than 40/255). They are defined only where such a foreground exists: the image's outer ring of
pixels is dark (mean luminance below the foreground threshold) and the foreground is not empty; elsewhere NaN.
So they work on Animal-MNIST and digits and are skipped on photographs.

Images may be uint8 (N, H, W[, C]) in 0..255, or float (N, C, H, W) / (N, H, W, C) in [-1, 1] or [0, 1], numpy
or torch (C in {1, 3}); :func:`revelio_nb.image_arrays.to_rgb01` is the one conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import captions
from .image_arrays import to_rgb01

GROUPS = ("geometry", "pose", "position", "texture", "colour")
MAX_NAN_FRACTION = 0.5  # an attribute NaN on more images than this is undefined on the batch


class AttributeMeasureError(ValueError):
    """An unknown attribute name or unreadable images (the message names the value and the choices)."""


@dataclass(frozen=True)
class AttributeSpec:
    """One measured attribute: a function images -> (N,) float with NaN where undefined, and its group."""

    name: str
    group: str
    fn: Callable[[np.ndarray], np.ndarray]
    description: str


def luminance(images: Any) -> np.ndarray:
    """(N, H, W) luminance in [0, 1]: Rec. 601 luma of RGB, the intensity itself for grayscale."""
    x = to_rgb01(images, AttributeMeasureError)
    if x.shape[-1] == 1:
        return x[..., 0]
    return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue angle (radians), saturation and value of (N, H, W, 3) RGB in [0, 1]."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    c = v - x.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    cc = np.maximum(c, 1e-12)
    h = np.where(v == r, ((g - b) / cc) % 6, np.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4))
    return h * (np.pi / 3), s, v


# --------------------------------------------------------------------------------------------- tone
def brightness(images: Any) -> np.ndarray:
    """Mean luminance of the image (0 black .. 1 white). Defined for every image."""
    return luminance(images).mean((1, 2)).astype(np.float64)


def contrast(images: Any) -> np.ndarray:
    """Standard deviation of the luminance over the pixels (RMS contrast). Defined for every image."""
    return luminance(images).std((1, 2)).astype(np.float64)


# --------------------------------------------------------------------------------------------- colour
def saturation(images: Any) -> np.ndarray:
    """Mean HSV saturation (max - min) / max over the pixels (0 for gray pixels). NaN for grayscale images (one
    channel), so a grayscale dataset reports it undefined; an RGB image whose channels are equal gives 0."""
    x = to_rgb01(images, AttributeMeasureError)
    if x.shape[-1] == 1:
        return np.full(len(x), np.nan)
    return _hsv(x)[1].mean((1, 2)).astype(np.float64)


def _dominant_hue(images: Any, min_saturation: float = 0.2, min_value: float = 0.1) -> np.ndarray:
    """Saturation-weighted circular mean hue angle over the colourful pixels; NaN where there are none."""
    x = to_rgb01(images, AttributeMeasureError)
    if x.shape[-1] == 1:
        return np.full(len(x), np.nan)
    h, s, v = _hsv(x)
    w = s * ((s >= min_saturation) & (v >= min_value))
    cs, sn = (w * np.cos(h)).sum((1, 2)), (w * np.sin(h)).sum((1, 2))
    ok = (w.sum((1, 2)) > 0) & (np.hypot(cs, sn) > 1e-9)
    return np.where(ok, np.arctan2(sn, cs), np.nan)


def hue_cos(images: Any) -> np.ndarray:
    """cos of the dominant hue angle (1 = red, -1 = cyan): saturation-weighted circular mean over pixels with
    saturation >= 0.2 and value >= 0.1. NaN for grayscale images and images without colourful pixels."""
    return np.cos(_dominant_hue(images))


def hue_sin(images: Any) -> np.ndarray:
    """sin of the dominant hue angle (1 = between yellow and green at 90 degrees, -1 = violet at 270 degrees);
    with :func:`hue_cos` it places the hue on the colour circle. NaN where :func:`hue_cos` is."""
    return np.sin(_dominant_hue(images))


# --------------------------------------------------------------------------------------------- texture
def high_freq(images: Any) -> np.ndarray:
    """Share of the luminance power spectrum (mean removed) at radial frequencies above half the Nyquist
    frequency: high for stripes, fine texture and noise, low for smooth shapes. NaN for constant images."""
    g = luminance(images).astype(np.float64)
    g = g - g.mean((1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(g.shape[1])[:, None]
    fx = np.fft.fftfreq(g.shape[2])[None, :]
    high = np.hypot(fy, fx) > 0.25  # Nyquist = 0.5 cycles / pixel
    tot = p.sum((1, 2))
    return np.where(tot > 1e-12, (p * high).sum((1, 2)) / np.maximum(tot, 1e-12), np.nan)


def edge_density(images: Any, gradient: float = 0.1) -> np.ndarray:
    """Fraction of pixels where the luminance gradient (Sobel, normalised by 8 to luminance per pixel) exceeds
    ``gradient`` (0.1: a step of 0.2 between neighbours). Defined for every image (0 if flat)."""
    from scipy.ndimage import correlate

    g = luminance(images).astype(np.float64)
    kx = np.array([[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]], dtype=np.float64) / 8  # per image: no mixing across N
    gx = correlate(g, kx, mode="nearest")
    gy = correlate(g, np.transpose(kx, (0, 2, 1)), mode="nearest")
    return (np.hypot(gx, gy) > gradient).mean((1, 2))


# --------------------------------------------------------------------------------------------- silhouettes
def silhouette_defined(images: Any) -> np.ndarray:
    """Whether each image has a measurable silhouette: a dark outer ring of pixels (mean luminance below the
    foreground threshold of :mod:`revelio_nb.captions`) and a non-empty foreground."""
    g = luminance(images)
    ring = np.concatenate([g[:, 0, :], g[:, -1, :], g[:, :, 0], g[:, :, -1]], axis=1)
    dark = ring.mean(1) < captions.FOREGROUND_THRESHOLD
    return dark & (g > captions.FOREGROUND_THRESHOLD).any((1, 2))


def _gray(images: Any) -> np.ndarray:
    """Luminance as float (N, H, W) in [0, 1]: the input the silhouette measures of captions accept."""
    return luminance(images)


def _where_silhouette(images: Any, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    g = _gray(images)
    ok = silhouette_defined(g)
    out = np.full(len(g), np.nan)
    if ok.any():
        out[ok] = fn(g[ok])
    return out


def size(images: Any) -> np.ndarray:
    """Foreground area as a fraction of the image (:func:`revelio_nb.captions.silhouette_area`). NaN where no
    silhouette is defined (:func:`silhouette_defined`)."""
    return _where_silhouette(images, captions.silhouette_area)


def shape(images: Any) -> np.ndarray:
    """log(width / height) of the silhouette's bounding box (:func:`revelio_nb.captions.aspect_ratio`; > 0 wide,
    < 0 tall). NaN where no silhouette is defined."""
    return _where_silhouette(images, captions.aspect_ratio)


def texture(images: Any) -> np.ndarray:
    """Mean darkness inside the eroded silhouette (:func:`revelio_nb.captions.texture`: stripes, spots). NaN where
    no silhouette is defined."""
    return _where_silhouette(images, captions.texture)


def facing(images: Any) -> np.ndarray:
    """Side the head points to (:func:`revelio_nb.captions.facing`: > 0 right, < 0 left; mirroring flips the
    sign). NaN where no silhouette is defined."""
    return _where_silhouette(images, captions.facing)


def _moments(g: np.ndarray) -> tuple[np.ndarray, ...]:
    m = captions.foreground(g).astype(np.float64)
    n, h, w = m.shape
    area = np.maximum(m.sum((1, 2)), 1)
    ys = np.arange(h, dtype=np.float64)[None, :, None]
    xs = np.arange(w, dtype=np.float64)[None, None, :]
    cy, cx = (m * ys).sum((1, 2)) / area, (m * xs).sum((1, 2)) / area
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    mxx, myy, mxy = (m * dx * dx).sum((1, 2)) / area, (m * dy * dy).sum((1, 2)) / area, (m * dx * dy).sum((1, 2)) / area
    return cx / max(w - 1, 1), cy / max(h - 1, 1), mxx, myy, mxy


def centroid_x(images: Any) -> np.ndarray:
    """x of the silhouette's centroid, 0 = left edge .. 1 = right edge. NaN where no silhouette is defined."""
    return _where_silhouette(images, lambda g: _moments(g)[0])


def centroid_y(images: Any) -> np.ndarray:
    """y of the silhouette's centroid, 0 = top edge .. 1 = bottom edge. NaN where no silhouette is defined."""
    return _where_silhouette(images, lambda g: _moments(g)[1])


def tilt(images: Any) -> np.ndarray:
    """Tilt of the silhouette's principal axis: sin(2 angle) x elongation, from its second moments. Positive when
    the long axis rises to the right (/), negative when it falls (\\), 0 for round or axis-aligned shapes (the
    horizontal / vertical part is :func:`shape`). In [-1, 1]. NaN where no silhouette is defined."""
    def fn(g):
        _, _, mxx, myy, mxy = _moments(g)
        tr = mxx + myy
        # image y points down, so a long axis rising to the right has negative xy covariance
        return np.where(tr > 0, -2 * mxy / np.maximum(tr, 1e-12), 0.0)
    return _where_silhouette(images, fn)


# --------------------------------------------------------------------------------------------- registry
def _spec(name: str, group: str, fn: Callable) -> AttributeSpec:
    return AttributeSpec(name, group, fn, (fn.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "))


ATTRIBUTES: dict[str, AttributeSpec] = {s.name: s for s in [
    _spec("size", "geometry", size),
    _spec("shape", "pose", shape),
    _spec("facing", "pose", facing),
    _spec("tilt", "pose", tilt),
    _spec("centroid_x", "position", centroid_x),
    _spec("centroid_y", "position", centroid_y),
    _spec("texture", "texture", texture),
    _spec("high_freq", "texture", high_freq),
    _spec("edge_density", "texture", edge_density),
    _spec("brightness", "colour", brightness),
    _spec("contrast", "colour", contrast),
    _spec("saturation", "colour", saturation),
    _spec("hue_cos", "colour", hue_cos),
    _spec("hue_sin", "colour", hue_sin),
]}


def check_names(names: Sequence[str] | None) -> list[str]:
    """The attribute names to measure (all when None); unknown names are an error listing the valid ones."""
    names = list(ATTRIBUTES) if names is None else list(names)
    bad = [n for n in names if n not in ATTRIBUTES]
    if bad or not names:
        raise AttributeMeasureError(f"unknown attributes {bad}; valid: {list(ATTRIBUTES)}")
    return names


def undefined_reason(values: np.ndarray, max_nan_fraction: float = MAX_NAN_FRACTION) -> str:
    """Why an attribute's values on a batch carry no information ('' if they do)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return "no images"
    nan = ~np.isfinite(v)
    if nan.mean() > max_nan_fraction:
        return f"undefined on {nan.mean():.0%} of the images"
    fin = v[~nan]
    if len(fin) < 2 or np.ptp(fin) <= 1e-9 * max(1.0, float(np.abs(fin).max())):
        return "constant on these images"
    return ""


def measure(images: Any, names: Sequence[str] | None = None, keep_undefined: bool = False,
            max_nan_fraction: float = MAX_NAN_FRACTION) -> pd.DataFrame:
    """One column per attribute with its value for each image (NaN where undefined for that image).

    Attributes undefined on the whole batch (NaN on more than ``max_nan_fraction`` of the images, or constant) are
    dropped unless ``keep_undefined``; ``df.attrs["undefined"]`` maps each of them to the reason, never an error.
    """
    names = check_names(names)
    x = to_rgb01(images, AttributeMeasureError)
    cols, undefined = {}, {}
    for n in names:
        v = np.asarray(ATTRIBUTES[n].fn(x), dtype=np.float64)
        why = undefined_reason(v, max_nan_fraction)
        if why:
            undefined[n] = why
        if keep_undefined or not why:
            cols[n] = v
    df = pd.DataFrame(cols, index=pd.RangeIndex(len(x)))
    df.attrs["undefined"] = undefined
    return df


def describe(names: Sequence[str] | None = None) -> pd.DataFrame:
    """The registry as a table: name, group, what it measures (first paragraph of each docstring)."""
    return pd.DataFrame([{"attribute": n, "group": ATTRIBUTES[n].group, "measures": ATTRIBUTES[n].description}
                         for n in check_names(names)])


def measure_dataset(dataset, indices: np.ndarray, names: Sequence[str] | None = None,
                    batch_size: int = 4096) -> pd.DataFrame:
    """:func:`measure` on dataset images ``dataset.images[indices]`` in batches (the stored images, at their own
    size), with the attributes undefined on the whole selection dropped (``attrs["undefined"]``)."""
    idx = np.asarray(indices, dtype=np.int64)
    parts = [measure(dataset.images[idx[s:s + batch_size]], names, keep_undefined=True)
             for s in range(0, len(idx), batch_size)]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=check_names(names))
    undefined = {c: why for c in df.columns if (why := undefined_reason(df[c].to_numpy()))}
    df = df.drop(columns=list(undefined))
    df.attrs["undefined"] = undefined
    return df


def drop_redundant(values: pd.DataFrame, max_abs_rho: float = 0.9) -> tuple[pd.DataFrame, dict[str, str]]:
    """Drop each attribute whose |Spearman rho| with an attribute kept before it (column order = priority)
    exceeds ``max_abs_rho`` on these images. Returns the kept columns and {dropped: "<kept> (rho=...)"}."""
    if not 0 < max_abs_rho <= 1:
        raise AttributeMeasureError(f"max_abs_rho must be in (0, 1], got {max_abs_rho}")
    rho = values.corr(method="spearman").abs() if values.shape[1] else pd.DataFrame()
    kept, dropped = [], {}
    for c in values.columns:
        hit = [k for k in kept if np.isfinite(rho.at[c, k]) and rho.at[c, k] > max_abs_rho]
        if hit:
            dropped[c] = f"{hit[0]} (rho={rho.at[c, hit[0]]:.2f})"
        else:
            kept.append(c)
    out = values[kept].copy()
    out.attrs = dict(values.attrs)
    return out, dropped
