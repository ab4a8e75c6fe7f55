"""Crash safety of feature extraction, proven by injecting faults.

* SIGKILL an extraction midway, rerun the same command: the store equals an uninterrupted run bit for bit and
  only the unfinished chunks are computed again; the same for a k-SAE training run (final weights and optimizer
  state equal an uninterrupted run bit for bit);
* corrupt bytes of one chunk / truncate an array file / garble a progress file or the manifest: detected
  (checksums recorded per chunk), and only what was damaged is recomputed;
* a full disk or an unwritable folder: a clear ``StoreWriteError`` naming the path, finished chunks kept;
* out-of-memory in a forward pass: the micro-batch is halved and the pass retried (a fake CUDA OOM on CPU).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from revelio_nb.features import microbatch, store as S
from revelio_nb.data import load_dataset
from revelio_nb.features import ExtractionConfig, FeatureStore, StoreIncompleteError, StoreWriteError, extract_features
from revelio_nb.models import load_model

from conftest import save_tiny_unet16

BLOCKS = ["mid_block", "up_blocks.0"]
TIMESTEPS = [10, 500]


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit needs the workers' thread count


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random UNet, the digits dataset, a config and an uninterrupted reference store."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    folder = save_tiny_unet16(root / "unet")
    model, ds = load_model(folder), load_dataset("digits")
    cfg = ExtractionConfig(model=str(folder), dataset="digits", blocks=BLOCKS, timesteps=TIMESTEPS, pooling="map",
                           max_images=100, batch_size=8, image_size=16)
    ref = extract_features(cfg, model, ds, out_dir=root / "reference", progress=False)
    torch.set_num_threads(n)
    return dict(folder=folder, model=model, ds=ds, cfg=cfg, ref=ref)


class CountPasses:
    """Counts denoiser passes (one per chunk x timestep) and the batch sizes they saw."""

    def __init__(self, model, monkeypatch, fail_above: int | None = None, error: type[BaseException] | None = None):
        self.batches: list[int] = []
        inner = model.denoise

        def denoise(x_t, t, cond=None):
            self.batches.append(int(x_t.shape[0]))
            if fail_above is not None and x_t.shape[0] > fail_above:
                raise (error or torch.cuda.OutOfMemoryError)("CUDA out of memory. Tried to allocate 20.00 GiB")
            return inner(x_t, t, cond)

        monkeypatch.setattr(model, "denoise", denoise)

    def chunks(self) -> float:
        return len(self.batches) / len(TIMESTEPS)


def assert_equal_to(store: FeatureStore, ref: FeatureStore) -> None:
    assert store.manifest["status"] == "complete"
    for key in ref.keys():
        assert np.array_equal(store.array(*key), ref.array(*key)), f"{key} differs from the uninterrupted run"
    np.testing.assert_array_equal(store.indices, ref.indices)


def copy_of(ref: FeatureStore, dst: Path) -> Path:
    shutil.copytree(ref.path, dst)
    return dst


def rows_of(store: FeatureStore, chunk: int, key=("up_blocks.0", 500)) -> np.ndarray:
    return np.array(store.array(*key)[store.chunk_rows(chunk)])


# ------------------------------------------------------------------------------------------ SIGKILL


KILLED_SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(1)
from revelio_nb.data import load_dataset
from revelio_nb.features import ExtractionConfig, extract_features
from revelio_nb.models import load_model
cfg = ExtractionConfig(**json.loads(sys.argv[1]))
model = load_model(cfg.model)
inner = model.denoise
def slow(*a, **k):  # make the run long enough to be killed midway
    time.sleep(0.25)
    return inner(*a, **k)
model.denoise = slow
extract_features(cfg, model, load_dataset(cfg.dataset), out_dir=sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_uninterrupted_run(env, tmp_path, monkeypatch):
    out = tmp_path / "store"
    script = tmp_path / "extract.py"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(asdict(env["cfg"])), str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    progress = out / "progress" / "main.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(json.loads(progress.read_text())["chunks"]) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, f"the extraction ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = FeatureStore.open(out, allow_incomplete=True)
    n_chunks = killed.manifest["n_chunks"]
    done = killed.done_chunks()
    assert killed.manifest["status"] == "incomplete" and 3 <= len(done) < n_chunks
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        FeatureStore.open(out)

    passes = CountPasses(env["model"], monkeypatch)
    store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=out, progress=False)  # the same command
    assert passes.chunks() == n_chunks - len(done)  # finished chunks were not recomputed
    assert_equal_to(store, env["ref"])
    assert store.verify() == []


SAE_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
import numpy as np
from pathlib import Path
from revelio_nb.sae import TrainConfig, train_sae
cfg, out = TrainConfig(**json.loads(sys.argv[2])), Path(sys.argv[3])
state = out / "train_state.json"
print("start_step", json.loads(state.read_text())["step"] if state.is_file() else 0, flush=True)
train_sae(np.load(sys.argv[1], mmap_mode="r"), cfg, out, progress=False)
"""


def sae_features(path: Path, n: int = 4000, d: int = 32) -> Path:
    """Non-negative sparse combinations of random atoms, written as a memory-mapped .npy (like a store array)."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(96, d))
    idx = rng.integers(0, len(atoms), size=(n, 3))
    x = np.einsum("ns,nsd->nd", rng.exponential(1.0, size=(n, 3)), atoms[idx]) + 1.0
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    arr[:] = x
    arr.flush()
    return path


def wait_for_sae_step(state: Path, proc: subprocess.Popen, at_least: int, deadline: float) -> float:
    """Poll train_state.json until its step reaches ``at_least``; the time it did."""
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= at_least:
                return time.perf_counter()
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"training ended or stalled before step {at_least}: {proc.communicate()[1][-2000:]}")


@pytest.mark.slow
def test_sae_training_sigkill_midway_then_rerun_equals_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from revelio_nb.sae import SaeConfig, TrainConfig, checkpoint_metadata, train_sae

    every, steps = 100, 500  # killed near step 250: plenty of steps left even if the load changes
    cfg = TrainConfig(sae=SaeConfig(num_latents=64, k=4), batch_size=256, steps=steps, warmup_steps=10, lr=1e-3,
                      checkpoint_every=every, init_tokens=1024, auxk_alpha=1 / 32, dead_tokens_threshold=2048,
                      seed=3, device="cpu")
    data = sae_features(tmp_path / "feats.npy")
    script = tmp_path / "train.py"
    script.write_text(SAE_SCRIPT)
    out, state = tmp_path / "killed", tmp_path / "killed" / "train_state.json"
    cmd = [sys.executable, str(script), str(data), json.dumps(asdict(cfg)), str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        t1 = wait_for_sae_step(state, proc, every, deadline)
        t2 = wait_for_sae_step(state, proc, 2 * every, deadline)
        # kill halfway between checkpoints: steps past the last one are lost (and a kill inside a checkpoint's
        # own writes, a few ms here, is avoided: that window is a separate case)
        time.sleep((t2 - t1) / 2)
        assert proc.poll() is None, "the training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    from safetensors import safe_open
    with safe_open(str(out / "optimizer.safetensors"), framework="pt") as f:  # the checkpoint's commit point
        killed_at = int(f.metadata()["step"])
    assert killed_at % every == 0 and every <= killed_at < steps
    assert int(checkpoint_metadata(out)["step"]) in (killed_at, killed_at - every)  # the view may lag by one

    rerun = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"start_step {killed_at}" in rerun.stdout  # it resumed instead of starting over
    assert json.loads(state.read_text())["step"] == steps

    train_sae(np.load(data, mmap_mode="r"), cfg, tmp_path / "uninterrupted", progress=False)  # 1 thread too
    for name in ("sae.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "uninterrupted" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs from the uninterrupted run"
    assert json.loads((out / "cfg.json").read_text()) == json.loads((tmp_path / "uninterrupted" / "cfg.json")
                                                                    .read_text())


# ------------------------------------------------------------------------------------------ damaged files


def test_corrupted_chunk_is_detected_and_only_it_is_recomputed(env, tmp_path, monkeypatch):
    path = copy_of(env["ref"], tmp_path / "store")
    store = FeatureStore.open(path)
    arr = np.load(path / store.manifest["arrays"]["up_blocks.0@t500"]["file"], mmap_mode="r+")
    arr[store.chunk_rows(5).start + 2, 3, 4, 5] += 1.0  # one flipped value inside chunk 5
    arr.flush()
    del arr
    assert store.verify() == [5]

    passes = CountPasses(env["model"], monkeypatch)
    with pytest.warns(UserWarning, match=r"1 chunk\(s\) .* do not match their checksums \(chunks \[5\]\)"):
        repaired = extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    assert passes.chunks() == 1 and passes.batches == [8, 8]
    assert_equal_to(repaired, env["ref"])
    assert extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False) is not None
    assert passes.chunks() == 1  # a verified complete store costs no pass


def test_truncated_array_file_is_detected_and_rebuilt(env, tmp_path, monkeypatch):
    path = copy_of(env["ref"], tmp_path / "store")
    f = path / "mid_block@t10.npy"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    passes = CountPasses(env["model"], monkeypatch)
    with pytest.warns(UserWarning, match="missing or truncated; rebuilding"):
        store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    assert passes.batches[0] == 1  # the new store probes the block shapes with one image
    assert len(passes.batches[1:]) == store.manifest["n_chunks"] * len(TIMESTEPS)
    assert_equal_to(store, env["ref"])


def test_garbled_progress_file_costs_only_its_chunks(env, tmp_path, monkeypatch):
    path = tmp_path / "store"
    cfg, model, ds = env["cfg"], env["model"], env["ds"]
    extract_features(cfg, model, ds, out_dir=path, writer="a", chunks=[0, 1, 2, 3], progress=False)
    extract_features(cfg, model, ds, out_dir=path, writer="b", chunks=[4, 5], progress=False)
    (path / "progress" / "b.json").write_text('{"chunks": [4, 5], "sha": {"4": ')  # torn write
    passes = CountPasses(model, monkeypatch)
    with pytest.warns(UserWarning, match="b.json is unreadable"):
        store = extract_features(cfg, model, ds, out_dir=path, writer="b", progress=False)
    assert passes.chunks() == store.manifest["n_chunks"] - 4  # chunks 0-3 of writer a were kept
    assert_equal_to(store, env["ref"])


def test_garbled_manifest_is_rebuilt(env, tmp_path, monkeypatch):
    path = copy_of(env["ref"], tmp_path / "store")
    (path / "manifest.json").write_text('{"format": "revelio-feature-sto')
    with pytest.warns(UserWarning, match=r"manifest of feature store .* is unreadable \(.*\); rebuilding"):
        store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    assert_equal_to(store, env["ref"])


def test_complete_status_without_chunk_records_is_not_trusted(env, tmp_path, monkeypatch):
    """A crash between 'drop the bad chunk records' and 'mark incomplete' must not leave a 'complete' store."""
    path = copy_of(env["ref"], tmp_path / "store")
    rec = json.loads((path / "progress" / "main.json").read_text())
    rec["chunks"].remove(7)
    (path / "progress" / "main.json").write_text(json.dumps(rec))
    passes = CountPasses(env["model"], monkeypatch)
    store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, verify=False, progress=False)
    assert passes.chunks() == 1 and 7 in store.done_chunks()
    assert_equal_to(store, env["ref"])


# ------------------------------------------------------------------------------------------ disk full / unwritable


def test_full_disk_at_creation_is_a_clear_error_before_writing(env, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(S.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(StoreWriteError, match=r"cannot create the feature store at .*store: it needs .* MiB and only "
                                              r"0\.0 MiB are free") as e:
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / "store", progress=False)
    assert e.value.errno == errno.ENOSPC
    assert not list((tmp_path / "store").glob("*.npy")) and not (tmp_path / "store" / "manifest.json").exists()


def test_full_disk_midway_keeps_finished_chunks_then_resumes(env, tmp_path, monkeypatch):
    path = tmp_path / "store"
    real = S.atomic_write_json
    calls = {"n": 0}

    def full_disk_after_three_records(file, obj):
        if Path(file).parent.name == "progress":
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, obj)

    monkeypatch.setattr(S, "atomic_write_json", full_disk_after_three_records)
    with pytest.raises(StoreWriteError, match=r"cannot write a progress record at .*main\.json: the disk is full"):
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    monkeypatch.setattr(S, "atomic_write_json", real)

    partial = FeatureStore.open(path, allow_incomplete=True)
    assert partial.done_chunks() == {0, 1, 2} and partial.verify() == []
    for c in range(3):  # earlier results intact
        np.testing.assert_array_equal(rows_of(partial, c), rows_of(env["ref"], c))
    passes = CountPasses(env["model"], monkeypatch)
    store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    assert passes.chunks() == store.manifest["n_chunks"] - 3
    assert_equal_to(store, env["ref"])


def test_output_folder_that_is_a_file_is_a_clear_error(env, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(StoreWriteError, match=r"results/store: a part of the path is a file, not a folder"):
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=blocker / "store", progress=False)
    with pytest.raises(StoreWriteError, match=r"a file is in the place of the folder"):
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=blocker, progress=False)
    assert blocker.read_text() == "not a folder"


def test_read_only_folder_error_keeps_finished_chunks(env, tmp_path, monkeypatch):
    """Tests run as root (chmod does not stop root), so a read-only mount is simulated at the OS-call level."""
    path = tmp_path / "store"
    extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, chunks=[0, 1], progress=False)
    before = {f.name: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    real_load, real_json = np.load, S.atomic_write_json

    def load(file, mmap_mode=None, **kw):
        if mmap_mode == "r+":
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_load(file, mmap_mode=mmap_mode, **kw)

    def no_write(file, obj):
        raise OSError(errno.EROFS, "Read-only file system", str(file))

    monkeypatch.setattr(S.np, "load", load)
    monkeypatch.setattr(S, "atomic_write_json", no_write)
    with pytest.raises(StoreWriteError, match=r"cannot write the feature arrays at .*store: the file system is "
                                              r"read-only .*rerun to resume"):
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=path, progress=False)
    after = {f.name: f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    assert after == before
    # a complete store on a read-only disk (e.g. a shared cache) still opens and verifies without writing
    done = extract_features(env["cfg"], env["model"], env["ds"], out_dir=env["ref"].path, progress=False)
    assert done.manifest["status"] == "complete"


def test_only_the_coordinator_writes_the_manifest(env, tmp_path, monkeypatch):
    path = tmp_path / "store"
    cfg, model, ds = env["cfg"], env["model"], env["ds"]
    with pytest.raises(StoreIncompleteError, match="coordinator .* creates it first"):
        extract_features(cfg, model, ds, out_dir=path, writer="rank1", chunks=[1], coordinator=False, progress=False)
    extract_features(cfg, model, ds, out_dir=path, writer="rank0", chunks=[], progress=False)  # prepare
    manifest = (path / "manifest.json").read_bytes()
    n = json.loads(manifest)["n_chunks"]
    for r in (0, 1):
        extract_features(cfg, model, ds, out_dir=path, writer=f"rank{r}", chunks=range(r, n, 2), verify=False,
                         coordinator=False, progress=False)
    assert (path / "manifest.json").read_bytes() == manifest  # still 'incomplete': workers never write it
    store = extract_features(cfg, model, ds, out_dir=path, writer="rank0", chunks=[], verify=False, progress=False)
    assert_equal_to(store, env["ref"])


# ------------------------------------------------------------------------------------------ out of memory


def test_oom_halves_the_micro_batch_and_retries(env, tmp_path, monkeypatch):
    extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / "s", chunks=[], progress=False)
    passes = CountPasses(env["model"], monkeypatch, fail_above=3)
    with pytest.warns(UserWarning) as caught:
        store = extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / "s", progress=False)
    assert [str(w.message) for w in caught] == [
        f"out of memory in the denoiser pass at t=10: retrying with a forward micro-batch of {n}" for n in (4, 2)]
    assert passes.batches[:4] == [8, 4, 2, 2]  # 8 fails, 4 fails, then halves of 2; never retried larger
    assert max(passes.batches[2:]) == 2
    assert store.manifest["status"] == "complete" and store.manifest["chunk_size"] == 8  # rows/chunks unchanged
    for key in env["ref"].keys():  # same features up to float reassociation in the kernels
        np.testing.assert_allclose(store.array(*key), env["ref"].array(*key), rtol=1e-4, atol=1e-5)


def test_oom_at_one_image_and_other_errors_are_raised(env, tmp_path, monkeypatch):
    for name in "ab":  # create the stores first (their one-image shape probe is not micro-batched)
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / name, chunks=[], progress=False)
    CountPasses(env["model"], monkeypatch, fail_above=0)
    with pytest.raises(RuntimeError, match="out of memory in the denoiser pass at t=10 even with a micro-batch of 1"):
        with pytest.warns(UserWarning):
            extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / "a", progress=False)
    monkeypatch.undo()
    passes = CountPasses(env["model"], monkeypatch, fail_above=0, error=ValueError)
    with pytest.raises(ValueError, match="CUDA out of memory"):  # not a torch OOM: no retry
        extract_features(env["cfg"], env["model"], env["ds"], out_dir=tmp_path / "b", progress=False)
    assert passes.batches == [8]
    assert microbatch.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9e12 bytes"))
    assert not microbatch.is_oom(RuntimeError("shape mismatch"))
