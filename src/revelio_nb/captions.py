"""Attributes measured on each image, captions built from them, and the ground truth of their associations.

The text-conditioned embedded model (``embedded:animals-unet-text``) is trained on Animal-MNIST with captions
such as ``"a drawing of a large wide plain cow facing left"``. Every attribute word is *measured* on the image
by the functions here (never guessed):

==========  =====================  ===================================================================
attribute   words (high / low)     measurement on the silhouette (pixels brighter than 40/255, largest
                                   8-connected component)
==========  =====================  ===================================================================
size        large / small          foreground area as a fraction of the image
shape       wide / tall            log of bounding-box width / height
texture     textured / plain       mean darkness inside the eroded silhouette (stripes, spots)
facing      right / left           x-offset of the top part of the silhouette (the head, usually the
                                   highest part) from the silhouette's centre, over the box width
==========  =====================  ===================================================================

Thresholds are quantiles of each attribute on the training split: tertiles (bottom third -> low word, top third
-> high word, middle third -> no word), except texture, where "textured" is the top 20 % and "plain" the bottom
half (so the word means visible stripes or spots). A word that applies is then written with a seeded
probability (``p_mention``), so a caption carries some attributes and omits others. Because the omitted ones
still follow each class's own distribution, a neutral prompt ("a drawing of a cow") inherits the class's
default association, which is what the Decoding Diffusion bias analysis measures. The rate table of the words
actually written in the captions (:func:`ground_truth`) is the ground truth that analysis is checked against.

Size, shape and texture carry the data's natural class associations (elephants large, giraffes tall, zebras
textured). Facing has none in the raw data (every class faces right 32-60 % of the time), so the text model is
trained on ``"animal-mnist+facing"``: the same images, some mirrored, so that each class faces right at a planted
rate (:func:`plant_facing`, :data:`PLANTED_FACING_RIGHT`); its captions are measured like all others.

Images may be uint8 (N, H, W[, C]) in 0..255 or float in [-1, 1] as (N, C, H, W) tensors/arrays (what
:func:`revelio_nb.sampling.sample` returns) or (N, H, W, C) arrays (read by
:func:`revelio_nb.image_arrays.to_gray`). Measure training images and generated images at the same size (the model
sees 28x28 Animal-MNIST padded to 32x32, so captions are measured on the padded images).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .image_arrays import to_gray

FOREGROUND_THRESHOLD = 40 / 255  # silhouettes are bright on black; zebra stripes stay above this


@dataclass(frozen=True)
class Attribute:
    """A measured attribute: a function of the images and the words for its high / low ends."""

    name: str
    high: str
    low: str
    measure: Callable[[np.ndarray], np.ndarray]
    phrase: str = "{word}"  # how the word is written in a caption ("facing {word}")
    slot: str = "pre"  # "pre": before the class noun; "post": after it
    quantiles: tuple[float, float] = (1 / 3, 2 / 3)  # training-split quantiles: below -> low word, above -> high
    mirror: int = 1  # mirror parity: +1 the value survives a left-right mirror of the image, -1 it flips sign

    @property
    def words(self) -> tuple[str, str]:
        return (self.high, self.low)


# ------------------------------------------------------------------------------------------ measurements


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 8-connected component of each (H, W) mask in a batch (N, H, W)."""
    from scipy.ndimage import label

    out = np.zeros_like(mask, dtype=bool)
    eight = np.ones((3, 3), bool)
    for i, m in enumerate(mask):
        lab, n = label(m, structure=eight)
        if n == 1:
            out[i] = m
        elif n > 1:
            out[i] = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return out


def foreground(images: Any, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Boolean silhouette masks (N, H, W): pixels above ``threshold``, largest 8-connected component only (so
    stray specks of generated images do not stretch the bounding box or add area)."""
    return largest_component(to_gray(images) > threshold)


def _boxes(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-image bounding boxes (top, bottom, left, right; inclusive) and whether the mask is non-empty."""
    rows, cols = mask.any(2), mask.any(1)
    h, w = mask.shape[1:]
    nonempty = rows.any(1)
    top = np.where(nonempty, rows.argmax(1), 0)
    bottom = np.where(nonempty, h - 1 - rows[:, ::-1].argmax(1), h - 1)
    left = np.where(nonempty, cols.argmax(1), 0)
    right = np.where(nonempty, w - 1 - cols[:, ::-1].argmax(1), w - 1)
    return top, bottom, left, right, nonempty


def silhouette_area(images: Any) -> np.ndarray:
    """Fraction of the image covered by the silhouette (``large`` vs ``small``)."""
    m = foreground(images)
    return m.mean((1, 2))


def aspect_ratio(images: Any) -> np.ndarray:
    """log(width / height) of the silhouette's bounding box (``wide`` > 0 > ``tall``); 0 for empty images."""
    m = foreground(images)
    top, bottom, left, right, nonempty = _boxes(m)
    return np.where(nonempty, np.log((right - left + 1) / (bottom - top + 1)), 0.0)


def texture(images: Any) -> np.ndarray:
    """Mean darkness (1 - intensity) inside the silhouette, away from its outline (``textured`` vs ``plain``).

    Plain silhouettes are uniformly bright inside; stripes and spots (zebras, giraffes) leave dark pixels within
    the eroded mask. Anti-aliased outlines are excluded by a 3x3 erosion; 0 for images with no interior.
    """
    from scipy.ndimage import binary_erosion

    g = to_gray(images)
    inner = binary_erosion(largest_component(g > FOREGROUND_THRESHOLD), structure=np.ones((1, 3, 3), bool))
    n = inner.sum((1, 2))
    return np.where(n > 0, ((1.0 - g) * inner).sum((1, 2)) / np.maximum(n, 1), 0.0)


def facing(images: Any, head_fraction: float = 0.35) -> np.ndarray:
    """Where the head is: x-centroid of the top ``head_fraction`` of the silhouette minus the x-centroid of the
    whole silhouette, over the box width (> 0: ``facing right``, < 0: ``facing left``).

    Side-on animals carry their head higher than their body, so the upper part of the silhouette leans towards
    the side the animal faces. Mirroring an image flips the sign exactly.
    """
    m = foreground(images).astype(np.float64)
    top, bottom, left, right, nonempty = _boxes(m > 0)
    n, h, w = m.shape
    ys = np.arange(h)[None, :, None]
    xs = np.arange(w, dtype=np.float64)[None, None, :]
    cut = top + head_fraction * (bottom - top + 1)
    upper = m * (ys < cut[:, None, None])
    centre = (m * xs).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1)
    head = (upper * xs).sum((1, 2)) / np.maximum(upper.sum((1, 2)), 1)
    width = (right - left + 1).astype(np.float64)
    return np.where(nonempty, (head - centre) / width, 0.0)


ATTRIBUTES: dict[str, Attribute] = {
    "size": Attribute("size", "large", "small", silhouette_area),
    "shape": Attribute("shape", "wide", "tall", aspect_ratio),
    "texture": Attribute("texture", "textured", "plain", texture, quantiles=(0.5, 0.8)),
    "facing": Attribute("facing", "right", "left", facing, phrase="facing {word}", slot="post", mirror=-1),
}


# ------------------------------------------------------------------------------------------ planted associations

# Share of right-facing images per Animal-MNIST class in the "+facing" variant of the dataset. The natural data has
# no class-facing association (every class faces right 32-60 % of the time), so without planting there is nothing
# for a bias analysis to recover; these rates spread 0.1..0.9 in an order unrelated to size, shape or texture.
PLANTED_FACING_RIGHT: dict[str, float] = {
    "bear": 0.7, "bird": 0.2, "cat": 0.9, "cow": 0.3, "dog": 0.55,
    "elephant": 0.1, "giraffe": 0.8, "horse": 0.4, "sheep": 0.6, "zebra": 0.45,
}


def plant_facing(ds, right_rates: dict[str, float] | None = None, seed: int = 0):
    """The dataset with a planted class-facing association: each image is mirrored when needed so that it faces
    right with its class's probability (``right_rates``, default :data:`PLANTED_FACING_RIGHT`).

    For every image a seeded draw picks the side it should face; an image whose measured :func:`facing` points
    the other way is mirrored (mirroring flips the measured sign exactly), one with no measurable side (0) is
    kept. Images stay real silhouettes, labels and splits are unchanged, and the captions are then *measured* on
    the planted images as on any others, so the ground truth stays the rate in the captions.
    """
    rates = dict(PLANTED_FACING_RIGHT if right_rates is None else right_rates)
    missing = [c for c in ds.class_names if c not in rates]
    bad = {c: r for c, r in rates.items() if not 0.0 <= float(r) <= 1.0}
    if missing or bad:
        raise ValueError(f"right_rates must give a probability in [0, 1] for every class of {ds.name!r}; "
                         f"missing: {missing}, out of range: {bad}; classes: {ds.class_names}")
    p_right = np.array([float(rates[c]) for c in ds.class_names])[ds.labels]
    want_right = np.random.default_rng(seed).random(len(ds)) < p_right
    v = facing(ds.images)
    flip = (v != 0) & ((v > 0) != want_right)
    images = ds.images.copy()
    images[flip] = images[flip][:, :, ::-1]
    return replace(ds, name=f"{ds.name}+facing", images=images, labels=ds.labels.copy())


# "<dataset>+<name>" in :func:`revelio_nb.data.load_dataset` applies PLANTS[name] to the dataset
PLANTS: dict[str, Callable[..., Any]] = {"facing": plant_facing}


def _check_attributes(names: list[str] | tuple[str, ...] | None) -> list[str]:
    names = list(ATTRIBUTES) if names is None else list(names)
    bad = [a for a in names if a not in ATTRIBUTES]
    if bad or not names:
        raise ValueError(f"unknown attributes {bad}; valid: {list(ATTRIBUTES)}")
    return names


def measure(images: Any, attributes: list[str] | None = None) -> pd.DataFrame:
    """One column per attribute with its continuous value for each image."""
    return pd.DataFrame({a: ATTRIBUTES[a].measure(images) for a in _check_attributes(attributes)})


# ------------------------------------------------------------------------------------------ captions


@dataclass
class CaptionConfig:
    """How captions are written from measured attributes."""

    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    quantiles: tuple[float, float] | None = None  # one (low, high) pair for all attributes; None: each its own
    p_mention: float = 0.8  # probability that an applicable attribute word is written
    template: str = "a drawing of a {pre}{noun}{post}"
    image_size: int = 32  # measure on the images the model is trained on (28 -> 32 padding)
    seed: int = 0

    def validate(self) -> "CaptionConfig":
        self.attributes = _check_attributes(self.attributes)
        for lo, hi in [self.quantiles] if self.quantiles is not None else [ATTRIBUTES[a].quantiles for a in self.attributes]:
            if not 0 < lo <= hi < 1:
                raise ValueError(f"quantiles must satisfy 0 < low <= high < 1, got {(lo, hi)}")
        if not 0 <= self.p_mention <= 1:
            raise ValueError(f"p_mention must be in [0, 1], got {self.p_mention}")
        return self


def neutral_prompt(noun: str, template: str = CaptionConfig.template) -> str:
    """The caption of a class with no attribute word: ``"a drawing of a cat"``."""
    return template.format(pre="", noun=noun, post="")


def attribute_prompt(noun: str, attribute: str, word: str, template: str = CaptionConfig.template) -> str:
    """A caption with exactly one attribute word: ``"a drawing of a large cat"``, ``"a drawing of a cat facing left"``."""
    a = ATTRIBUTES[_check_attributes([attribute])[0]]
    if word not in a.words:
        raise ValueError(f"word {word!r} is not a word of attribute {attribute!r}; valid: {list(a.words)}")
    text = a.phrase.format(word=word)
    pre, post = (text + " ", "") if a.slot == "pre" else ("", " " + text)
    return template.format(pre=pre, noun=noun, post=post)


@dataclass
class CaptionSet:
    """Captions of a dataset with what they were built from."""

    captions: list[str]
    values: pd.DataFrame  # continuous attribute values per image
    words: pd.DataFrame  # per image and attribute: the word written, or "" when none
    thresholds: dict[str, tuple[float, float]]
    labels: np.ndarray
    class_names: list[str]
    config: CaptionConfig


def build_captions(ds, config: CaptionConfig | None = None) -> CaptionSet:
    """Measure every image of ``ds`` (an :class:`~revelio_nb.data.ImageDataset`) and write one caption each.

    Thresholds come from the training split only; the per-(image, attribute) mention draws are seeded, so the
    same dataset and config always give the same captions.
    """
    cfg = (config or CaptionConfig()).validate()
    images = ds.tensor(np.arange(len(ds)), size=cfg.image_size).numpy()
    values = measure(images, cfg.attributes)
    train = ds.split("train")
    rng = np.random.default_rng(cfg.seed)
    mention = rng.random((len(ds), len(cfg.attributes))) < cfg.p_mention
    words = pd.DataFrame(index=range(len(ds)))
    thresholds = {}
    for j, name in enumerate(cfg.attributes):
        a = ATTRIBUTES[name]
        v = values[name].to_numpy()
        lo, hi = (float(q) for q in np.quantile(v[train], cfg.quantiles or a.quantiles))
        thresholds[name] = (lo, hi)
        w = np.where(v > hi, a.high, np.where(v < lo, a.low, ""))
        words[name] = np.where(mention[:, j], w, "")
    captions = []
    for i in range(len(ds)):
        pre, post = [], []
        for name in cfg.attributes:
            word = words.at[i, name]
            if word:
                a = ATTRIBUTES[name]
                (pre if a.slot == "pre" else post).append(a.phrase.format(word=word))
        noun = ds.class_names[int(ds.labels[i])]
        captions.append(cfg.template.format(pre="".join(p + " " for p in pre), noun=noun,
                                            post="".join(" " + p for p in post)))
    return CaptionSet(captions, values, words, thresholds, ds.labels.copy(), list(ds.class_names), cfg)


def animal_captions(ds) -> list[str]:
    """The ``captions`` hook of ``embedded:animals-unet-text`` (one caption per dataset image)."""
    return build_captions(ds).captions


def ground_truth(cs: CaptionSet, indices: np.ndarray | None = None) -> pd.DataFrame:
    """The class x attribute association rates of the captions (training split by default in callers).

    One row per (class, attribute): ``n`` images, ``n_high``/``n_low`` captions that carry each word, ``p_high``
    = n_high / n and ``p_low`` = n_low / n (word rates), and ``rate`` = n_high / (n_high + n_low), the share of
    the high word among captions that mention the attribute (0.5 = no association; NaN if never mentioned).
    """
    idx = np.arange(len(cs.captions)) if indices is None else np.asarray(indices)
    rows = []
    for c, cname in enumerate(cs.class_names):
        sel = idx[cs.labels[idx] == c]
        for name in cs.config.attributes:
            a = ATTRIBUTES[name]
            w = cs.words[name].to_numpy()[sel]
            nh, nl = int((w == a.high).sum()), int((w == a.low).sum())
            rows.append({"class": cname, "attribute": name, "high": a.high, "low": a.low, "n": len(sel),
                         "n_high": nh, "n_low": nl, "p_high": nh / max(len(sel), 1), "p_low": nl / max(len(sel), 1),
                         "rate": nh / (nh + nl) if nh + nl else float("nan"),
                         "mean_value": float(cs.values[name].to_numpy()[sel].mean()) if len(sel) else float("nan")})
    return pd.DataFrame(rows)


def rate_table(gt: pd.DataFrame, column: str = "rate") -> pd.DataFrame:
    """Ground truth as a class x attribute matrix."""
    order = list(dict.fromkeys(gt["attribute"]))
    return gt.pivot(index="class", columns="attribute", values=column).loc[list(dict.fromkeys(gt["class"])), order]


def save_ground_truth(cs: CaptionSet, path: str | os.PathLike, indices: np.ndarray | None = None) -> pd.DataFrame:
    """Write :func:`ground_truth` as CSV (atomically) and return it."""
    from .paths import atomic_write_text

    gt = ground_truth(cs, indices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, gt.to_csv(index=False))
    return gt


def caption_config_dict(cfg: CaptionConfig | None = None) -> dict:
    return asdict((cfg or CaptionConfig()).validate())
