"""Caption word maps: caption words tied to h of real images, and directions named with words.

:func:`fit_word_map` associates caption words with h (difference of means, ridge regression and shrinkage-LDA
"whitened" directions) into a :class:`WordMap`, whose :meth:`WordMap.name` names any direction (a prompt
difference, a PCA axis, an SAE decoder row) by its most aligned words; :func:`name_sae_latents` trains a k-SAE on
h and names its latents (SAE units) that way. :func:`caption_features` gives h of a batch of real images noised to
t (notebook 06 reads the same h from a feature store instead, :func:`revelio_nb.features.extract_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import artifacts
from ..models import DiffusionModel
from ..pooling import FLAT, MEAN


DEFAULT_STOPWORDS = frozenset({"a", "an", "the", "of", "drawing", "photo", "facing", "with", "and", "in", "on"})


CONDITIONS = ("neutral", "caption")


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


@dataclass
class CaptionMapConfig:
    """How real images with captions are turned into h for the word map."""

    block: str = "mid_block"
    t: int = 100
    condition: str = "neutral"  # "neutral": empty prompt (h shows the image); "caption": the image's caption
    n_noise: int = 1  # seeded noise draws averaged per image
    seed: int = 0
    batch_size: int = 64
    image_size: int | None = None

    def validate(self) -> "CaptionMapConfig":
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition {self.condition!r} is not one of {list(CONDITIONS)}")
        if self.n_noise <= 0 or self.batch_size <= 0:
            raise ValueError("n_noise and batch_size must be positive integers")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise ValueError(f"image_size must be None (the model's native size) or positive, got {self.image_size!r}")
        return self


@torch.no_grad()
def caption_features(model: DiffusionModel, images: torch.Tensor, captions: Sequence[str] | None = None,
                     config: CaptionMapConfig | None = None, progress: bool = True,
                     indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """h of real images (float (N, C, H, W) in [-1, 1]) noised to ``t``, in both forms: ``{MEAN: (N, C), FLAT:
    (N, C*h*w)}`` (:mod:`revelio_nb.pooling`).

    The noise of each image is the feature stores' (:func:`revelio_nb.features.noise_for` of its index in
    ``indices``, default its position, ``t``, the draw and ``seed``), so with neutral conditioning the rows equal
    those of :func:`revelio_nb.features.extract_features` for the same dataset images, and a subset gives the same
    rows. ``condition="caption"`` (each image's own caption as the prompt) is what a store cannot give.
    """
    from ..features import noise_for
    from ..capture import FeatureCapture

    cfg = (config or CaptionMapConfig()).validate()
    t = model.check_timestep(cfg.t)
    n = len(images)
    if cfg.condition == "caption" and (captions is None or len(captions) != n):
        raise ValueError(f"condition='caption' needs one caption per image ({n} images, "
                         f"{None if captions is None else len(captions)} captions)")
    indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) != n:
        raise ValueError(f"{len(indices)} indices for {n} images")
    size = model.check_image_size(cfg.image_size or model.native_image_size)
    pooled, flat = [], []
    with FeatureCapture(model, [cfg.block], early_exit=True) as cap:
        for s in tqdm(range(0, n, cfg.batch_size), desc="caption h", disable=not progress, leave=False):
            x = images[s : s + cfg.batch_size]
            if x.shape[-1] != size:
                from ..data import resize_square

                x = resize_square(x, size)
            x0 = model.encode_images(x)
            cond = model.conditioning(len(x0), prompts=list(captions[s : s + len(x0)]) if cfg.condition == "caption" else None)
            acc = 0.0
            for k in range(cfg.n_noise):
                noise = torch.stack([noise_for(i, t, k, cfg.seed, tuple(x0.shape[1:]))
                                     for i in indices[s : s + len(x0)]]).to(x0.device, x0.dtype)
                acc = acc + cap.run(model.add_noise(x0, noise, t), t, cond)[cfg.block].float().cpu()
            h = acc / cfg.n_noise
            pooled.append(h.flatten(2).mean(-1).numpy() if h.ndim == 4 else h.numpy())
            flat.append(h.reshape(len(h), -1).numpy())
    return {MEAN: np.concatenate(pooled), FLAT: np.concatenate(flat)}


def caption_words(caption: str, stopwords: frozenset[str] = DEFAULT_STOPWORDS) -> list[str]:
    return [w for w in "".join(ch.lower() if ch.isalnum() else " " for ch in caption).split() if w not in stopwords]


def word_matrix(captions: Sequence[str], vocabulary: Sequence[str] | None = None, min_count: int = 5,
                stopwords: frozenset[str] = DEFAULT_STOPWORDS) -> tuple[np.ndarray, list[str]]:
    """Binary word-presence matrix (N, V) and its vocabulary (words seen >= ``min_count`` times, sorted)."""
    tokens = [set(caption_words(c, stopwords)) for c in captions]
    if vocabulary is None:
        counts: dict[str, int] = {}
        for ws in tokens:
            for w in ws:
                counts[w] = counts.get(w, 0) + 1
        vocabulary = sorted(w for w, c in counts.items() if c >= min_count)
    vocabulary = list(vocabulary)
    col = {w: j for j, w in enumerate(vocabulary)}
    x = np.zeros((len(captions), len(vocabulary)), np.float32)
    for i, ws in enumerate(tokens):
        for w in ws:
            if w in col:
                x[i, col[w]] = 1.0
    return x, vocabulary


WORD_METHODS = ("ridge", "mean_diff", "whitened")


@dataclass
class WordMap:
    """Word directions in h-space: ``mean_diff``, ``ridge`` (and ``whitened`` when fitted with ``shrinkage``) are
    (V, d), rows in ``vocabulary`` order."""

    vocabulary: list[str]
    mean_diff: np.ndarray
    ridge: np.ndarray
    counts: np.ndarray
    mean: np.ndarray  # mean h of the fitted images
    alpha: float = 1.0
    whitened: np.ndarray | None = None  # (cov + lambda I)^-1 mean_diff rows: discriminative word directions
    shrinkage: float | None = None  # lambda / (mean variance per dimension of h)

    def vectors(self, method: str = "ridge") -> np.ndarray:
        if method not in WORD_METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {list(WORD_METHODS)}")
        if method == "whitened":
            if self.whitened is None:
                raise ValueError("this word map has no whitened vectors: fit it with fit_word_map(..., shrinkage=...)")
            return self.whitened
        return self.ridge if method == "ridge" else self.mean_diff

    def word(self, word: str, method: str = "ridge") -> np.ndarray:
        if word not in self.vocabulary:
            raise KeyError(f"word {word!r} not in the word map; vocabulary: {self.vocabulary}")
        return self.vectors(method)[self.vocabulary.index(word)]

    def alignment(self, directions: np.ndarray, method: str = "ridge") -> np.ndarray:
        """Cosine between each direction (n, d) and each word vector: (n, V)."""
        d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        w = self.vectors(method)
        if d.shape[1] != w.shape[1]:
            raise ValueError(f"directions have {d.shape[1]} dims but the word map has {w.shape[1]} (same block/form?)")
        return unit(d) @ unit(w).T

    def name(self, directions: np.ndarray, k: int = 5, method: str = "ridge", names: Sequence[str] | None = None,
             signed: bool = True) -> pd.DataFrame:
        """Top-``k`` aligned words of each direction: one row per (direction, rank) with word and cosine score.

        With ``signed``, the k most negative words are listed too (``side`` = "+" / "-"): a direction and its
        opposite are named together (e.g. "large" on one side, "small" on the other).
        """
        cos = self.alignment(directions, method)
        names = [f"dir{i}" for i in range(len(cos))] if names is None else list(names)
        if len(names) != len(cos):
            raise ValueError(f"{len(names)} names for {len(cos)} directions")
        k = min(k, len(self.vocabulary))
        rows = []
        for i, row in enumerate(cos):
            order = np.argsort(-row)
            sides = [("+", order[:k])] + ([("-", order[::-1][:k])] if signed else [])
            for side, idx in sides:
                for r, j in enumerate(idx):
                    rows.append({"direction": names[i], "side": side, "rank": r + 1, "word": self.vocabulary[j],
                                 "score": float(row[j])})
        return pd.DataFrame(rows)

    def labels(self, directions: np.ndarray, k: int = 3, method: str = "ridge") -> list[str]:
        """One short label per direction: its top-k positive words, e.g. "large+elephant+wide"."""
        cos = self.alignment(directions, method)
        return ["+".join(self.vocabulary[j] for j in np.argsort(-row)[:k]) for row in cos]


def fit_word_map(h: np.ndarray, captions: Sequence[str] | None = None, *, words: np.ndarray | None = None,
                 vocabulary: Sequence[str] | None = None, alpha: float = 1.0, min_count: int = 5,
                 stopwords: frozenset[str] = DEFAULT_STOPWORDS, shrinkage: float | None = None) -> WordMap:
    """Associate caption words with h (N, d): difference of means (with vs without the word) and ridge
    regression from word indicators to centred h, ``B = (X^T X + alpha I)^-1 X^T (h - mean)`` (X centred).

    With ``shrinkage`` (> 0) also the *whitened* word directions ``(S + lambda I)^-1 mean_diff`` (S = covariance
    of h over the images, lambda = ``shrinkage`` x its mean variance per dimension): the shrinkage-LDA direction of
    each word, which down-weights the directions h varies most along for other reasons (class identity, overall
    ink), so an attribute axis built from them (:func:`word_axis` with ``method="whitened"``) reads the attribute
    rather than what merely co-occurs with its words. Large ``shrinkage`` tends to the plain mean difference.

    Pass ``captions`` or a ready ``words`` matrix with its ``vocabulary``.
    """
    if shrinkage is not None and not shrinkage > 0:
        raise ValueError(f"shrinkage must be > 0 (or None), got {shrinkage!r}")
    h = np.asarray(h, dtype=np.float64)
    if words is None:
        if captions is None:
            raise ValueError("pass captions or a words matrix")
        if len(captions) != len(h):
            raise ValueError(f"{len(captions)} captions for {len(h)} feature rows")
        words, vocabulary = word_matrix(captions, vocabulary, min_count, stopwords)
    elif vocabulary is None or len(vocabulary) != words.shape[1]:
        raise ValueError("a words matrix needs its vocabulary (one name per column)")
    x = np.asarray(words, dtype=np.float64)
    if x.shape[1] == 0:
        raise ValueError(f"no word occurs {min_count}+ times in the captions")
    counts = x.sum(0)
    mean = h.mean(0)
    present = x > 0
    md = np.zeros((x.shape[1], h.shape[1]))
    for j in range(x.shape[1]):
        p = present[:, j]
        if 0 < p.sum() < len(p):
            md[j] = h[p].mean(0) - h[~p].mean(0)
    xc = x - x.mean(0)
    hc = h - mean
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    ridge = np.linalg.solve(gram, xc.T @ hc)
    whitened = None
    if shrinkage is not None:
        _, sv, vt = np.linalg.svd(hc, full_matrices=False)
        ev = sv ** 2 / len(hc)  # covariance eigenvalues along the rows of vt
        lam = float(shrinkage) * max(float(ev.sum()) / h.shape[1], 1e-12)
        c = md @ vt.T  # (V, rank): coordinates in the span of the data
        whitened = (c / (ev + lam)) @ vt + (md - c @ vt) / lam
    return WordMap(list(vocabulary), md.astype(np.float32), ridge.astype(np.float32), counts, mean.astype(np.float32),
                   float(alpha), None if whitened is None else whitened.astype(np.float32),
                   None if shrinkage is None else float(shrinkage))


def name_sae_latents(h: np.ndarray, word_map: "WordMap", config: Any, key: str = "", n_latents: int = 8, k: int = 3,
                     method: str = "ridge") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train (or load from the cache) a k-SAE on h (N, d) with ``config`` (:class:`revelio_nb.sae.TrainConfig`)
    and name its ``n_latents`` most frequent latents' decoder rows with the word map (:meth:`WordMap.name`).

    The SAE is cached by the rows and the config (:func:`revelio_nb.artifacts.array_sae_dir`; ``key`` only labels
    the folder). Returns (named rows, :func:`revelio_nb.sae.evaluate_sae` metrics).
    """
    from .. import sae

    folder = artifacts.array_sae_dir(h, config, label=key)
    ksae = sae.train_sae(np.asarray(h, np.float32), config, folder)
    ev = sae.evaluate_sae(ksae, np.asarray(h, np.float32))
    top = np.argsort(-ev["firing_frequency"])[:n_latents]
    named = word_map.name(ksae.W_dec.detach().cpu().numpy()[top], k=k, method=method,
                          names=[f"latent {i} ({ev['firing_frequency'][i]:.0%})" for i in top])
    return named, ev


def pca_directions(h: np.ndarray, n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` principal axes (n, d) of row vectors and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    p = PCA(n_components=min(n, *np.shape(h)), random_state=seed).fit(np.asarray(h, dtype=np.float64))
    return p.components_, p.explained_variance_ratio_
