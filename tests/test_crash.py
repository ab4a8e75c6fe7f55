"""Crash consistency of training checkpoints and run outputs (issue 12, section 2).

* embedded-model training killed (SIGKILL) at a random moment, or inside a checkpoint write, then resumed:
  the same weights, optimizer state and losses as an uninterrupted run; a legacy two-file checkpoint is resumed
  only when its two files agree, else discarded;
* the run's hookpoint index survives concurrent writers (processes) without losing rows;
* README results, tables and figures are replaced atomically (a failing writer leaves the old file; a reader
  holding the old file never sees half of the new one), through one temporary-name helper that is unique per
  process and per thread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from revelio_nb import paths

TRAIN_SCRIPT = '''
import copy, os, signal, sys, time
from pathlib import Path
import torch
import torch.nn as nn
from revelio_nb.training import DenoiserTrainConfig, train_denoiser


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.05, 100), 0)
    cfg = DenoiserTrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, checkpoint_every=5, seed=3)
    return model, copy.deepcopy(model), images, alphas, cfg


def train(work, forward=None):
    model, ema, images, alphas, cfg = build()
    forward = forward or (lambda m, x, t, cond: m(x))
    return train_denoiser(model, ema, forward, images, None, None, alphas, cfg, Path(work), desc="tiny")


def kill_at_rename(mode, n):
    """SIGKILL this process right before / after the n-th file rename (the commit of an atomic write)."""
    real, calls = os.replace, [0]

    def replace(src, dst, *a, **k):
        calls[0] += 1
        if mode == "before" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **k)
        if mode == "after" and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


if __name__ == "__main__":
    torch.set_num_threads(1)
    work, kill = sys.argv[1], sys.argv[2]
    if kill != "none":
        mode, n = kill.split(":")
        kill_at_rename(mode, int(n))

    def slow(m, x, t, cond):  # long enough to be killed at a random moment
        time.sleep(0.005)
        return m(x)

    train(work, slow)
'''


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    """The training script (run as a subprocess, or imported) and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("training")
    script = root / "train.py"
    script.write_text(TRAIN_SCRIPT)
    mod = runpy.run_path(str(script))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = mod["train"](root / "reference")
    finally:
        torch.set_num_threads(n)
    return dict(script=script, mod=mod, ref=load_file(str(root / "reference" / "checkpoint.safetensors")),
                ref_losses=state.losses)


def assert_same_training(work: Path, state, tiny_training) -> None:
    got = load_file(str(work / "checkpoint.safetensors"))
    ref = tiny_training["ref"]
    weights = [k for k in ref if k.split(".")[0] in ("model", "ema", "opt")]
    assert {k for k in got if k.split(".")[0] in ("model", "ema", "opt")} == set(weights)
    for key in weights:
        assert torch.equal(got[key], ref[key]), f"{key} differs from the uninterrupted run"
    assert state.step == 60 and state.losses == tiny_training["ref_losses"]
    assert paths.stale_temporaries(work / "checkpoint.safetensors") == []


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["after:3", "before:4", "random"])
def test_training_killed_inside_a_checkpoint_or_at_random_resumes_to_the_uninterrupted_result(
        tiny_training, tmp_path, kill, one_thread):
    """'after:3' / 'before:4': SIGKILL around the 3rd / 4th rename, i.e. inside the second or third checkpoint
    write (the old two-file layout: between its weights and its step counter)."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(tiny_training["script"]), str(work), "none" if kill == "random" else kill]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if kill == "random":
            deadline = time.time() + 120
            while not (work / "checkpoint.safetensors").is_file() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(random.uniform(0.0, 0.15))  # 60 steps of >= 5 ms: the run is far from its end
            assert proc.poll() is None, f"the training ended before it could be killed: {proc.stderr.read()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert (work / "checkpoint.safetensors").is_file()

    state = tiny_training["mod"]["train"](work)  # the same command again
    assert_same_training(work, state, tiny_training)


class StopAt(Exception):
    pass


def train_until(tiny_training, work: Path, calls: int):
    """Run the training and stop it (an exception in the forward pass) at forward call ``calls``."""
    seen = [0]

    def forward(m, x, t, cond):
        seen[0] += 1
        if seen[0] == calls:
            raise StopAt
        return m(x)

    with pytest.raises(StopAt):
        tiny_training["mod"]["train"](work, forward)


def write_legacy(work: Path, weights_from: Path, state_from: Path) -> None:
    """The two-file layout of earlier versions: weights (no metadata) + checkpoint.json (step, losses, seconds)."""
    from safetensors import safe_open

    tensors = load_file(str(weights_from / "checkpoint.safetensors"))
    with safe_open(str(state_from / "checkpoint.safetensors"), framework="pt") as f:
        step = int(f.metadata()["step"])
        losses = f.get_tensor("state.losses").tolist()
    work.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("state.")}, str(work / "checkpoint.safetensors"))
    (work / "checkpoint.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": 1.0}))


def test_legacy_two_file_checkpoint_resumed_when_consistent_discarded_when_not(tiny_training, tmp_path, one_thread):
    train_until(tiny_training, tmp_path / "at10", 13)  # last checkpoint: step 10
    train_until(tiny_training, tmp_path / "at15", 18)  # last checkpoint: step 15

    consistent = tmp_path / "consistent"
    write_legacy(consistent, tmp_path / "at10", tmp_path / "at10")
    calls = [0]

    def counting(m, x, t, cond):
        calls[0] += 1
        return m(x)

    state = tiny_training["mod"]["train"](consistent, counting)
    assert calls[0] == 50  # resumed at step 10
    assert_same_training(consistent, state, tiny_training)
    assert not (consistent / "checkpoint.json").exists()  # the new single-file checkpoint replaced the pair

    torn = tmp_path / "torn"  # a kill between the old layout's two writes: step-15 weights, step-10 counter
    write_legacy(torn, tmp_path / "at15", tmp_path / "at10")
    calls[0] = 0
    with pytest.warns(UserWarning, match=r"cannot be trusted: its weights are at optimizer step\(s\) \[15\] but "
                                         r"checkpoint.json says step 10 .*training starts over"):
        state = tiny_training["mod"]["train"](torn, counting)
    assert calls[0] == 60
    assert_same_training(torn, state, tiny_training)


# ------------------------------------------------------------------------------------------ hookpoint index


def _write_rows(run_dir: str, writer: int, n: int) -> None:
    from revelio_nb.hookpoint_saes import write_index

    for i in range(n):
        write_index(run_dir, [{"hookpoint": f"w{writer}-{i}", "model": "m", "block": "b", "t": i, "fvu": 0.5,
                               "_firing_frequency": [0.1]}])


def test_hookpoint_index_keeps_every_row_of_concurrent_writers(tmp_path):
    from revelio_nb.hookpoint_saes import write_index

    run = tmp_path / "run"
    write_index(run, [{"hookpoint": "w0-0", "model": "m", "block": "b", "t": -1, "fvu": 1.0}])  # replaced later
    ctx = multiprocessing.get_context("fork")
    writers, n = 4, 12
    procs = [ctx.Process(target=_write_rows, args=(str(run), w, n)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * writers
    table = pd.read_csv(run / "sae" / "hookpoints.csv")
    assert sorted(table.hookpoint) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(n))
    assert table.set_index("hookpoint").loc["w0-0", "t"] == 0  # same label: the row was replaced
    assert paths.stale_temporaries(run / "sae" / "hookpoints.csv") == []


# ------------------------------------------------------------------------------------------ atomic outputs


def test_temporary_names_are_unique_per_process_and_thread(tmp_path):
    target = tmp_path / "shared.txt"
    errors: list[BaseException] = []
    texts = [f"writer {i}\n" * 2000 for i in range(8)]

    def write(i: int) -> None:
        try:
            for _ in range(25):
                paths.atomic_write_text(target, texts[i])
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts
    assert paths.stale_temporaries(target) == []
    a, b = paths.temporary_path(target), paths.temporary_path(target)
    assert a != b and a.parent == target.parent and a.suffix == ".txt" and a.name.startswith(".shared.txt")


class Unprintable:
    def __str__(self):
        raise RuntimeError("cannot format this cell")


def test_failed_table_and_figure_writes_keep_the_previous_files(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist

    from revelio_nb.plots import save_table, savefig

    run = tmp_path / "run"
    table = save_table(pd.DataFrame({"a": [1, 2]}), run, "t")
    before = table.read_bytes()
    with pytest.raises(RuntimeError, match="cannot format"):
        save_table(pd.DataFrame({"a": [1, 2], "b": ["x", Unprintable()]}), run, "t")
    assert table.read_bytes() == before

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    png = savefig(fig, run, "f")
    before = png.read_bytes()
    ax.plot([1, 0])
    with open(png, "rb") as reader:  # a reader of the old figure (a browser, a report) is never cut off
        savefig(fig, run, "f")
        assert reader.read() == before
    after = png.read_bytes()
    assert after != before and after.startswith(b"\x89PNG")

    class Broken(Artist):
        def draw(self, renderer):
            raise RuntimeError("cannot draw this artist")

    ax.add_artist(Broken())
    with pytest.raises(RuntimeError, match="cannot draw"):
        savefig(fig, run, "f")
    plt.close(fig)
    assert png.read_bytes() == after
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["f.png"]
    assert sorted(p.name for p in (run / "tables").iterdir()) == ["t.csv"]


def test_readme_results_are_replaced_atomically(tmp_path, monkeypatch):
    from revelio_nb import report

    run = paths.results_dir(tmp_path / "run")
    pd.DataFrame({"notebook": ["00_x"], "seconds": [1.0], "profile": ["full"]}).to_csv(
        run / "tables" / "timings.csv", index=False)
    readme = tmp_path / "README.md"
    old = f"# title\n\n{report.START}\nold results\n{report.END}\n\ntail\n"
    readme.write_text(old)
    with open(readme) as reader:  # a reader that opened the README before the rewrite sees all of the old one
        assert report.main(["--run", str(run), "--readme", str(readme)]) == 0
        assert reader.read() == old
    new = readme.read_text()
    assert "Notebook wall times" in new and new.endswith("\n\ntail\n")

    monkeypatch.setattr(report, "run_parts", lambda run_dir: {"timings": "results \udcff that cannot be encoded"})
    assert report.main(["--run", str(run), "--readme", str(readme)]) == 1  # the write failed half-way
    assert readme.read_text() == new
    assert paths.stale_temporaries(readme) == []
