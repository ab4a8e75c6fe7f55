"""Diffusion features on disk: extract them once, read them memory-mapped everywhere.

* :mod:`.extract`: :class:`ExtractionConfig` (what to extract) and :func:`extract_features` (the model pass:
  encode, seeded noise, one denoiser pass per timestep, block outputs pooled ``MEAN`` or kept as a ``MAP``: see
  :mod:`revelio_nb.pooling`), :func:`stratified_subset`, :func:`check_store_config`.
* :mod:`.store`: the on-disk :class:`FeatureStore` (manifest, one ``.npy`` per block x timestep, chunked
  resumable writes with checksums, the ``complete`` commit marker): :func:`allocate_store`, :func:`open_for_writing`.
* :mod:`.microbatch`: the forward micro-batch that halves on out-of-memory.
"""

from .extract import (PRECISIONS, ExtractionConfig, check_store_config, create_store, default_store_dir,
                      extract_features, noise_for, resolve_device, stratified_subset)
from .microbatch import MicroBatch, is_oom
from .store import (STORE_DTYPES, FeatureStore, StoreIncompleteError, StoreMismatchError, StoreWriteError,
                    allocate_store, array_key, open_for_writing, summarize)

__all__ = [
    "PRECISIONS", "STORE_DTYPES", "ExtractionConfig", "FeatureStore", "MicroBatch", "StoreIncompleteError",
    "StoreMismatchError", "StoreWriteError", "allocate_store", "array_key", "check_store_config", "create_store",
    "default_store_dir", "extract_features", "is_oom", "noise_for", "open_for_writing", "resolve_device",
    "stratified_subset", "summarize",
]
