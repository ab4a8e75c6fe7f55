"""Feature extraction into an on-disk, memory-mapped, resumable feature store.

For a model, a dataset split, some blocks and timesteps: images are encoded once (VAE for latent models),
noised with the model's own schedule using noise seeded per (image, t, draw), passed once per timestep through
the denoiser with neutral conditioning (by default), and the captured block outputs are mean-pooled (one vector
per image) or kept as spatial maps.

Store layout (a folder)::

    manifest.json                      config, model id + weights hash, cache key + dataset fingerprint,
                                       shapes, package version, status
    labels.npy, indices.npy            row i = dataset image indices[i] of the split, with its label
    <block>@t<t>.npy                   one preallocated .npy per (block, t): (N, C) or (N, C, h, w)
    progress/<writer>.json             chunks finished by each writer, with a sha256 per array chunk

Rows are written in fixed chunks; a chunk counts as done only after its rows are flushed and its record is
atomically replaced, so an interrupted run resumes at the first unfinished chunk and can never misalign rows.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, artifacts
from .data import ImageDataset, load_dataset
from .hooks import FeatureCapture, validate_blocks
from .models import DiffusionModel, load_model
from .paths import atomic_write_json

POOLINGS = ("mean", "none")
STORE_DTYPES = ("float32", "float16")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # autocast dtype of the denoiser pass


class StoreMismatchError(ValueError):
    """A feature store was made with a different model or configuration than the one asked for."""


class StoreIncompleteError(RuntimeError):
    """A feature store has unfinished chunks (an extraction was interrupted): rerun the extraction to resume."""


class StoreWriteError(OSError):
    """A feature store could not be written (disk full, read-only or unwritable folder); finished chunks are kept."""


_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file is too large",
    errno.EACCES: "the folder is not writable", errno.EPERM: "the folder is not writable",
    errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the place of the folder", errno.EISDIR: "a folder is in the place of a file",
}


@contextmanager
def _writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn the OS errors of a full disk / unwritable folder into a :class:`StoreWriteError` that names the path."""
    try:
        yield
    except StoreWriteError:
        raise
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise StoreWriteError(
            e.errno,
            f"cannot write {what} at {path}: {_WRITE_ERRNOS[e.errno]} ({e.strerror or e}). Chunks finished "
            f"earlier are kept; free some space / fix the folder (or pass another out_dir) and rerun to resume",
        ) from e


@dataclass
class ExtractionConfig:
    """What to extract. Every field except ``batch_size``-independent bookkeeping is part of the store identity."""

    model: str = "embedded:animals-unet"
    dataset: str = "animal-mnist"
    split: str = "train"
    blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    timesteps: list[int] = field(default_factory=lambda: [25])
    pooling: str = "mean"  # "mean": one vector per image; "none": keep (C, h, w) maps
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
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype {self.store_dtype!r} is not one of {list(STORE_DTYPES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if isinstance(self.blocks, str):
            self.blocks = [self.blocks]
        if isinstance(self.timesteps, (int, np.integer)):
            self.timesteps = [int(self.timesteps)]
        if not self.timesteps:
            raise ValueError("timesteps is empty: give at least one, e.g. [25]")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"timesteps has duplicates: {self.timesteps}")
        for name in ("n_noise", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be None or a positive integer, got {self.max_images!r}")
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


def array_key(block: str, t: int) -> str:
    return f"{block}@t{int(t)}"


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


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8)).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the store


class FeatureStore:
    """Read (and, for :func:`extract_features`, write) a feature store folder."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] = {}

    # -- reading
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expect: ExtractionConfig | dict[str, Any] | None = None,
        weights_hash: str | None = None,
        allow_incomplete: bool = False,
    ) -> "FeatureStore":
        """Open a store; with ``expect``/``weights_hash`` refuse one made with another config or model."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{path} is not a feature store (no manifest.json)")
        store = cls(path, json.loads(mf.read_text()))
        store.check(expect, weights_hash)
        if not allow_incomplete and store.manifest.get("status") != "complete":
            done, total = len(store.done_chunks()), store.manifest["n_chunks"]
            raise StoreIncompleteError(f"store {path} is incomplete ({done}/{total} chunks): rerun the extraction to resume")
        return store

    def check(self, expect: ExtractionConfig | dict[str, Any] | None = None, weights_hash: str | None = None) -> None:
        diffs = []
        if expect is not None:
            want = expect.identity() if isinstance(expect, ExtractionConfig) else dict(expect)
            have = self.manifest.get("config", {})
            diffs += [f"{k}: store has {have.get(k)!r}, asked for {v!r}" for k, v in want.items()
                      if k in have and _norm(have.get(k)) != _norm(v)]
        if weights_hash is not None and weights_hash != self.manifest.get("weights_hash"):
            diffs.append(f"weights_hash: store has {self.manifest.get('weights_hash')!r}, model has {weights_hash!r}")
        if diffs:
            raise StoreMismatchError(f"feature store {self.path} was made with a different model/config:\n  " + "\n  ".join(diffs))

    def check_key(self, key: str, dataset_fingerprint: str | None = None) -> None:
        """Refuse a store whose recorded cache key (:func:`revelio_nb.artifacts.store_key`) is not ``key``: made
        from other images / labels / splits, or another model or scheduler, than asked for. A store written before
        keys were recorded has none and is checked by config and weights only."""
        have = self.manifest.get("key")
        if have is None or have == key:
            return
        what = "another model, scheduler or config"
        theirs = self.manifest.get("dataset_fingerprint")
        if dataset_fingerprint is not None and theirs != dataset_fingerprint:
            what = (f"another dataset content (images, labels, class names or split): store has dataset fingerprint "
                    f"{theirs!r}, asked for {dataset_fingerprint!r}")
        raise StoreMismatchError(f"feature store {self.path} was made from {what} (key {have!r}, asked for "
                                 f"{key!r}); use another out_dir, or delete it to extract again")

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def blocks(self) -> list[str]:
        return list(self.config["blocks"])

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.config["timesteps"]]

    def keys(self) -> list[tuple[str, int]]:
        return [(b, t) for t in self.timesteps for b in self.blocks]

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.path / "labels.npy")

    @property
    def indices(self) -> np.ndarray:
        return np.load(self.path / "indices.npy")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def array(self, block: str, t: int) -> np.ndarray:
        """Memory-mapped (N, C) or (N, C, h, w) features of one block at one timestep (read-only)."""
        key = array_key(block, t)
        if key not in self.manifest["arrays"]:
            raise KeyError(f"no array for block {block!r} at t={t}; this store has blocks {self.blocks} "
                           f"and timesteps {self.timesteps}")
        if key not in self._arrays:
            self._arrays[key] = np.load(self.path / self.manifest["arrays"][key]["file"], mmap_mode="r")
        return self._arrays[key]

    # -- progress
    def done_chunks(self) -> set[int]:
        done: set[int] = set()
        for f in sorted((self.path / "progress").glob("*.json")):
            try:
                done.update(int(c) for c in json.loads(f.read_text())["chunks"])
            except (json.JSONDecodeError, KeyError, ValueError):
                continue  # a corrupt progress file only costs recomputation
        return done

    def chunk_rows(self, chunk: int) -> slice:
        cs = int(self.manifest["chunk_size"])
        return slice(chunk * cs, min((chunk + 1) * cs, len(self)))

    def verify(self, chunks: Iterable[int] | None = None) -> list[int]:
        """Chunks whose bytes no longer match the checksums recorded when they were written."""
        sums: dict[str, dict[str, str]] = {}
        for f in (self.path / "progress").glob("*.json"):
            try:
                sums.update(json.loads(f.read_text()).get("sha", {}))
            except (json.JSONDecodeError, AttributeError):
                continue
        bad = []
        for c in sorted(self.done_chunks() if chunks is None else chunks):
            rec = sums.get(str(c), {})
            rows = self.chunk_rows(c)
            for key in self.manifest["arrays"]:
                try:
                    arr = np.load(self.path / self.manifest["arrays"][key]["file"], mmap_mode="r")
                    ok = rec.get(key) == _sha(arr[rows])
                except (OSError, ValueError):
                    ok = False
                if not ok:
                    bad.append(c)
                    break
        return bad

    def __repr__(self) -> str:
        c = self.config
        return (f"FeatureStore({self.path.name}: {c['model']} on {c['dataset']}/{c['split']}, {len(self)} rows, "
                f"blocks={self.blocks}, t={self.timesteps}, pooling={c['pooling']}, status={self.manifest.get('status')})")


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


# ------------------------------------------------------------------------------------------ extraction


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_store_dir(cfg: ExtractionConfig, model: DiffusionModel, dataset: ImageDataset) -> Path:
    """The cache folder of the store ``cfg`` extracts from ``model`` on ``dataset``, keyed by everything that
    changes its numbers (:func:`revelio_nb.artifacts.store_dir`)."""
    return artifacts.store_dir(cfg, model, dataset)


class _Writer:
    """Records finished chunks of one writer (one process) atomically."""

    def __init__(self, store: FeatureStore, writer: str):
        self.file = store.path / "progress" / f"{writer}.json"
        with _writing(self.file.parent, "the progress folder"):
            self.file.parent.mkdir(exist_ok=True)
        try:
            state = json.loads(self.file.read_text()) if self.file.is_file() else {}
            self.chunks: list[int] = [int(c) for c in state.get("chunks", [])]
            self.sha: dict[str, dict[str, str]] = dict(state.get("sha", {}))
        except (ValueError, TypeError, AttributeError):  # a damaged progress file only costs recomputing its chunks
            warnings.warn(f"progress file {self.file} is unreadable; its chunks will be recomputed")
            self.chunks, self.sha = [], {}

    def _save(self) -> None:
        with _writing(self.file, "a progress record"):
            atomic_write_json(self.file, {"chunks": sorted(set(self.chunks)), "sha": self.sha})

    def drop(self, bad: Iterable[int]) -> None:
        bad = set(bad)
        self.chunks = [c for c in self.chunks if c not in bad]
        self.sha = {k: v for k, v in self.sha.items() if int(k) not in bad}
        self._save()

    def record(self, chunk: int, sums: dict[str, str]) -> None:
        self.chunks.append(int(chunk))
        self.sha[str(chunk)] = sums
        self._save()


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
            shape = (n, shapes[b][0]) if cfg.pooling == "mean" else (n, *shapes[b])
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
        "n_rows": n,
        "chunk_size": cfg.batch_size,
        "n_chunks": (n + cfg.batch_size - 1) // cfg.batch_size,
        "arrays": arrays,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": "incomplete",
    }
    return allocate_store(path, manifest, ds.labels[indices], indices)


def allocate_store(path: Path, manifest: dict[str, Any], labels: np.ndarray, indices: np.ndarray) -> FeatureStore:
    """Write a new, empty store from its ``manifest`` (``arrays``: file and shape of each array,
    ``config.store_dtype``); status ``incomplete``. Shared by every kind of feature store.

    A previous manifest and progress records in ``path`` are removed first and the manifest is written last, so a
    crash anywhere in here leaves a folder that the next run simply creates again. The disk space is checked
    up front and the array files are allocated on disk (not sparse), so a full disk is a clear error now, not a
    crash (SIGBUS) half-way through writing the memory maps.
    """
    arrays, n, dtype = manifest["arrays"], len(indices), manifest["config"]["store_dtype"]
    with _writing(path, "the feature store folder"):
        path.mkdir(parents=True, exist_ok=True)
        (path / "manifest.json").unlink(missing_ok=True)
        for f in (path / "progress").glob("*.json"):
            f.unlink()
    itemsize = np.dtype(dtype).itemsize
    need = sum(int(np.prod(m["shape"])) * itemsize + 4096 for m in arrays.values()) + 16 * n + (1 << 20)
    reclaim = sum((path / m["file"]).stat().st_size for m in arrays.values() if (path / m["file"]).is_file())
    free = shutil.disk_usage(path).free + reclaim
    if need > free:
        raise StoreWriteError(errno.ENOSPC, f"cannot create the feature store at {path}: it needs {need / 2**20:.1f} "
                              f"MiB and only {free / 2**20:.1f} MiB are free on that disk; free some space or pass "
                              f"out_dir= on a larger disk (nothing was written)")
    for key, m in arrays.items():
        with _writing(path / m["file"], f"the array of {key}"):
            np.lib.format.open_memmap(path / m["file"], mode="w+", dtype=dtype, shape=tuple(m["shape"])).flush()
            _allocate(path / m["file"])
    with _writing(path, "labels.npy / indices.npy"):
        np.save(path / "labels.npy", labels)
        np.save(path / "indices.npy", indices)
    manifest = {**manifest, "status": "incomplete"}
    with _writing(path / "manifest.json", "the manifest"):
        atomic_write_json(path / "manifest.json", manifest)
    return FeatureStore(path, manifest)


def _allocate(file: Path) -> None:
    """Reserve the blocks of a (sparse) file on disk: ENOSPC now instead of SIGBUS when a memory map is written."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it: stay sparse
            raise
    finally:
        os.close(fd)


def _check_files(store: FeatureStore) -> bool:
    """True if every array file exists with the expected header and size (else the store must be rebuilt)."""
    for meta in store.manifest["arrays"].values():
        try:
            arr = np.load(store.path / meta["file"], mmap_mode="r")
            if list(arr.shape) != meta["shape"]:
                return False
        except (OSError, ValueError):
            return False
    return True


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
        with _writing(path, "the feature arrays"):
            return {k: np.load(path / m["file"], mmap_mode="r+") for k, m in store.manifest["arrays"].items()}

    open_arrays()  # fail early (before any forward pass) when the folder is not writable
    cs = store.manifest["chunk_size"]
    micro = _MicroBatch(cs)
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
                        return {b: (f.float().mean(dim=(2, 3)) if cfg.pooling == "mean" else f.float()).cpu()
                                for b, f in feats.items()}

                    parts = micro.run(forward, len(idx), f"denoiser pass at t={t}")
                    for b in cfg.blocks:
                        f = parts[0][b] if len(parts) == 1 else torch.cat([p[b] for p in parts])
                        acc[b] = acc[b] + f if b in acc else f
                with _writing(path, f"chunk {c}"):
                    for b, f in acc.items():
                        key = array_key(b, t)
                        arrays[key][rows] = (f / cfg.n_noise).numpy().astype(cfg.store_dtype)
            with _writing(path, f"chunk {c}"):
                for key, arr in arrays.items():
                    arr.flush()
                    sums[key] = _sha(arr[rows])
            del arrays
            rec.record(c, sums)
            bar.update(len(idx))
    bar.close()
    if coordinator and len(store.done_chunks()) == store.manifest["n_chunks"]:
        store.manifest["status"] = "complete"
        store.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_manifest(store)
    return FeatureStore(path, store.manifest)


def open_for_writing(
    path: Path,
    expect: ExtractionConfig | dict[str, Any],
    weights_hash: str,
    create: Callable[[], FeatureStore],
    writer: str = "main",
    verify: bool = True,
    coordinator: bool = True,
    check: Callable[[FeatureStore], None] | None = None,
) -> tuple[FeatureStore, "_Writer | None"]:
    """Open the store at ``path`` to fill it, or make it with ``create()`` (shared by every kind of feature store).

    A store made with another config / weights is refused (:class:`StoreMismatchError`; ``check(store)``, if
    given, may refuse more, e.g. another cache key); an unreadable manifest or
    missing / truncated array files rebuild the store; with ``verify`` the coordinator drops the chunks whose bytes
    no longer match their checksums. Returns ``(store, None)`` when the store is complete (nothing to write),
    else ``(store, progress record of this writer)``.
    """
    store = None
    if (path / "manifest.json").is_file():
        try:
            store = FeatureStore.open(path, expect=expect, weights_hash=weights_hash, allow_incomplete=True)
            if check is not None:
                check(store)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not coordinator:
                raise StoreIncompleteError(f"the manifest of {path} is unreadable ({e}); run the coordinator first") from e
            warnings.warn(f"the manifest of feature store {path} is unreadable ({e}); rebuilding the store")
    elif not coordinator:
        raise StoreIncompleteError(f"no feature store at {path}: the coordinator (rank 0) creates it first; with "
                                   "several machines, the folder must be on a file system that every rank shares")
    if store is not None:
        n_chunks = store.manifest["n_chunks"]
        if store.manifest.get("status") == "complete" and len(store.done_chunks()) < n_chunks:
            store.manifest["status"] = "incomplete"  # e.g. a repair was interrupted: never trust 'complete' alone
            if coordinator:
                _write_manifest(store)
        if store.manifest.get("status") == "complete" and not verify:
            return store, None
        if not _check_files(store):  # truncated / missing array files: rebuild, nothing else is trustworthy
            if not coordinator:
                raise StoreIncompleteError(f"array files of {path} are missing or truncated; run the coordinator first")
            warnings.warn(f"array files of feature store {path} are missing or truncated; rebuilding the store")
            store = None
    if store is None:
        store = create()

    rec = _Writer(store, writer)
    if coordinator and verify and store.done_chunks():
        bad = store.verify()
        if bad:
            warnings.warn(f"{len(bad)} chunk(s) of feature store {path} do not match their checksums "
                          f"(chunks {bad[:20]}); recomputing only those")
            store.manifest["status"] = "incomplete"  # first: a crash below must not leave 'complete' + missing chunks
            _write_manifest(store)
            rec.drop(bad)
            for f in (path / "progress").glob("*.json"):  # other writers' bad chunks too
                if f != rec.file:
                    _Writer(store, f.stem).drop(bad)
    if store.manifest.get("status") == "complete":
        return store, None
    return store, rec


def _write_manifest(store: FeatureStore) -> None:
    with _writing(store.path / "manifest.json", "the manifest"):
        atomic_write_json(store.path / "manifest.json", store.manifest)


def _is_oom(e: BaseException) -> bool:
    """CUDA (and other accelerators') out-of-memory errors, and the CPU allocator's failure to allocate."""
    if isinstance(e, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class _MicroBatch:
    """The forward micro-batch of one extraction: starts at the chunk size and halves on out-of-memory.

    Only the forward passes are split: chunks (and so rows, progress and checksums) never change. Features of a
    micro-batched pass equal the full-batch ones up to floating-point reassociation in the kernels.
    """

    def __init__(self, size: int):
        self.size = int(size)

    def run(self, fn: Callable[[slice], Any], n: int, what: str) -> list[Any]:
        while True:
            try:
                return [fn(slice(i, min(i + self.size, n))) for i in range(0, n, self.size)]
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not _is_oom(e):
                    raise
                if self.size == 1:
                    raise RuntimeError(
                        f"out of memory in the {what} even with a micro-batch of 1 image; use a smaller image_size, "
                        f"fewer blocks, precision='fp16'/'bf16', or a device with more memory") from e
            # outside the except block, so the traceback (and the tensors it holds) is already released
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.size = max(1, self.size // 2)
            warnings.warn(f"out of memory in the {what}: retrying with a forward micro-batch of {self.size}")


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


def summarize(store: FeatureStore):
    """One row per (block, t): shape and simple statistics (a first sanity check of a store)."""
    import pandas as pd

    rows = []
    for b, t in store.keys():
        a = store.array(b, t)
        sample = np.asarray(a[: min(len(a), 512)], dtype=np.float64)
        rows.append({"block": b, "t": t, "shape": tuple(a.shape), "mean": sample.mean(), "std": sample.std(),
                     "finite": bool(np.isfinite(sample).all()), "mb": round(a.nbytes / 2**20, 2)})
    return pd.DataFrame(rows)
