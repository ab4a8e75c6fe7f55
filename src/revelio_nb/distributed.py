"""Feature extraction on several processes / GPUs with ``torch.distributed``.

Launch one process per GPU (or several CPU processes) with ``torchrun`` or ``accelerate launch``::

    torchrun --standalone --nproc_per_node 4 -m revelio_nb.distributed \\
        --model runwayml/stable-diffusion-v1-5 --dataset hf:imagenet-1k --split train \\
        --blocks mid_block up_blocks.1 --timesteps 25 100 --pooling map --precision fp16

Every rank fills a disjoint set of chunks of ONE feature store (chunk ``c`` goes to rank ``c % world_size``), so
rows stay the dataset indices of the split and the store is the very same as a single-process
:func:`revelio_nb.features.extract_features` would write (bit for bit on CPU with the same thread count).
Rank 0 is the coordinator: it loads (or trains) the model first, creates / verifies / repairs the store, and marks
it complete once every rank is done; the other ranks only write their own rows and their own progress file
``progress/rank<r>.json``. An interrupted run is resumed by launching the same command again, with any number of
ranks (chunks finished by any earlier writer are kept).

Backend: NCCL when the ranks run on CUDA (rank r uses ``cuda:<LOCAL_RANK>``), gloo on CPU. Without torchrun
(no ``WORLD_SIZE`` in the environment) everything runs in the calling process with world size 1.
The store folder must be visible to every rank (one machine, or a shared file system across machines).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .data import ImageDataset, load_dataset
from .features import ExtractionConfig, FeatureStore, default_store_dir, extract_features
from .models import DiffusionModel, load_model

BACKENDS = ("gloo", "nccl")


class DistributedSetupError(RuntimeError):
    """The ranks of a distributed extraction disagree (different stores, models) or cannot be set up."""


@dataclass
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (world size 1)
    owns_group: bool = False  # True: we initialised the process group, so we destroy it

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend is None:
            return
        if self.backend == "nccl" and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.backend is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError as e:
        raise DistributedSetupError(f"environment variable {name}={v!r} is not an integer") from e


def rank_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of one rank: ``cuda:<local_rank>`` for "auto"/"cuda" when CUDA is there, else the CPU."""
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if local_rank >= n:
                raise DistributedSetupError(f"LOCAL_RANK {local_rank} but this machine has only {n} CUDA device(s); "
                                            f"launch at most {n} processes per node")
            return torch.device("cuda", local_rank)
        if device == "cuda":
            raise DistributedSetupError("device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        return torch.device("cpu")
    return torch.device(device)


def init_distributed(device: str = "auto", backend: str | None = None, timeout_min: float = 120.0) -> DistContext:
    """Join the job started by torchrun / accelerate (env vars RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Reuses a process group that is already initialised (e.g. by ``accelerate``); with no ``WORLD_SIZE`` (or 1) no
    group is created and the context is a single process. ``backend`` None: NCCL on CUDA, gloo otherwise.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)} (or None to choose by device)")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1))
        dev = rank_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = rank_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(0, 1, local_rank, dev, None, owns_group=False)
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed support")
    backend = backend or ("nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedSetupError(f"backend 'nccl' needs CUDA devices, but this rank runs on {dev}; use 'gloo'")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedSetupError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun or "
                                    "accelerate launch (they set them), or export them yourself")
    kwargs: dict[str, Any] = dict(backend=backend, init_method="env://", rank=rank, world_size=world,
                                  timeout=datetime.timedelta(minutes=timeout_min))
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local_rank, dev, backend, owns_group=True)


def rank_chunks(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks one rank fills: round-robin, so ranks get equal shares and the last chunk goes to any rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return [c for c in range(int(n_chunks)) if c % world_size == rank]


def extract_distributed(
    cfg: ExtractionConfig,
    model: DiffusionModel | None = None,
    dataset: ImageDataset | None = None,
    out_dir: str | os.PathLike | None = None,
    backend: str | None = None,
    progress: bool | None = None,
    timeout_min: float = 120.0,
) -> FeatureStore:
    """Extract ``cfg`` with every rank of the job into one store and return it (on every rank).

    Call it from each process of a ``torchrun`` / ``accelerate launch`` job, or from a plain process (world size 1).
    ``progress`` None: a progress bar on rank 0 only. A process group initialised here is destroyed at the end.
    """
    cfg = dataclasses.replace(cfg).validate()
    ctx = init_distributed(cfg.device, backend, timeout_min)
    try:
        show = ctx.is_coordinator if progress is None else bool(progress)
        cfg = dataclasses.replace(cfg, device=str(ctx.device))  # device is not part of the store identity

        def load() -> tuple[DiffusionModel, ImageDataset]:
            m = model or load_model(cfg.model, train_steps=cfg.train_steps, progress=show)
            if m.device != ctx.device:
                m.to(ctx.device)
            return m, dataset or load_dataset(cfg.dataset, classes=cfg.classes)

        # Rank 0 first: it may download or train the model and creates / verifies / repairs the store.
        if ctx.is_coordinator:
            m, ds = load()
            path = Path(out_dir) if out_dir is not None else default_store_dir(cfg, m, ds)
            extract_features(cfg, m, ds, out_dir=path, writer="rank0", chunks=[], progress=False)
        ctx.barrier()
        if not ctx.is_coordinator:
            m, ds = load()
            path = Path(out_dir) if out_dir is not None else default_store_dir(cfg, m, ds)
        seen = ctx.all_gather((str(path.resolve()), m.weights_hash))
        if len(set(seen)) > 1:
            raise DistributedSetupError("ranks disagree on the store folder / model weights: "
                                        + "; ".join(f"rank {r}: {p} ({h})" for r, (p, h) in enumerate(seen))
                                        + ". Use the same model and REVELIO_CACHE (or out_dir) on a shared file system")
        try:
            n_chunks = FeatureStore.open(path, allow_incomplete=True).manifest["n_chunks"]
        except FileNotFoundError as e:
            raise DistributedSetupError(f"rank {ctx.rank} does not see the store rank 0 created at {path}: the "
                                        "folder must be on a file system that every rank shares") from e
        mine = rank_chunks(n_chunks, ctx.rank, ctx.world_size)
        extract_features(cfg, m, ds, out_dir=path, writer=f"rank{ctx.rank}", chunks=mine, verify=False,
                         progress=show, coordinator=False)
        ctx.barrier()
        if ctx.is_coordinator:  # every rank is done: mark the store complete (only rank 0 writes the manifest)
            store = extract_features(cfg, m, ds, out_dir=path, writer="rank0", chunks=[], verify=False, progress=False)
            if store.manifest.get("status") != "complete":
                done = len(store.done_chunks())
                raise DistributedSetupError(f"store {path} has {done}/{n_chunks} chunks after every rank finished")
        ctx.barrier()
        return FeatureStore.open(path, expect=cfg, weights_hash=m.weights_hash)
    finally:
        ctx.close()


# ------------------------------------------------------------------------------------------ command line


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m revelio_nb.distributed",
        description="Extract diffusion features into one store with every rank of a torchrun / accelerate job.",
        epilog="example: torchrun --standalone --nproc_per_node 2 -m revelio_nb.distributed "
               "--model embedded:animals-unet --blocks mid_block up_blocks.1 --timesteps 25 200",
    )
    hints = typing.get_type_hints(ExtractionConfig)
    for f in dataclasses.fields(ExtractionConfig):
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if is_union else tp  # X | None -> X
        if typing.get_origin(base) is list:
            p.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=default, help=f"default {default}")
        else:
            p.add_argument(flag, type=base, default=default, help=f"default {default!r}")
    p.add_argument("--out-dir", default=None, help="store folder (default: the cache folder keyed by the config)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: nccl on CUDA, gloo on CPU")
    p.add_argument("--timeout-min", type=float, default=120.0, help="collective timeout (rank 0 may train a model)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _config_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(ExtractionConfig)}
    cfg = ExtractionConfig(**{k: v for k, v in vars(args).items() if k in names})
    t0 = time.perf_counter()
    store = extract_distributed(cfg, out_dir=args.out_dir, backend=args.backend,
                                progress=False if args.no_progress else None, timeout_min=args.timeout_min)
    if _env_int("RANK", 0) == 0:
        print(json.dumps({"store": str(store.path), "rows": len(store), "chunks": store.manifest["n_chunks"],
                          "world_size": _env_int("WORLD_SIZE", 1), "seconds": round(time.perf_counter() - t0, 2),
                          "status": store.manifest.get("status")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
