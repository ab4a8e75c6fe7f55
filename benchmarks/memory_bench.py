"""Peak memory of SAE training and latent statistics streamed from a memory-mapped feature store.

    python benchmarks/memory_bench.py                      # 2M spatial tokens x 256 dims (2 GB) and a 4x smaller store
    python benchmarks/memory_bench.py --tokens 200000      # quick run
    python benchmarks/memory_bench.py --compare-mmap       # also measure naive memmap fancy-indexing

A synthetic spatial feature store (images x 256 channels x 8 x 8, float32, in the FeatureStore format: manifest,
labels, indices, one .npy) is written under /tmp with plain file writes, then a FRESH child process per store size
opens it with ``FeatureStore.open``, trains a k-SAE with ``revelio_nb.sae.train_sae`` for a fixed number of steps
(shuffled token batches gathered from the whole store) and computes ``revelio_nb.latents.latent_stats`` (firing
frequencies, top images, label purity, AUROC, per-position maps) over EVERY token of the store. The child's peak RSS
(getrusage high-water mark) is reported; streaming means it must not grow with the store (the full store is 4x the
small one, and both are far larger than one batch). Temporary files are deleted.

``ArraySource`` reads rows with ``os.pread`` into small buffers: page-cache pages then never count in the process's
RSS. A memory map indexed directly (``arr[idx]``) keeps every page it touched mapped and resident (and the kernel
maps whole folios around each touched page), so its RSS grows up to the store size: ``--compare-mmap`` measures
that too (``mmap`` rows). ``latent_stats`` spills its (image, latent, score) entries to a temporary folder past
``max_entries`` and processes them one range of latents at a time.

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

HW = 8  # spatial side of the synthetic block (8 x 8 = 64 tokens per image)


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
                   "timesteps": [25], "pooling": "map", "n_noise": 1, "seed": seed, "store_dtype": "float32"},
        "model_id": "synthetic", "model_kind": "unet", "weights_hash": "synthetic", "dataset": "synthetic",
        "class_names": [str(c) for c in range(10)], "split": "train", "image_size": 32, "n_rows": n,
        "chunk_size": 64, "n_chunks": (n + 63) // 64, "status": "complete",
        "arrays": {key: {"file": fname, "block": "mid_block", "t": 25, "shape": list(shape)}},
    })
    return path


# ------------------------------------------------------------------------------------------ the measured work


def open_source(store_path: Path, args):
    """The store's one array as an ``ArraySource`` (``--reader mmap``: one mapping kept open, the naive way)."""
    from revelio_nb.features import FeatureStore
    from revelio_nb.sae import ArraySource

    store = FeatureStore.open(store_path)
    source = ArraySource(store.array("mid_block", 25))
    if args.reader == "mmap":
        source._file = None  # fancy-index the memmap: every touched page stays mapped, in the RSS
    return store, source


def train(store_path: Path, args):
    from revelio_nb.sae import SaeConfig, TrainConfig, train_sae

    store, source = open_source(store_path, args)
    cfg = TrainConfig(sae=SaeConfig(expansion_factor=args.expansion, k=args.k), batch_size=args.batch_tokens,
                      steps=args.steps, checkpoint_every=args.steps, seed=args.seed, device="cpu")
    out = store_path / f"sae-{args.reader}"
    shutil.rmtree(out, ignore_errors=True)  # train from scratch (a finished folder would just be loaded)
    return store, source, train_sae(source, cfg, out, progress=False)


def stats(store, source, sae, args) -> dict:
    import torch

    from revelio_nb.latents import latent_stats
    from revelio_nb.sae import batch_tokens

    st = latent_stats(sae, source, store.labels, image_index=store.indices, class_names=store.class_names)
    with torch.no_grad():  # reconstruction quality on one training-sized batch, as a sanity check
        x = torch.from_numpy(source.gather(batch_tokens(0, args.batch_tokens, source.n_tokens, args.seed + 1)))
        fvu = float(sae(x).fvu)
    freq = st.table["freq_tokens"].to_numpy()
    return {"tokens": source.n_tokens, "fvu_batch": round(fvu, 3), "dead": int((freq == 0).sum()),
            "mean_freq": float(freq.mean()), "top_filled": float((st.top_rows >= 0).mean())}


# ------------------------------------------------------------------------------------------ driver


def child(args) -> None:
    import torch

    import revelio_nb.latents  # noqa: F401  (imports count in the baseline, not in the measured work)

    torch.set_num_threads(args.threads)
    base = current_rss_mb()
    t0 = time.perf_counter()
    store, source, sae = train(Path(args.child), args)
    t_train = time.perf_counter() - t0
    peak_train = peak_rss_mb()
    s = stats(store, source, sae, args)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_train_mb": round(peak_train, 1),
                      "rss_after_imports_mb": round(base, 1), "rss_end_mb": round(current_rss_mb(), 1),
                      "train_s": round(t_train, 1), "stats_s": round(time.perf_counter() - t0 - t_train, 1), **s}))


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
