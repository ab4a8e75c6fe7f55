"""Peak memory of SAE training and latent statistics streamed from a memory-mapped feature store.

    python benchmarks/memory_bench.py                      # 2M spatial tokens x 256 dims (2 GB) and a 4x smaller store
    python benchmarks/memory_bench.py --tokens 200000      # quick run
    python benchmarks/memory_bench.py --compare-mmap       # also measure naive memmap fancy-indexing

A synthetic spatial feature store (images x 256 channels x 8 x 8, float32, in the FeatureStore format: manifest,
labels, indices, one .npy) is written under /tmp with plain file writes, then a FRESH child process per store size
opens it, trains a top-k SAE for a fixed number of steps on shuffled token batches gathered from random images,
and computes latent statistics (firing frequency, mean activation, top image per latent) over EVERY token of the
store. The child's peak RSS (getrusage high-water mark) is reported; streaming means it must not grow with the
store (the full store is 4x the small one, and both are far larger than one batch). Temporary files are deleted.

Rows are read with ``os.pread`` into small buffers: page-cache pages then never count in the process's RSS. A
memory map indexed directly (``arr[idx]``) keeps every page it touched mapped and resident, so its RSS grows up
to the store size (see ``--compare-mmap``); the real SAE module should read through a reader like ``RowReader``.

The training / statistics functions are stand-ins for ``revelio_nb.sae.train_sae`` and
``revelio_nb.latents``: swapping them is the one line marked ``SWAP`` in :func:`train` and :func:`stats`.

Final line: ``RESULT peak_rss_mb=... store_mb=... peak_rss_small_mb=... store_small_mb=... growth_mb=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HW = 8  # spatial side of the stand-in block (8 x 8 = 64 tokens per image)


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if platform.system() == "Darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


# ------------------------------------------------------------------------------------------ synthetic store


def build_store(path: Path, tokens: int, dim: int, seed: int = 0, chunk_images: int = 512) -> Path:
    """A complete FeatureStore folder with one spatial array (N, dim, 8, 8) of sparse-dictionary features."""
    import torch

    from revelio_nb.paths import atomic_write_json

    n = max(1, tokens // (HW * HW))
    path.mkdir(parents=True, exist_ok=True)
    key, fname = "mid_block@t25", "mid_block@t25.npy"
    shape = (n, dim, HW, HW)
    mm = np.lib.format.open_memmap(path / fname, mode="w+", dtype=np.float32, shape=shape)  # header + sparse file
    offset = mm.offset
    del mm
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * dim, dim, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    fd = os.open(path / fname, os.O_WRONLY)
    try:
        for i in range(0, n, chunk_images):
            b = min(chunk_images, n - i)
            idx = torch.randint(0, len(atoms), (b * HW * HW, 8), generator=g)
            w = torch.rand(idx.shape, generator=g) * 2
            x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=w, mode="sum")
            x += 0.05 * torch.randn(x.shape, generator=g)
            block = x.view(b, HW, HW, dim).permute(0, 3, 1, 2).contiguous().numpy()
            os.pwrite(fd, block.tobytes(), offset + i * dim * HW * HW * 4)  # plain writes: nothing stays mapped
    finally:
        os.close(fd)
    labels = np.arange(n, dtype=np.int64) % 10
    np.save(path / "labels.npy", labels)
    np.save(path / "indices.npy", np.arange(n, dtype=np.int64))
    atomic_write_json(path / "manifest.json", {
        "format": "revelio-feature-store/1",
        "config": {"model": "synthetic", "dataset": "synthetic", "split": "train", "blocks": ["mid_block"],
                   "timesteps": [25], "pooling": "none", "n_noise": 1, "seed": seed, "store_dtype": "float32"},
        "model_id": "synthetic", "model_kind": "unet", "weights_hash": "synthetic", "dataset": "synthetic",
        "class_names": [str(c) for c in range(10)], "split": "train", "image_size": 32, "n_rows": n,
        "chunk_size": 64, "n_chunks": (n + 63) // 64, "status": "complete",
        "arrays": {key: {"file": fname, "block": "mid_block", "t": 25, "shape": list(shape)}},
    })
    return path


# ------------------------------------------------------------------------------------------ streaming reads


class RowReader:
    """Rows of a store array read with ``os.pread`` (no memory map stays resident in the process)."""

    def __init__(self, file: Path):
        with open(file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            self.offset = fh.tell()
        if fortran:
            raise ValueError(f"{file}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.fd = os.open(file, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        buf = os.pread(self.fd, (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape(stop - start, *self.shape[1:])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order), reading each run of consecutive sorted rows once."""
        order = np.argsort(idx)
        s = np.asarray(idx)[order]
        out = np.empty((len(s), *self.shape[1:]), dtype=self.dtype)
        i = 0
        while i < len(s):
            j = i + 1
            while j < len(s) and s[j] == s[j - 1] + 1:
                j += 1
            out[i:j] = self.rows(int(s[i]), int(s[j - 1]) + 1)
            i = j
        res = np.empty_like(out)
        res[order] = out
        return res

    def close(self) -> None:
        os.close(self.fd)


class MmapReader(RowReader):
    """The naive way, for comparison: fancy-index the memory map (touched pages stay resident)."""

    def __init__(self, file: Path):
        super().__init__(file)
        self.arr = np.load(file, mmap_mode="r")

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.arr[start:stop])

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.arr[np.asarray(idx)]


def token_batches(reader: RowReader, batch_tokens: int, steps: int, seed: int):
    """Shuffled (batch_tokens, C) batches: random images per batch, their tokens shuffled together."""
    import torch

    per_image = int(np.prod(reader.shape[2:]))
    n_img = max(1, batch_tokens // per_image)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(reader))
    pos = 0
    for _ in range(steps):
        if pos + n_img > len(perm):
            perm, pos = rng.permutation(len(reader)), 0
        maps = reader.take(perm[pos : pos + n_img])
        pos += n_img
        tokens = maps.reshape(len(maps), maps.shape[1], -1).transpose(0, 2, 1).reshape(-1, maps.shape[1])
        yield torch.from_numpy(tokens[rng.permutation(len(tokens))])


# ------------------------------------------------------------------------------------------ SAE stand-in


def make_sae(dim: int, latents: int, k: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TopKSAE(nn.Module):
        def __init__(self):
            super().__init__()
            w = torch.randn(latents, dim)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec = nn.Parameter(w)
            self.W_enc = nn.Parameter(w.T.clone())
            self.b_enc = nn.Parameter(torch.zeros(latents))
            self.b_dec = nn.Parameter(torch.zeros(dim))

        def encode(self, x):
            vals, idx = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc).topk(k, dim=1)
            return vals, idx

        def forward(self, x):
            vals, idx = self.encode(x)
            return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec, vals, idx

    return TopKSAE()


def standin_train(reader: RowReader, steps: int, batch_tokens: int, k: int, expansion: int, seed: int):
    import torch

    torch.manual_seed(seed)
    sae = make_sae(reader.shape[1], expansion * reader.shape[1], k)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    fvu = []
    for step, x in enumerate(token_batches(reader, batch_tokens, steps, seed)):
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        x_hat, _, _ = sae(x)
        loss = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        fvu.append(float(loss))
    return sae, fvu


def standin_stats(reader: RowReader, sae, images_per_read: int = 256) -> dict:
    """Per-latent firing frequency, mean activation when firing and top image, over every token of the store."""
    import torch

    m = sae.W_dec.shape[0]
    count, total = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    top_val, top_img = torch.full((m,), -1.0), torch.full((m,), -1, dtype=torch.long)
    per_image = int(np.prod(reader.shape[2:]))
    with torch.no_grad():
        for start in range(0, len(reader), images_per_read):
            maps = reader.rows(start, min(start + images_per_read, len(reader)))
            x = torch.from_numpy(maps.reshape(len(maps), maps.shape[1], -1).transpose(0, 2, 1).reshape(-1, maps.shape[1]))
            vals, idx = sae.encode(x)
            fired = vals > 0
            count.index_add_(0, idx[fired], torch.ones(int(fired.sum()), dtype=torch.float64))
            total.index_add_(0, idx[fired], vals[fired].double())
            img = start + torch.arange(len(x)) // per_image
            best = torch.full((m,), -1.0).scatter_reduce(0, idx.flatten(), vals.flatten(), "amax")
            better = best > top_val
            if better.any():  # the image of the best token of each improved latent
                flat_img = img.repeat_interleave(idx.shape[1])
                hit = (vals.flatten() == best[idx.flatten()]) & better[idx.flatten()]
                top_img[idx.flatten()[hit]] = flat_img[hit]
                top_val = torch.maximum(top_val, best)
    n_tokens = len(reader) * per_image
    return {"tokens": n_tokens, "dead": int((count == 0).sum()), "mean_freq": float(count.sum() / n_tokens / m)}


def train(store_path: Path, args):
    reader = (MmapReader if args.reader == "mmap" else RowReader)(store_path / "mid_block@t25.npy")
    # SWAP: return revelio_nb.sae.train_sae(FeatureStore.open(store_path), "mid_block", 25, ...)
    return reader, standin_train(reader, args.steps, args.batch_tokens, args.k, args.expansion, args.seed)


def stats(reader: RowReader, sae, args) -> dict:
    # SWAP: return revelio_nb.latents.latent_stats(sae, FeatureStore.open(store_path), "mid_block", 25)
    return standin_stats(reader, sae)


# ------------------------------------------------------------------------------------------ driver


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    base = current_rss_mb()
    t0 = time.perf_counter()
    reader, (sae, fvu) = train(Path(args.child), args)
    t_train = time.perf_counter() - t0
    peak_train = peak_rss_mb()
    s = stats(reader, sae, args)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_train_mb": round(peak_train, 1),
                      "rss_after_imports_mb": round(base, 1),
                      "rss_end_mb": round(current_rss_mb(), 1), "fvu_first": round(fvu[0], 3),
                      "fvu_last": round(float(np.mean(fvu[-10:])), 3), "train_s": round(t_train, 1),
                      "stats_s": round(time.perf_counter() - t0 - t_train, 1), **s}))


def measure(store: Path, args, reader: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), "--reader", reader, "--steps", str(args.steps),
           "--batch-tokens", str(args.batch_tokens), "--k", str(args.k), "--expansion", str(args.expansion),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2_000_000, help="spatial tokens in the big store")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=150, help="SAE training steps (the same for both sizes)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the temporary stores go (default: a new folder in /tmp)")
    p.add_argument("--compare-mmap", action="store_true", help="also measure naive memmap indexing")
    p.add_argument("--reader", choices=["pread", "mmap"], default="pread", help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="revelio-membench-", dir=args.workdir or "/tmp"))
    try:
        rows = {}
        for name, tokens in (("small", args.tokens // 4), ("big", args.tokens)):
            t0 = time.perf_counter()
            store = build_store(work / name, tokens, args.dim, args.seed)
            mb = (store / "mid_block@t25.npy").stat().st_size / 2**20
            print(f"built {name} store: {tokens} tokens x {args.dim} = {mb:.0f} MB in {time.perf_counter() - t0:.1f}s",
                  flush=True)
            readers = ["pread", "mmap"] if args.compare_mmap else ["pread"]
            for reader in readers:
                r = measure(store, args, reader)
                rows[(name, reader)] = {**r, "store_mb": round(mb, 1)}
                print(f"  {reader:5s}: {json.dumps(r)}", flush=True)
            shutil.rmtree(store)
        if args.compare_mmap:
            print(f"INFO naive memmap: peak_rss_mb={rows[('big', 'mmap')]['peak_rss_mb']} (big) vs "
                  f"{rows[('small', 'mmap')]['peak_rss_mb']} (small)")
        big, small = rows[("big", "pread")], rows[("small", "pread")]
        print(f"RESULT peak_rss_mb={big['peak_rss_mb']} store_mb={big['store_mb']} "
              f"peak_rss_small_mb={small['peak_rss_mb']} store_small_mb={small['store_mb']} "
              f"growth_mb={round(big['peak_rss_mb'] - small['peak_rss_mb'], 1)} tokens={big['tokens']} "
              f"batch_tokens={args.batch_tokens} dim={args.dim}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
