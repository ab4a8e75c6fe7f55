"""Cache keys and cache paths: the one place that decides when a cached result can be reused.

Every cached artefact lives in a folder named by a hash of exactly what changes its numbers, and nothing else:

=====================  =====================================================================  ======================
artefact               key (what changes the numbers)                                         function
=====================  =====================================================================  ======================
feature store          extraction config (not the device) + model identity + dataset          :func:`store_dir`
                       content (:attr:`ImageDataset.fingerprint`: images, labels, class
                       names, split seed and assignment, so also a class subset)
k-SAE                  the training store's key + block + timestep + SAE architecture and     :func:`sae_dir`
                       training hyper-parameters (not the device, the checkpoint cadence or
                       the hookpoint / model labels written into ``cfg.json``)
latent statistics      the SAE (its folder) + the evaluation store's key + ``top_n``          :func:`latents_dir`
prompt h               model identity + prompts + sampling config (not ``h_condition``: one   :func:`prompt_h_dir`
                       run serves both) + whether images are kept
browser's 2-D view     method, seed, t-SNE subset size, store key, block, t                   ``embedding_cache_key``
embedded models        :meth:`revelio_nb.models.EmbeddedSpec.identity` (training recipe)      ``models.embedded_folder``
=====================  =====================================================================  ======================

The *model identity* is its ``weights_hash`` (the loader's content hash of the weights it holds), its noise
scheduler's configuration (the betas that drive the noise) and its id (which alone changes no number; it is kept
so that two models differing only in a part the weights hash may not cover are never confused). Harmless inputs (device, progress bars, how
often checkpoints are written, free-text descriptions) stay out, so changing them reuses the cache. Each key
also carries a format number (:data:`FORMATS`), bumped whenever the code that produces an artefact changes its
numbers.

This module only computes names; it imports none of the modules whose artefacts it names (they import it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover - types only
    from .data import ImageDataset
    from .features import ExtractionConfig, FeatureStore
    from .models import DiffusionModel

FORMATS = {"store": 2, "sae": 2, "latents": 3, "prompt_latents": 4, "embedding": 2}
"""Version of each artefact's key: bump one when its producing code changes the numbers."""

KEY_LENGTH = 12


# ------------------------------------------------------------------------------------------ hashing


def _plain(v: Any) -> Any:
    """JSON-able form of a config value; arrays and tensors in full (``str`` would abbreviate long ones)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) or type(v).__name__ == "Tensor":
        return _plain(v.tolist())
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def key_of(identity: Any, length: int = KEY_LENGTH) -> str:
    """Short sha256 of a JSON-able identity (dict keys sorted, so their order never matters)."""
    blob = json.dumps(_plain(identity), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _slug(text: str, n: int) -> str:
    """A readable, file-name-safe tail of ``text`` for folder names (the key, not the slug, identifies)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(text).replace("embedded:", ""))[-n:]


def digest(array: Any) -> str:
    """Short sha256 of an array's bytes (C order): the content part of keys over in-memory data."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ models and data


def embedded_model_dir(name: str, identity: dict[str, Any]) -> Path:
    """``<cache>/models/<name>-<key>`` of an embedded model whose recipe identity is ``identity``
    (:meth:`revelio_nb.models.embedded_specs.EmbeddedSpec.identity`, plus the teacher's for distilled models): everything
    that changes the weights."""
    return cache_dir("models") / f"{name}-{key_of(identity)}"


def attribute_table_dir(dataset_name: str, names: Sequence[str], images: np.ndarray) -> Path:
    """``<cache>/attributes/<dataset>-<key>`` of the image attributes ``names`` measured on ``images``."""
    key = key_of({"v": 1, "dataset": dataset_name, "names": list(names), "images": digest(images),
                  "n": len(images)})
    return cache_dir("attributes") / f"{_slug(dataset_name, 40)}-{key}"


def taxonomy_dir(latents_folder: str | os.PathLike, cfg: Any) -> Path:
    """The latent taxonomy of a hookpoint's SAE, cached beside its latent statistics (``cfg``: a
    :class:`revelio_nb.taxonomy.TaxonomyConfig`)."""
    return Path(latents_folder) / f"taxonomy-{key_of(cfg)}"


def scheduler_identity(scheduler: Any) -> dict[str, Any]:
    """The noise schedule's configuration (class and every config entry but the diffusers version stamps)."""
    if scheduler is None:
        return {}
    cfg = dict(getattr(scheduler, "config", {}) or {})
    return {"class": type(scheduler).__name__,
            **{k: _plain(v) for k, v in cfg.items() if k not in ("_diffusers_version", "_use_default_values")}}


def model_identity(model: "DiffusionModel") -> dict[str, Any]:
    """What identifies a loaded model's numbers: its id, weights hash and noise scheduler configuration.

    ``weights_hash`` is computed by the model loader (:mod:`revelio_nb.models`) and is the one place that decides
    which weights it covers (text encoders included).
    """
    return {"id": model.model_id, "weights": model.weights_hash, "scheduler": scheduler_identity(model.scheduler)}


def dataset_identity(dataset: "ImageDataset") -> str:
    return dataset.fingerprint


# ------------------------------------------------------------------------------------------ feature stores


def store_identity(cfg: "ExtractionConfig", model: "DiffusionModel", dataset: "ImageDataset") -> dict[str, Any]:
    return {"v": FORMATS["store"], "config": cfg.identity(), "model": model_identity(model),
            "dataset": dataset_identity(dataset)}


def store_key(cfg: "ExtractionConfig", model: "DiffusionModel", dataset: "ImageDataset") -> str:
    """The key of the feature store that ``cfg`` extracts from ``model`` on ``dataset`` (recorded in its manifest)."""
    return key_of(store_identity(cfg, model, dataset))


def store_dir(cfg: "ExtractionConfig", model: "DiffusionModel", dataset: "ImageDataset") -> Path:
    """``<cache>/features/<model>-<dataset>-<split>-<key>``."""
    return cache_dir("features") / (f"{_slug(cfg.model, 40)}-{_slug(cfg.dataset, 24)}-{cfg.split}-"
                                    f"{store_key(cfg, model, dataset)}")


def key_of_store(store: "FeatureStore") -> str:
    """The identity of an existing store: the key recorded in its manifest; for a store written before keys were
    recorded, a hash of its manifest's config, weights, folder and creation time (so it is never mistaken for
    another store, nor for itself once rebuilt)."""
    m = store.manifest
    if m.get("key"):
        return str(m["key"])
    return key_of({"legacy": m.get("config"), "weights": m.get("weights_hash"), "created": m.get("created"),
                   "path": str(Path(store.path).resolve())})


# ------------------------------------------------------------------------------------------ k-SAEs


def sae_train_identity(cfg: Any) -> dict[str, Any]:
    """SAE architecture and training hyper-parameters (a :class:`revelio_nb.sae.TrainConfig`) that change the
    weights: not the device, not the checkpoint cadence (training resumes bit for bit), not the hookpoint /
    timestep / model labels that are only written into ``cfg.json``."""
    d = _plain(cfg)
    for k in ("device", "checkpoint_every"):
        d.pop(k, None)
    for k in ("hookpoint", "timestep", "model_id"):
        d.get("sae", {}).pop(k, None)
    return d


def sae_key(cfg: Any, train_store: "FeatureStore", block: str, t: int) -> str:
    return key_of({"v": FORMATS["sae"], "store": key_of_store(train_store), "block": block, "t": int(t),
                   "train": sae_train_identity(cfg)})


def sae_dir(cfg: Any, train_store: "FeatureStore", block: str, t: int) -> Path:
    """``<cache>/sae/<model>-<block>-t<t>-<pooling>-<key>`` of the SAE trained with ``cfg`` on ``train_store``."""
    c = train_store.config
    slug = f"{_slug(c['model'], 32)}-{block}-t{int(t)}-{c['pooling']}"
    return cache_dir("sae") / f"{slug}-{sae_key(cfg, train_store, block, t)}"


def latents_dir(sae_folder: str | os.PathLike, eval_store: "FeatureStore", top_n: int) -> Path:
    """Latent statistics of the SAE in ``sae_folder`` on ``eval_store``: a sub-folder of the SAE's, keyed by the
    evaluation store and ``top_n``."""
    key = key_of({"v": FORMATS["latents"], "store": key_of_store(eval_store), "top_n": int(top_n)}, 8)
    return Path(sae_folder) / f"latents-{eval_store.config['split']}-top{int(top_n)}-{key}"


# ------------------------------------------------------------------------------------------ prompt h


def prompt_h_key(model: "DiffusionModel", prompts: Sequence[str], cfg: Any, keep_images: bool,
                 keep_seeds: bool = False) -> str:
    """Key of a prompt-h sampling run (``cfg``: a :class:`revelio_nb.directions.SampleConfig`).

    ``h_condition`` is left out: one sampling run records both passes when it has them.
    """
    run = {k: v for k, v in _plain(cfg).items() if k != "h_condition"}
    return key_of({"v": FORMATS["prompt_latents"], "model": model_identity(model), "prompts": list(prompts),
                   "config": run, "images": bool(keep_images), **({"seeds": True} if keep_seeds else {})})


def prompt_h_dir(model: "DiffusionModel", prompts: Sequence[str], cfg: Any, keep_images: bool,
                 keep_seeds: bool = False) -> Path:
    """Folder of a prompt-h run (``keep_seeds``: per-seed h kept, for intervals over seeds)."""
    return cache_dir("directions") / f"latents-{prompt_h_key(model, prompts, cfg, keep_images, keep_seeds)}"


def array_sae_dir(x: np.ndarray, cfg: Any, label: str = "") -> Path:
    """``<cache>/sae/<label>-<key>`` of a k-SAE trained with ``cfg`` on the in-memory rows ``x`` (e.g. prompt h in
    notebook 06), keyed by the rows' bytes and the training config."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    key = key_of({"v": FORMATS["sae"], "rows": digest(x), "shape": list(x.shape), "train": sae_train_identity(cfg)})
    return cache_dir("sae") / f"{_slug(label, 32) + '-' if label else ''}{key}"


def dataset_rows_hash(ds: "ImageDataset", indices: np.ndarray) -> str:
    """Content hash of the rows a store holds: their images, labels and the class names."""
    h = hashlib.sha256()
    idx = np.asarray(indices, dtype=np.int64)
    h.update(idx.tobytes())
    h.update(np.ascontiguousarray(ds.images[idx]).tobytes())
    h.update(np.ascontiguousarray(ds.labels[idx]).tobytes())
    h.update(json.dumps(list(ds.class_names)).encode())
    return h.hexdigest()[:16]


def encoder_store_key(cfg: Any, encoder: Any, ds: "ImageDataset", indices: np.ndarray) -> str:
    """The key of a vision-encoder feature store (:mod:`revelio_nb.encoders`): everything that changes the stored
    numbers (the extraction config, the encoder's weights, its preprocessing, the content of the dataset rows)."""
    return key_of({"cfg": cfg.identity(), "weights": encoder.weights_hash,
                   "preprocess": encoder.preprocess.identity(), "rows": dataset_rows_hash(ds, indices)})


def encoder_store_dir(cfg: Any, encoder: Any, ds: "ImageDataset", indices: np.ndarray) -> Path:
    """``<cache>/features/enc-<encoder>-<dataset>-<split>-<key>`` (:func:`encoder_store_key`)."""
    return cache_dir("features") / (f"enc-{_slug(encoder.name, 40)}-{_slug(ds.name, 24)}-{cfg.split}-"
                                    f"{encoder_store_key(cfg, encoder, ds, indices)}")


# ------------------------------------------------------------------------------------------ latent browser


def embedding_cache_key(store: "FeatureStore", block: str, t: int, method: str, seed: int, max_points: int) -> str:
    """The browser's 2-D embedding of the pooled features of ``store`` (the t-SNE subset size only for t-SNE)."""
    return key_of({"v": FORMATS["embedding"], "method": method, "seed": int(seed),
                   "max_points": int(max_points) if method == "tsne" else None, "store": key_of_store(store),
                   "block": block, "t": int(t)})
