"""Feature extraction from a diffusion model into a feature store (:mod:`revelio_nb.features.store`).

For a model, a dataset split, some blocks and timesteps: images are encoded once (VAE for latent models),
noised with the model's own schedule using noise seeded per (image, t, draw), passed once per timestep through
the denoiser with neutral conditioning (by default), and the captured block outputs are pooled as
:mod:`revelio_nb.pooling` says: ``MEAN`` (one vector per image) or ``MAP`` (the (C, h, w) map kept).
:class:`ExtractionConfig` says what to extract; :func:`extract_features` extracts (or resumes, or returns the cached
store); :func:`check_store_config` holds the checks every feature-store config shares (the vision encoders' too).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import artifacts
from ..data import ImageDataset, load_dataset
from ..capture import FeatureCapture, validate_blocks
from ..models import DiffusionModel, load_model
from ..pooling import MEAN, STORE_POOLINGS, check_pooling
from .microbatch import MicroBatch
from .store import (STORE_DTYPES, FeatureStore, allocate_store, array_key, chunk_sha, open_for_writing, write_manifest,
                    writing)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # autocast dtype of the denoiser pass


@dataclass
class ExtractionConfig:
    """What to extract. Every field except ``batch_size``-independent bookkeeping is part of the store identity."""

    model: str = "embedded:animals-unet"
    dataset: str = "animal-mnist"
    split: str = "train"
    blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    timesteps: list[int] = field(default_factory=lambda: [25])
    pooling: str = MEAN  # MEAN ("mean"): one vector per image; MAP ("map"): keep (C, h, w) maps
    n_noise: int = 1  # average features over this many seeded noise draws
    seed: int = 0
    image_size: int | None = None  # None: the model's native size
    batch_size: int = 64  # also the store's chunk size (fixed once a store exists)
    max_images: int | None = None  # seeded, class-stratified subset of the split
    classes: list[int] | None = None  # keep only these dataset classes
    prompt: str | None = None  # conditioning override for text models ("" is the neutral default)
    class_label: int | None = None  # conditioning override for class-conditional models
    store_dtype: str = "float32"
    precision: str = "fp32"  # "fp32" | "fp16" | "bf16": autocast dtype of the denoiser pass (weights stay as loaded)
    train_steps: int | None = None  # training budget override of embedded models (smoke runs)
    device: str = "auto"

    def validate(self) -> "ExtractionConfig":
        check_pooling(self.pooling, STORE_POOLINGS, "pooling")
        check_store_config(self)
        if isinstance(self.timesteps, (int, np.integer)):
            self.timesteps = [int(self.timesteps)]
        if not self.timesteps:
            raise ValueError("timesteps is empty: give at least one, e.g. [25]")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"timesteps has duplicates: {self.timesteps}")
        if not isinstance(self.n_noise, int) or self.n_noise < 1:
            raise ValueError(f"n_noise must be a positive integer, got {self.n_noise!r}")
        if self.image_size is not None and (not isinstance(self.image_size, (int, np.integer)) or self.image_size < 1):
            raise ValueError(f"image_size must be None (the model's native size) or a positive integer, "
                             f"got {self.image_size!r}")
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that decide the store's content (device is not one of them). The store's cache key adds the
        model's and the dataset's content identities (:mod:`revelio_nb.artifacts`)."""
        d = asdict(self)
        d.pop("device")
        return d


def check_store_config(cfg: Any, error: type[ValueError] = ValueError) -> None:
    """The checks every feature-store config shares (:class:`ExtractionConfig`, the vision encoders'
    ``EncoderExtractionConfig``), raising ``error``: ``store_dtype``, ``precision``, ``blocks`` (one name becomes a
    list), ``batch_size`` and ``max_images``."""
    if cfg.store_dtype not in STORE_DTYPES:
        raise error(f"store_dtype {cfg.store_dtype!r} is not one of {list(STORE_DTYPES)}")
    if cfg.precision not in PRECISIONS:
        raise error(f"precision {cfg.precision!r} is not one of {list(PRECISIONS)}")
    if isinstance(cfg.blocks, str):
        cfg.blocks = [cfg.blocks]
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise error(f"batch_size must be a positive integer, got {cfg.batch_size!r}")
    m = cfg.max_images
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
        raise error(f"max_images must be None or a positive integer, got {m!r}")


def noise_for(index: int, t: int, draw: int, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of one (image, timestep, draw): independent of batch composition, device and run order."""
    s = int(np.random.SeedSequence([int(seed), int(index), int(t), int(draw)]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(s))


def stratified_subset(indices: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``n`` indices with classes in proportion, sorted."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of images to keep must be a positive integer, got {n!r}")
    if n >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    for c in np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]:
        quota[c] += 1
    picked = [rng.choice(indices[labels == c], size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


# ------------------------------------------------------------------------------------------ extraction


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_store_dir(cfg: ExtractionConfig, model: DiffusionModel, dataset: ImageDataset) -> Path:
    """The cache folder of the store ``cfg`` extracts from ``model`` on ``dataset``, keyed by everything that
    changes its numbers (:func:`revelio_nb.artifacts.store_dir`)."""
    return artifacts.store_dir(cfg, model, dataset)


def _probe_shapes(model: DiffusionModel, cfg: ExtractionConfig, size: int) -> dict[str, tuple[int, ...]]:
    x = torch.zeros(model.latent_shape(1, size), device=model.device, dtype=model.dtype)
    with FeatureCapture(model, cfg.blocks) as cap:
        feats = cap.run(x, cfg.timesteps[0], _conditioning(model, cfg, 1))
    return {b: tuple(f.shape[1:]) for b, f in feats.items()}


def _conditioning(model: DiffusionModel, cfg: ExtractionConfig, n: int) -> dict[str, Any]:
    prompts = cfg.prompt if cfg.prompt not in (None, "") else None
    return model.conditioning(n, prompts=prompts, class_labels=cfg.class_label)


def create_store(path: Path, cfg: ExtractionConfig, model: DiffusionModel, ds: ImageDataset,
                 indices: np.ndarray, size: int) -> FeatureStore:
    """Preallocate every array and write the manifest (status ``incomplete``).

    A previous manifest and progress records in ``path`` are removed first and the manifest is written last, so a
    crash anywhere in here leaves a folder that the next run simply creates again. The disk space is checked
    up front and the array files are allocated on disk (not sparse), so a full disk is a clear error now, not a
    crash (SIGBUS) half-way through writing the memory maps.
    """
    shapes = _probe_shapes(model, cfg, size)
    n = len(indices)
    arrays = {}
    for t in cfg.timesteps:
        for b in cfg.blocks:
            key = array_key(b, t)
            shape = (n, shapes[b][0]) if cfg.pooling == MEAN else (n, *shapes[b])
            arrays[key] = {"file": key.replace("/", "_") + ".npy", "block": b, "t": int(t), "shape": list(shape)}
    manifest = {
        "format": "revelio-feature-store/1",
        "config": cfg.identity(),
        "model_id": model.model_id,
        "model_kind": model.kind,
        "weights_hash": model.weights_hash,
        "key": artifacts.store_key(cfg, model, ds),
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint,
        "class_names": ds.class_names,
        "split": cfg.split,
        "image_size": size,
        "noise": model.noise_record(cfg.timesteps, size),  # t -> alpha-bar or flow sigma, model timestep, prediction
        "arrays": arrays,
    }
    return allocate_store(path, manifest, ds.labels[indices], indices, cfg.batch_size)


@torch.no_grad()
def extract_features(
    cfg: ExtractionConfig,
    model: DiffusionModel | None = None,
    dataset: ImageDataset | None = None,
    out_dir: str | os.PathLike | None = None,
    writer: str = "main",
    chunks: Iterable[int] | None = None,
    verify: bool = True,
    progress: bool = True,
    coordinator: bool = True,
    early_exit: bool = True,
) -> FeatureStore:
    """Extract features (or resume an interrupted extraction) and return the complete store.

    ``out_dir`` defaults to a cache folder keyed by a hash of the config and the model's weights, so asking
    twice for the same features returns the existing store at once. ``writer`` and ``chunks`` let several
    processes fill disjoint chunks of one store (see :mod:`revelio_nb.distributed`): exactly one of them, the
    ``coordinator``, creates, verifies, repairs and finally marks the store complete; the others
    (``coordinator=False``) only fill their chunks and never write the manifest or other writers' records.
    A full disk or an unwritable folder raises :class:`StoreWriteError`; chunks finished before stay valid.
    On out-of-memory the forward micro-batch is halved and the pass retried. ``early_exit=False`` runs the
    whole denoiser (same features, slower; for benchmarks).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    model = model or load_model(cfg.model, train_steps=cfg.train_steps, progress=progress)
    if model.device != device:
        model.to(device)
    ds = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    size = model.check_image_size(cfg.image_size or model.native_image_size)
    timesteps = [model.check_timestep(t) for t in cfg.timesteps]
    validate_blocks(model.denoiser, cfg.blocks)  # before anything is written
    split_idx = ds.split(cfg.split)
    indices = split_idx if cfg.max_images is None else stratified_subset(
        split_idx, ds.labels[split_idx], cfg.max_images, cfg.seed)
    path = Path(out_dir) if out_dir is not None else default_store_dir(cfg, model, ds)

    store, rec = open_for_writing(path, cfg, model.weights_hash, lambda: create_store(path, cfg, model, ds, indices, size),
                                  writer=writer, verify=verify, coordinator=coordinator,
                                  check=lambda st: st.check_key(artifacts.store_key(cfg, model, ds), ds.fingerprint))
    if rec is None:
        return store

    todo = [c for c in (range(store.manifest["n_chunks"]) if chunks is None else chunks) if c not in store.done_chunks()]
    def open_arrays() -> dict[str, np.memmap]:  # per chunk: pages written before are unmapped, so RSS stays flat
        with writing(path, "the feature arrays"):
            return {k: np.load(path / m["file"], mmap_mode="r+") for k, m in store.manifest["arrays"].items()}

    open_arrays()  # fail early (before any forward pass) when the folder is not writable
    cs = store.manifest["chunk_size"]
    micro = MicroBatch(cs)
    autocast_dtype = PRECISIONS[cfg.precision]
    bar = tqdm(total=len(todo) * cs, desc=f"extract {cfg.split}", unit="img", disable=not progress)
    with FeatureCapture(model, cfg.blocks, early_exit=early_exit) as cap:
        for c in todo:
            rows = store.chunk_rows(c)
            idx = indices[rows]
            images = ds.tensor(idx, size=size, channels=model.image_channels)
            x0 = torch.cat(micro.run(lambda s: model.encode_images(images[s]), len(idx), "encode"))
            cond = _conditioning(model, cfg, len(idx))
            sums = {}
            arrays = open_arrays()
            for t in timesteps:
                acc: dict[str, torch.Tensor] = {}
                for draw in range(cfg.n_noise):
                    noise = torch.stack([noise_for(i, t, draw, cfg.seed, tuple(x0.shape[1:])) for i in idx])
                    x_t = model.add_noise(x0, noise.to(x0.device, x0.dtype), t)

                    def forward(s: slice) -> dict[str, torch.Tensor]:
                        with torch.autocast(device_type=x_t.device.type, dtype=autocast_dtype,
                                            enabled=autocast_dtype is not None):
                            feats = cap.run(x_t[s], t, _slice_cond(cond, s, len(idx)))
                        return {b: (f.float().mean(dim=(2, 3)) if cfg.pooling == MEAN else f.float()).cpu()
                                for b, f in feats.items()}

                    parts = micro.run(forward, len(idx), f"denoiser pass at t={t}")
                    for b in cfg.blocks:
                        f = parts[0][b] if len(parts) == 1 else torch.cat([p[b] for p in parts])
                        acc[b] = acc[b] + f if b in acc else f
                with writing(path, f"chunk {c}"):
                    for b, f in acc.items():
                        key = array_key(b, t)
                        arrays[key][rows] = (f / cfg.n_noise).numpy().astype(cfg.store_dtype)
            with writing(path, f"chunk {c}"):
                for key, arr in arrays.items():
                    arr.flush()
                    sums[key] = chunk_sha(arr[rows])
            del arrays
            rec.record(c, sums)
            bar.update(len(idx))
    bar.close()
    if coordinator and len(store.done_chunks()) == store.manifest["n_chunks"]:
        store.manifest["status"] = "complete"
        store.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_manifest(store)
    return FeatureStore(path, store.manifest)


def _slice_cond(cond: dict[str, Any], s: slice, n: int) -> dict[str, Any]:
    """Rows ``s`` of every per-sample tensor of a conditioning dict (tensors without a batch of ``n`` pass as is)."""
    if s == slice(0, n):
        return cond
    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _slice_cond(v, s, n)
        elif torch.is_tensor(v) and v.ndim and v.shape[0] == n:
            out[k] = v[s]
        else:
            out[k] = v
    return out
