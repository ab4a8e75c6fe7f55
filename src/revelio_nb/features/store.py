"""The on-disk feature store: one folder per (model, dataset split, config), memory-mapped and resumable.

Layout (a folder)::

    manifest.json                      config, model id + weights hash, cache key + dataset fingerprint,
                                       shapes, package version, status (the commit marker: ``complete``)
    labels.npy, indices.npy            row i = dataset image indices[i] of the split, with its label
    <block>@t<t>.npy                   one preallocated .npy per (block, t): (N, C) or (N, C, h, w)
    progress/<writer>.json             chunks finished by each writer, with a sha256 per array chunk

Rows are written in fixed chunks; a chunk counts as done only after its rows are flushed and its record is
atomically replaced, so an interrupted run resumes at the first unfinished chunk and can never misalign rows.

* :class:`FeatureStore`: open (refusing another config / model / cache key; a manifest of an earlier version is read
  with its pooling in today's spelling, :func:`revelio_nb.pooling.read_pooling_field`), read arrays, chunks, verify
  checksums.
* :func:`allocate_store`: a new empty store from its manifest (disk space checked, files allocated).
* :func:`open_for_writing`: open a store to fill it (or create it), with the per-writer progress record.
* :func:`writing`, :func:`chunk_sha`, :func:`write_manifest`: the pieces every store writer shares (diffusion
  features in :mod:`revelio_nb.features.extract`, vision encoders in :mod:`revelio_nb.encoders`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from .. import __version__
from ..paths import atomic_write_json
from ..pooling import read_pooling_field


STORE_DTYPES = ("float32", "float16")


class StoreConfig(Protocol):
    """What a store is checked against: a config with the fields that decide its content
    (:class:`revelio_nb.features.ExtractionConfig`, :class:`revelio_nb.encoders.EncoderExtractionConfig`)."""

    def identity(self) -> dict[str, Any]: ...


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
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
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


def array_key(block: str, t: int) -> str:
    return f"{block}@t{int(t)}"


def chunk_sha(arr: np.ndarray) -> str:
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
        expect: StoreConfig | dict[str, Any] | None = None,
        weights_hash: str | None = None,
        allow_incomplete: bool = False,
    ) -> "FeatureStore":
        """Open a store; with ``expect``/``weights_hash`` refuse one made with another config or model."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{path} is not a feature store (no manifest.json)")
        manifest = json.loads(mf.read_text())
        if isinstance(manifest.get("config"), dict):  # a store of an earlier version: pooling "none" is now "map"
            manifest["config"] = read_pooling_field(manifest["config"])
        store = cls(path, manifest)
        store.check(expect, weights_hash)
        if not allow_incomplete and store.manifest.get("status") != "complete":
            done, total = len(store.done_chunks()), store.manifest["n_chunks"]
            raise StoreIncompleteError(f"store {path} is incomplete ({done}/{total} chunks): rerun the extraction to resume")
        return store

    def check(self, expect: StoreConfig | dict[str, Any] | None = None, weights_hash: str | None = None) -> None:
        diffs = []
        if expect is not None:
            want = expect.identity() if hasattr(expect, "identity") else dict(expect)
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
                    ok = rec.get(key) == chunk_sha(arr[rows])
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


class _Writer:
    """Records finished chunks of one writer (one process) atomically."""

    def __init__(self, store: FeatureStore, writer: str):
        self.file = store.path / "progress" / f"{writer}.json"
        with writing(self.file.parent, "the progress folder"):
            self.file.parent.mkdir(exist_ok=True)
        try:
            state = json.loads(self.file.read_text()) if self.file.is_file() else {}
            self.chunks: list[int] = [int(c) for c in state.get("chunks", [])]
            self.sha: dict[str, dict[str, str]] = dict(state.get("sha", {}))
        except (ValueError, TypeError, AttributeError):  # a damaged progress file only costs recomputing its chunks
            warnings.warn(f"progress file {self.file} is unreadable; its chunks will be recomputed")
            self.chunks, self.sha = [], {}

    def _save(self) -> None:
        with writing(self.file, "a progress record"):
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


def allocate_store(path: Path, manifest: dict[str, Any], labels: np.ndarray, indices: np.ndarray,
                   chunk_size: int) -> FeatureStore:
    """Write a new, empty store from its ``manifest`` (``arrays``: file and shape of each array,
    ``config.store_dtype``). Shared by every kind of feature store, it adds the bookkeeping every store has: rows,
    chunks of ``chunk_size`` rows, package version, creation time and status ``incomplete``.

    A previous manifest and progress records in ``path`` are removed first and the manifest is written last, so a
    crash anywhere in here leaves a folder that the next run simply creates again. The disk space is checked
    up front and the array files are allocated on disk (not sparse), so a full disk is a clear error now, not a
    crash (SIGBUS) half-way through writing the memory maps.
    """
    arrays, n, dtype = manifest["arrays"], len(indices), manifest["config"]["store_dtype"]
    with writing(path, "the feature store folder"):
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
        with writing(path / m["file"], f"the array of {key}"):
            np.lib.format.open_memmap(path / m["file"], mode="w+", dtype=dtype, shape=tuple(m["shape"])).flush()
            _allocate(path / m["file"])
    with writing(path, "labels.npy / indices.npy"):
        np.save(path / "labels.npy", labels)
        np.save(path / "indices.npy", indices)
    manifest = {**manifest, "n_rows": n, "chunk_size": int(chunk_size), "n_chunks": -(-n // int(chunk_size)),
                "package_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "incomplete"}
    with writing(path / "manifest.json", "the manifest"):
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


def open_for_writing(
    path: Path,
    expect: StoreConfig | dict[str, Any],
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
                write_manifest(store)
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
            write_manifest(store)
            rec.drop(bad)
            for f in (path / "progress").glob("*.json"):  # other writers' bad chunks too
                if f != rec.file:
                    _Writer(store, f.stem).drop(bad)
    if store.manifest.get("status") == "complete":
        return store, None
    return store, rec


def write_manifest(store: FeatureStore) -> None:
    with writing(store.path / "manifest.json", "the manifest"):
        atomic_write_json(store.path / "manifest.json", store.manifest)


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
