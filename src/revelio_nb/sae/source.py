"""Where training and evaluation tokens come from: :class:`ArraySource` serves tokens of a (memory-mapped)
(N, D) or (N, C, H, W) feature array in batches without loading it whole, and :func:`batch_tokens` is the
training order (a keyed permutation per epoch, so an interrupted run resumes exactly)."""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from typing import Any

import numpy as np
from torch import Tensor

from .config import SaeError


def _memmap_file(array) -> tuple[str, int] | None:
    """(file, offset) of a whole, C-ordered ``np.memmap`` (not a view of one), else None."""
    if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and getattr(array, "filename", None)
            and array.flags.c_contiguous and array.mode != "c"):  # copy-on-write edits are not in the file
        return str(array.filename), int(array.offset)
    return None


class ArraySource:
    """Tokens of a (memory-mapped) feature array, gathered in batches; the array is never loaded whole.

    ``array`` is (N, D) (pooled: one token per row) or (N, C, H, W) (spatial: one C-dim token per position).
    ``rows`` restricts to a subset of rows (e.g. the train split). Local token ``t`` is row ``rows[t // (H W)]``
    at position ``t % (H W)`` (row-major h, w); :meth:`locate` maps tokens back to (row, h, w).

    A ``np.memmap`` is read with ``os.pread`` (at most ``remap_bytes`` of rows at a time), never through a mapping:
    a mapped file's pages count in the process's RSS, and the kernel maps whole folios around each touched page, so
    one batch of random rows maps nearly all of a store. Reads keep RAM flat however large the store (the page cache,
    which is not RSS, still serves re-reads).
    """

    remap_bytes = 32 << 20
    """The most bytes of rows read into memory at once (the name is from when reads went through a mapping)."""

    def __init__(self, array, rows=None):
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        if array.ndim not in (2, 4):
            raise SaeError(f"features must be (N, D) or (N, C, H, W), got shape {tuple(array.shape)}")
        self.array = array
        n = array.shape[0]
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(self.rows) == 0:
            raise SaeError("no rows selected")
        if self.rows.min() < 0 or self.rows.max() >= n:
            raise SaeError(f"row indices must be in [0, {n}), got range [{self.rows.min()}, {self.rows.max()}]")
        self.spatial = array.ndim == 4
        self.d_in = int(array.shape[1])
        self.grid = (int(array.shape[2]), int(array.shape[3])) if self.spatial else (1, 1)
        self.positions = self.grid[0] * self.grid[1]
        self.n_tokens = len(self.rows) * self.positions
        self._file = _memmap_file(array)
        self._row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize

    def _read_rows(self, fd: int, rows: np.ndarray) -> np.ndarray:
        """Sorted distinct ``rows`` of the file, one ``pread`` per run of consecutive rows."""
        buf = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        mv = memoryview(buf.reshape(-1).view(np.uint8))
        cuts = np.r_[0, np.flatnonzero(np.diff(rows) != 1) + 1, len(rows)]
        rb = self._row_bytes
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            pos, end, off = a * rb, b * rb, self._file[1] + int(rows[a]) * rb
            while pos < end:
                got = os.preadv(fd, [mv[pos:end]], off + pos - a * rb)
                if got <= 0:
                    raise SaeError(f"{self._file[0]} is shorter than its array header says (truncated?)")
                pos += got
        return buf

    def __len__(self) -> int:
        return self.n_tokens

    def locate(self, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(array row, h, w) of local token ids."""
        tokens = np.asarray(tokens, dtype=np.int64)
        r, p = np.divmod(tokens, self.positions)
        h, w = np.divmod(p, self.grid[1])
        return self.rows[r], h, w

    def gather(self, tokens) -> np.ndarray:
        """Float32 (B, d_in) features of the given local token ids (pass them sorted for locality)."""
        rows, h, w = self.locate(tokens)
        if self._file is None:
            out = self.array[rows, :, h, w] if self.spatial else self.array[rows]
            return np.ascontiguousarray(out, dtype=np.float32)
        out = np.empty((len(rows), self.d_in), dtype=np.float32)
        uniq, inv = np.unique(rows, return_inverse=True)
        order = np.argsort(inv, kind="stable")  # tokens grouped by row: those of uniq[i] are order[at[i]:at[i + 1]]
        at = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        per = max(1, self.remap_bytes // max(1, self._row_bytes))
        fd = os.open(self._file[0], os.O_RDONLY)
        try:
            for s in range(0, len(uniq), per):
                buf = self._read_rows(fd, uniq[s : s + per])
                sel = order[at[s] : at[min(s + per, len(uniq))]]
                loc = inv[sel] - s
                out[sel] = buf[loc, :, h[sel], w[sel]] if self.spatial else buf[loc]
        finally:
            os.close(fd)
        return out

    fingerprint_bytes = 16 << 20
    """The most bytes of rows :meth:`fingerprint` reads for its content sample."""

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the tokens this source serves: shape, dtype, every selected row index, and a content hash of
        a sample of rows spread evenly over them (at least 8 and at most 256 rows, within ``fingerprint_bytes``;
        pread for memory-mapped files, like :meth:`gather`). A resume on other features of the same shape is
        refused by it (see :func:`train_sae`)."""
        n_sample = int(np.clip(self.fingerprint_bytes // max(1, self._row_bytes), 8, 256))
        at = np.linspace(0, len(self.rows) - 1, min(n_sample, len(self.rows))).astype(np.int64)
        sample = np.unique(self.rows[at])
        if self._file is None:
            data = np.ascontiguousarray(self.array[sample])
        else:
            fd = os.open(self._file[0], os.O_RDONLY)
            try:
                data = self._read_rows(fd, sample)
            finally:
                os.close(fd)
        rows = np.ascontiguousarray(self.rows, dtype=np.int64)
        return {"shape": list(self.array.shape), "dtype": str(self.array.dtype), "n_rows": len(self.rows),
                "n_tokens": self.n_tokens, "rows_hash": hashlib.sha256(rows.view(np.uint8)).hexdigest()[:16],
                "content_hash": hashlib.sha256(sample.tobytes() + data.view(np.uint8).tobytes()).hexdigest()[:16]}


def as_source(source, rows=None) -> ArraySource:
    return source if isinstance(source, ArraySource) and rows is None else ArraySource(
        source.array if isinstance(source, ArraySource) else source, rows)


_MASK64 = (1 << 64) - 1


def _mix(v: np.ndarray, key: int) -> np.ndarray:
    """SplitMix64-style hash of uint64 values with a key."""
    z = v + np.uint64((int(key) * 0x9E3779B97F4A7C15) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions, n: int, key: int) -> np.ndarray:
    """A keyed pseudo-random permutation of [0, n) evaluated at ``positions`` in O(1) memory (Feistel + cycle walk)."""
    half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
    mask = np.uint64((1 << half) - 1)
    keys = [int(k) for k in _mix(np.arange(4, dtype=np.uint64), key)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for kk in keys:
            left, right = right, left ^ (_mix(right, kk) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    bad = out >= n
    while bad.any():
        out[bad] = feistel(out[bad])
        bad = out >= n
    return out.astype(np.int64)


def batch_tokens(step: int, batch_size: int, n_tokens: int, seed: int) -> np.ndarray:
    """Sorted local token ids of training batch ``step``: consecutive slices of one fresh permutation per epoch."""
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, within = np.divmod(pos, n_tokens)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = permute(within[sel], n_tokens, key=seed * 1_000_003 + int(e))
    out.sort()
    return out
