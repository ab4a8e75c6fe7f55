"""Diffusion features on disk: extract them once, read them memory-mapped everywhere.

* :mod:`.extract`: :class:`ExtractionConfig` (what to extract) and :func:`extract_features` (the model pass:
  encode, seeded noise, one denoiser pass per timestep, pooled or spatial block outputs), :func:`stratified_subset`.
* :mod:`.store`: the on-disk :class:`FeatureStore` (manifest, one ``.npy`` per block x timestep, chunked
  resumable writes with checksums, the ``complete`` commit marker): :func:`allocate_store`, :func:`open_for_writing`.
* :mod:`.microbatch`: the forward micro-batch that halves on out-of-memory.
"""

from .extract import (POOLINGS, PRECISIONS, ExtractionConfig, create_store, default_store_dir, extract_features,
                      noise_for, resolve_device, stratified_subset)
from .microbatch import MicroBatch, is_oom
from .store import (STORE_DTYPES, FeatureStore, StoreIncompleteError, StoreMismatchError, StoreWriteError,
                    allocate_store, array_key, open_for_writing, summarize)

__all__ = [
    "POOLINGS", "PRECISIONS", "STORE_DTYPES", "ExtractionConfig", "FeatureStore", "MicroBatch", "StoreIncompleteError",
    "StoreMismatchError", "StoreWriteError", "allocate_store", "array_key", "create_store", "default_store_dir",
    "extract_features", "is_oom", "noise_for", "open_for_writing", "resolve_device", "stratified_subset", "summarize",
]
