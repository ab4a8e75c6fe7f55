"""Latent statistics are committed by one marker: a save killed at any moment, or a part truncated later, is never
taken for finished statistics; the hookpoint pipeline computes them again and gets the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from revelio_nb import hookpoint_saes as hp
from revelio_nb.latent_store import LatentStats, LatentStatsError, is_committed

RUN_SRC = """
from revelio_nb import hookpoint_saes as hp, sae
def make_run(model):
    cfg = sae.TrainConfig(sae=sae.SaeConfig(k=4, expansion_factor=2), steps=20, batch_size=64, warmup_steps=2,
                          device="cpu")
    return hp.HookpointRun(model=model, dataset="digits", store_blocks=["mid_block"], store_timesteps=[10],
                           pooling="map", max_images=40, sae=cfg, top_n=4)
"""
_ns: dict = {}
exec(RUN_SRC, _ns)
make_run = _ns["make_run"]

# The same pipeline call in a subprocess whose write of top.npz stalls halfway (half the bytes on disk), so that it
# is killed inside the statistics' save, after latents.csv was written.
KILLED_SCRIPT = RUN_SRC + """
import io, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
real_savez = np.savez
def stalling_savez(file, *args, **kwargs):
    if "top.npz" in str(getattr(file, "name", file)):
        buf = io.BytesIO()
        real_savez(buf, *args, **kwargs)
        data = buf.getvalue()
        f = file if hasattr(file, "write") else open(file, "wb")
        f.write(data[: len(data) // 2])
        f.flush()
        print("STALLED", flush=True)
        time.sleep(600)
    return real_savez(file, *args, **kwargs)
np.savez = stalling_savez
hp.train_hookpoints(make_run(sys.argv[1]), [("mid_block", 10)], progress=False)
print("FINISHED", flush=True)
"""


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _assert_same_stats(a: LatentStats, b: LatentStats) -> None:
    pd.testing.assert_frame_equal(a.table, b.table)
    for name in ("top_rows", "top_values", "top_images", "top_labels", "label_counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.maps is not None and b.maps is not None
    np.testing.assert_array_equal(np.asarray(a.maps), np.asarray(b.maps))
    assert a.meta == b.meta


@pytest.mark.slow
def test_sigkill_inside_the_stats_save_then_rerun_equals_uninterrupted(tiny_unet_path, tmp_path, threads):
    run = make_run(str(tiny_unet_path))
    row = hp.train_hookpoints(run, [("mid_block", 10)], progress=False)[0]  # stores, SAE and stats, uninterrupted
    lat_dir = Path(row["latents_dir"])
    uninterrupted = LatentStats.load(lat_dir, mmap_maps=False)
    shutil.rmtree(lat_dir)  # the killed run computes the statistics (only) again
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_unet_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()  # blocks until the stalled write (or the end of the script)
        assert line.strip() == "STALLED", f"the save did not stall: {line!r} {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (lat_dir / "latents.csv").is_file()  # the kill left parts behind
    assert not is_committed(lat_dir)
    with pytest.raises(LatentStatsError, match="not committed"):
        LatentStats.load(lat_dir)

    again = hp.train_hookpoints(run, [("mid_block", 10)], progress=False)[0]  # the same call: recomputed
    assert Path(again["latents_dir"]) == lat_dir and is_committed(lat_dir)
    assert again["mean_purity"] == pytest.approx(row["mean_purity"], nan_ok=True)
    _assert_same_stats(LatentStats.load(lat_dir), uninterrupted)


@pytest.mark.parametrize("part", ["latents.csv", "top.npz", "maps.npy", "firing.npz"])
def test_truncated_part_is_detected_and_recomputed(tiny_unet_path, part, threads):
    run = make_run(str(tiny_unet_path))
    row = hp.train_hookpoints(run, [("mid_block", 10)], progress=False)[0]
    lat_dir = Path(row["latents_dir"])
    before = LatentStats.load(lat_dir, mmap_maps=False)  # not mapped: the file is cut below
    with open(lat_dir / part, "r+b") as f:  # e.g. a copy cut short, a full disk
        f.truncate(os.path.getsize(lat_dir / part) // 2)
    with pytest.raises(LatentStatsError, match=rf"part {part} has \d+ bytes"):
        LatentStats.load(lat_dir)
    again = hp.train_hookpoints(run, [("mid_block", 10)], progress=False)[0]
    assert again["mean_purity"] == pytest.approx(row["mean_purity"], nan_ok=True)
    _assert_same_stats(LatentStats.load(lat_dir), before)


def test_damaged_bytes_and_missing_marker_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    stats = LatentStats(table=pd.DataFrame({"latent": np.arange(3), "freq_images": [0.1, 0.2, 0.0]}),
                        top_rows=rng.integers(0, 9, (3, 2)), top_values=rng.random((3, 2)).astype(np.float32),
                        top_images=rng.integers(0, 9, (3, 2)), maps=rng.random((3, 2, 2, 2)).astype(np.float16),
                        meta={"top_n": 2})
    folder = stats.save(tmp_path / "lat")
    assert is_committed(folder) and sorted(json.loads((folder / "meta.json").read_text())["parts"]) == \
        ["latents.csv", "maps.npy", "top.npz"]
    assert LatentStats.load(folder).meta == {"top_n": 2}
    data = bytearray((folder / "maps.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (folder / "maps.npy").write_bytes(bytes(data))
    with pytest.raises(LatentStatsError, match="maps.npy does not match its SHA-256"):
        LatentStats.load(folder)
    LatentStats.load(folder, verify=False)  # sizes only: the cheap check still passes
    (folder / "meta.json").unlink()
    with pytest.raises(LatentStatsError, match="not committed"):
        LatentStats.load(folder)
    with pytest.raises(FileNotFoundError, match="holds no latent statistics"):
        LatentStats.load(tmp_path / "nothing")
    (folder / "meta.json").write_text(json.dumps({"top_n": 2}))  # a folder written by the previous version
    with pytest.raises(LatentStatsError, match="older revelio-nb"):
        LatentStats.load(folder)
    stats.save(folder)  # saving again commits again; no temporary files left behind
    assert is_committed(folder) and not [p.name for p in folder.iterdir() if "tmp" in p.name]
