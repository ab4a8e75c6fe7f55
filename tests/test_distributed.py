"""Distributed extraction (torch.distributed, gloo on CPU) and the device / precision paths that serve GPUs.

The two-rank test launches ``torchrun`` with two CPU processes and checks that the store they write together is
bit for bit the store of a single-process extraction (same chunks, same per-image noise, one thread each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from revelio_nb import distributed as D
from revelio_nb.data import load_dataset
from revelio_nb.features import (ExtractionConfig, FeatureStore, StoreMismatchError, default_store_dir,
                                 extract_features)
from revelio_nb.models import load_model

from conftest import save_tiny_unet16

BLOCKS = ["mid_block", "up_blocks.0"]
TIMESTEPS = [10, 500]


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit needs the workers' thread count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_unet16(tmp_path_factory.mktemp("tiny") / "unet")
    return folder, load_model(folder), load_dataset("digits")


def config(folder: Path, **kw) -> ExtractionConfig:
    base = dict(model=str(folder), dataset="digits", blocks=BLOCKS, timesteps=TIMESTEPS, pooling="map",
                max_images=100, batch_size=8, image_size=16)
    return ExtractionConfig(**{**base, **kw})


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.labels, b.labels)
    for key in a.keys():
        assert np.array_equal(a.array(*key), b.array(*key)), f"{key} differs"


@pytest.fixture
def no_dist_env(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)


# ------------------------------------------------------------------------------------------ two processes


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_single_process_bit_for_bit(tiny, tmp_path):
    folder, model, ds = tiny
    cfg = config(folder)
    single = extract_features(cfg, model, ds, out_dir=tmp_path / "single", progress=False)
    n_chunks = single.manifest["n_chunks"]
    # A single-process run was interrupted after 3 chunks: the distributed run must keep them and fill the rest.
    extract_features(cfg, model, ds, out_dir=tmp_path / "dist", chunks=[0, 1, 2], progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "REVELIO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "revelio_nb.distributed", "--model", str(folder), "--dataset", "digits",
           "--blocks", *BLOCKS, "--timesteps", *map(str, TIMESTEPS), "--pooling", "map", "--max-images", "100",
           "--batch-size", "8", "--image-size", "16", "--out-dir", str(tmp_path / "dist"), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["status"] == "complete" and summary["rows"] == 100

    dist_store = FeatureStore.open(tmp_path / "dist", expect=cfg, weights_hash=model.weights_hash)
    assert_same_store(dist_store, single)
    assert dist_store.config == single.config
    records = {f.stem: set(json.loads(f.read_text())["chunks"]) for f in (tmp_path / "dist" / "progress").glob("*.json")}
    assert set(records) == {"main", "rank0", "rank1"}
    assert records["main"] == {0, 1, 2}
    assert records["rank0"] and records["rank1"]  # both ranks did work
    assert not records["rank0"] & records["rank1"] and not (records["rank0"] | records["rank1"]) & {0, 1, 2}
    assert records["main"] | records["rank0"] | records["rank1"] == set(range(n_chunks))
    assert all(c % 2 == 1 for c in records["rank1"]) and all(c % 2 == 0 for c in records["rank0"])
    assert dist_store.verify() == []


def test_world_size_one_without_torchrun_is_plain_extraction(tiny, tmp_path, no_dist_env):
    folder, model, ds = tiny
    cfg = config(folder, timesteps=[10], max_images=40)
    store = D.extract_distributed(cfg, model, ds, out_dir=tmp_path / "d", progress=False)
    ref = extract_features(cfg, model, ds, out_dir=tmp_path / "s", progress=False)
    assert store.manifest["status"] == "complete"
    assert_same_store(store, ref)
    assert [f.name for f in (tmp_path / "d" / "progress").glob("*.json")] == ["rank0.json"]
    assert not torch.distributed.is_initialized()


def test_default_store_dir_is_shared_by_ranks(tiny, tmp_path, no_dist_env, monkeypatch):
    folder, model, ds = tiny
    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    cfg = config(folder, timesteps=[10], max_images=16)
    store = D.extract_distributed(cfg, model, ds, progress=False)
    assert store.path == default_store_dir(cfg, model, ds)


# ------------------------------------------------------------------------------------------ pieces


def test_rank_chunks_partition_every_chunk_once():
    for n, world in [(13, 2), (5, 8), (100, 3), (0, 4)]:
        parts = [D.rank_chunks(n, r, world) for r in range(world)]
        assert sorted(c for p in parts for c in p) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        D.rank_chunks(10, 2, 2)


def test_rank_device_and_backend_choice(monkeypatch, no_dist_env):
    assert D.rank_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert D.rank_device("auto", 1) == torch.device("cpu")
        with pytest.raises(D.DistributedSetupError, match="CUDA is not available"):
            D.rank_device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.rank_device("auto", 1) == torch.device("cuda", 1)  # each rank its own GPU
    assert D.rank_device("cuda", 0) == torch.device("cuda", 0)
    with pytest.raises(D.DistributedSetupError, match="LOCAL_RANK 2 but this machine has only 2"):
        D.rank_device("auto", 2)


def test_init_distributed_errors_and_single_process(monkeypatch, no_dist_env):
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    ctx.barrier()  # a no-op without a group
    assert ctx.all_gather("x") == ["x"]
    with pytest.raises(ValueError, match="backend 'mpi' is not one of"):
        D.init_distributed("cpu", backend="mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(D.DistributedSetupError, match="MASTER_ADDR"):
        D.init_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(D.DistributedSetupError, match="nccl' needs CUDA"):
        D.init_distributed("cpu", backend="nccl")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(D.DistributedSetupError, match="WORLD_SIZE='two'"):
        D.init_distributed("cpu")


def test_cli_parses_every_config_field():
    args = D._config_parser().parse_args(
        ["--model", "m", "--blocks", "mid_block", "up_blocks.1", "--timesteps", "25", "100", "--classes", "0", "3",
         "--max-images", "50", "--precision", "bf16", "--prompt", "a cat", "--out-dir", "/tmp/x"])
    assert args.blocks == ["mid_block", "up_blocks.1"] and args.timesteps == [25, 100] and args.classes == [0, 3]
    assert args.max_images == 50 and args.precision == "bf16" and args.prompt == "a cat"
    assert args.image_size is None and args.batch_size == 64 and args.out_dir == "/tmp/x"


# ------------------------------------------------------------------------------------------ precision (autocast)


def test_precision_autocast_changes_features_a_little_and_the_identity(tiny, tmp_path):
    folder, model, ds = tiny
    fp32 = extract_features(config(folder, timesteps=[10], max_images=24), model, ds, out_dir=tmp_path / "a",
                            progress=False)
    bf16 = extract_features(config(folder, timesteps=[10], max_images=24, precision="bf16"), model, ds,
                            out_dir=tmp_path / "b", progress=False)
    a, b = np.asarray(fp32.array("mid_block", 10)), np.asarray(bf16.array("mid_block", 10))
    assert not np.array_equal(a, b)  # the denoiser really ran under bf16 autocast
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert bf16.config["precision"] == "bf16" and b.dtype == np.float32
    assert default_store_dir(config(folder), model, ds) != default_store_dir(config(folder, precision="fp16"), model,
                                                                             ds)
    with pytest.raises(ValueError, match=r"precision 'fp8' is not one of \['fp32', 'fp16', 'bf16'\]"):
        config(folder, precision="fp8").validate()
    with pytest.raises(StoreMismatchError, match="precision: store has .bf16."):  # a store made at another precision is refused
        extract_features(config(folder, timesteps=[10], max_images=24), model, ds, out_dir=tmp_path / "b",
                         progress=False)
