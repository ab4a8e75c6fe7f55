"""Vision-encoder features into the **same feature-store format** as diffusion features (manifest, one ``.npy`` per
array, chunked resumable writes with checksums: the store writer of :mod:`revelio_nb.features.store`), so
:mod:`revelio_nb.probes` reads them unchanged. :class:`EncoderExtractionConfig` says what to extract,
:func:`extract_encoder_features` extracts one split (cached, keyed by :func:`encoder_store_key`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import artifacts
from ..data import ImageDataset, load_dataset
from ..features.extract import PRECISIONS, check_store_config, resolve_device, stratified_subset
from ..features.microbatch import MicroBatch
from ..features.store import (FeatureStore, StoreMismatchError, allocate_store, array_key, chunk_sha, open_for_writing,
                              write_manifest, writing)
from .allowlist import BASE_BLOCKS, NO_TIMESTEP, SPLITS, EncoderError
from .model import VisionEncoder, load_encoder


@dataclass
class EncoderExtractionConfig:
    """What to extract from a vision encoder. Every field but ``device`` is part of the store identity."""

    encoder: str  # hub id or local folder
    dataset: str = "animal-mnist"
    split: str = "train"
    blocks: list[str] = field(default_factory=lambda: list(BASE_BLOCKS))
    max_images: int | None = None  # seeded, class-stratified subset of the split (as ExtractionConfig)
    classes: list[int] | None = None
    seed: int = 0  # of the subset
    batch_size: int = 32  # also the store's chunk size
    store_dtype: str = "float16"
    precision: str = "fp32"  # autocast dtype of the encoder pass: "fp32" | "fp16" | "bf16"
    device: str = "auto"

    def validate(self) -> "EncoderExtractionConfig":
        check_store_config(self, EncoderError)
        if self.split not in SPLITS:
            raise EncoderError(f"split {self.split!r} is not one of {list(SPLITS)}")
        return self

    def identity(self) -> dict[str, Any]:
        """The store's ``config``: the fields of a diffusion store's config that probes and SAEs read (model,
        dataset, split, blocks, timesteps, pooling ...), with the encoder as ``model``."""
        d = asdict(self)
        d.pop("device")
        d["model"] = d.pop("encoder")
        d["timesteps"] = [NO_TIMESTEP]
        d["pooling"] = "encoder"  # per block (each array's "kind"): vectors (cls, mean) or grids (patch, layers.N)
        return d


def _create_encoder_store(path: Path, cfg: EncoderExtractionConfig, encoder: VisionEncoder, ds: ImageDataset,
                          indices: np.ndarray) -> FeatureStore:
    hw = tuple(ds.images.shape[1:3])
    shapes = encoder.shapes(cfg.blocks, hw)
    n = len(indices)
    arrays = {}
    for b in cfg.blocks:
        key = array_key(b, NO_TIMESTEP)
        arrays[key] = {"file": key + ".npy", "block": b, "t": NO_TIMESTEP, "shape": [n, *shapes[b]],
                       "kind": "vector" if len(shapes[b]) == 1 else "grid"}
    manifest = {
        "format": "revelio-feature-store/1",
        "source": "vision-encoder",
        "config": cfg.identity(),
        "model_id": encoder.encoder_id,
        "model_kind": f"encoder:{encoder.arch}",
        "weights_hash": encoder.weights_hash,
        "key": artifacts.encoder_store_key(cfg, encoder, ds, indices),
        "preprocess": encoder.preprocess.identity(),
        "dataset": ds.name,
        "dataset_fingerprint": artifacts.dataset_rows_hash(ds, indices),
        "class_names": ds.class_names,
        "split": cfg.split,
        "image_size": list(encoder.input_size(*hw)),
        "arrays": arrays,
    }
    return allocate_store(path, manifest, ds.labels[indices], indices, cfg.batch_size)


@torch.no_grad()
def extract_encoder_features(cfg: EncoderExtractionConfig, encoder: VisionEncoder | None = None,
                             dataset: ImageDataset | None = None, out_dir: str | os.PathLike | None = None,
                             verify: bool = True, progress: bool = True) -> FeatureStore:
    """Encoder features of one split into a feature store (cached; an interrupted run resumes; chunks whose
    checksum fails are recomputed), in the format :class:`revelio_nb.features.FeatureStore` reads."""
    cfg.validate()
    encoder = encoder or load_encoder(cfg.encoder)
    if str(encoder.encoder_id) != str(cfg.encoder):
        raise EncoderError(f"cfg.encoder {cfg.encoder!r} is not the encoder passed ({encoder.encoder_id!r})")
    cfg.blocks = encoder.check_blocks(cfg.blocks)
    device = resolve_device(cfg.device)
    if encoder.device != device:
        encoder.to(device)
    ds = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    split_idx = ds.split(cfg.split)
    indices = split_idx if cfg.max_images is None else stratified_subset(
        split_idx, ds.labels[split_idx], cfg.max_images, cfg.seed)
    path = Path(out_dir) if out_dir is not None else artifacts.encoder_store_dir(cfg, encoder, ds, indices)
    key = artifacts.encoder_store_key(cfg, encoder, ds, indices)

    def same_key(st: FeatureStore) -> None:  # e.g. an out_dir store made from other images or preprocessing
        if st.manifest.get("key") != key:
            raise StoreMismatchError(f"feature store {path} was made from another encoder, preprocessing or dataset "
                                     f"rows (key {st.manifest.get('key')!r}, asked for {key!r}); use another "
                                     f"out_dir, or delete it to extract again")

    store, rec = open_for_writing(path, cfg.identity(), encoder.weights_hash,
                                  lambda: _create_encoder_store(path, cfg, encoder, ds, indices), verify=verify,
                                  check=same_key)
    if rec is None:
        return store

    def open_arrays() -> dict[str, np.memmap]:
        with writing(path, "the feature arrays"):
            return {k: np.load(path / m["file"], mmap_mode="r+") for k, m in store.manifest["arrays"].items()}

    open_arrays()  # fail early when the folder is not writable
    todo = [c for c in range(store.manifest["n_chunks"]) if c not in store.done_chunks()]
    micro = MicroBatch(store.manifest["chunk_size"])
    autocast_dtype = PRECISIONS[cfg.precision]
    bar = tqdm(total=sum(store.chunk_rows(c).stop - store.chunk_rows(c).start for c in todo),
               desc=f"encode {encoder.name} {cfg.split}", unit="img", disable=not progress)
    for c in todo:
        rows = store.chunk_rows(c)
        x = encoder.preprocess(ds.images[indices[rows]])

        def forward(s: slice) -> dict[str, torch.Tensor]:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return {b: f.cpu() for b, f in encoder.features(x[s], cfg.blocks).items()}

        parts = micro.run(forward, len(x), "encoder pass")
        arrays, sums = open_arrays(), {}
        with writing(path, f"chunk {c}"):
            for b in cfg.blocks:
                key = array_key(b, NO_TIMESTEP)
                f = parts[0][b] if len(parts) == 1 else torch.cat([p[b] for p in parts])
                arrays[key][rows] = f.numpy().astype(cfg.store_dtype)
                arrays[key].flush()
                sums[key] = chunk_sha(arrays[key][rows])
        del arrays
        rec.record(c, sums)
        bar.update(len(x))
    bar.close()
    if len(store.done_chunks()) == store.manifest["n_chunks"]:
        store.manifest["status"] = "complete"
        store.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_manifest(store)
    return FeatureStore(path, store.manifest)


def extract_encoder_splits(cfg: EncoderExtractionConfig, encoder: VisionEncoder | None = None,
                           dataset: ImageDataset | None = None, splits: Sequence[str] = SPLITS,
                           progress: bool = True) -> dict[str, FeatureStore]:
    """:func:`extract_encoder_features` for several splits (each its own cached store)."""
    encoder = encoder or load_encoder(cfg.encoder)
    dataset = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    return {s: extract_encoder_features(replace(cfg, split=s), encoder, dataset, progress=progress) for s in splits}
