"""What a user meets in the terminal: parameters checked before anything runs, condensed progress, no false alarms,
atomic outputs, reruns that skip complete notebooks; plus impossible numbers and the repository layout."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from revelio_nb import run_markers, run_plan, run_progress, runner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.nbbuild import write_notebook  # noqa: E402


def _notebooks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_notebook(folder / "00_loop.ipynb", [
        ("params", "run_dir = 'x'\nvalue = 1   # a comment with = in it (papermill's parser used to warn)\n"
                   "steps = 30"),
        ("code", "import time\nimport revelio_nb  # noqa: F401\nfrom tqdm.auto import tqdm\n"
                 "for i in tqdm(range(steps), desc='train toy'):\n    time.sleep(0.05)\nprint('value is', value)")])
    write_notebook(folder / "01_other.ipynb", [("params", "run_dir = 'x'\nother = 2"),
                                               ("code", "print('other is', other)")])
    return folder


# ------------------------------------------------------------------------------------------ parameters


def test_smoke_profile_keys_are_declared_by_their_notebooks():
    nb_dir = REPO / "notebooks"
    run_plan.check_profile(nb_dir, "smoke")  # raises ParameterError naming any undeclared key
    # parsed with ast: a comment holding '=' (which papermill's line parser skips) still declares its parameter
    assert "sweep_max_images" in run_plan.declared_parameters(nb_dir / "04_transfer_probes.ipynb")


def test_bad_profile_key_is_an_error(tmp_path):
    nbs = _notebooks(tmp_path / "nbs")
    (nbs / "tiny.yaml").write_text("00_loop.ipynb: {stepz: 3}\n")
    with pytest.raises(run_plan.ParameterError, match=r"(?s)'stepz' for 00_loop.ipynb.*did you mean 'steps'"):
        run_plan.check_profile(nbs, "tiny")
    with pytest.raises(run_plan.ParameterError, match="stepz"):
        runner.run_notebooks(runner.RunConfig(run=str(tmp_path / "out"), profile="tiny", notebooks_dir=nbs))
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_is_an_error_before_anything_runs(tmp_path, capsys):
    """`-p modle=...` used to log "Passed unknown parameter" and run the defaults."""
    nbs = _notebooks(tmp_path / "nbs")
    rc = runner.main(["--notebooks", str(nbs), "--run", str(tmp_path / "out"), "-p", "valeu=3"])
    err = capsys.readouterr().err
    assert rc == 1 and "'valeu' (given with -p) is declared by no selected notebook; did you mean 'value'?" in err
    assert "other, run_dir, steps, value" in err  # the declared parameters are listed
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was created
    with pytest.raises(run_plan.ParameterError, match="'value'"):  # declared by 00 only, and 00 is not selected
        runner.run_notebooks(runner.RunConfig(run=str(tmp_path / "out"), notebooks_dir=nbs, only=["01"],
                                              extra_parameters={"value": 3}))


def test_shared_parameters_go_to_the_notebooks_declaring_them(tmp_path):
    nbs = _notebooks(tmp_path / "nbs")
    nb = run_plan.find_notebooks(nbs)
    plan = run_plan.plan_parameters(nb, {"_all": {"other": 5}, "00_loop.ipynb": {"steps": 3}}, {"value": 7},
                                    run_dir="/r")
    assert plan == {"00_loop.ipynb": {"run_dir": "/r", "steps": 3, "value": 7},
                    "01_other.ipynb": {"run_dir": "/r", "other": 5}}


# ------------------------------------------------------------------------------------------ terminal


def test_progress_printer_condenses_bars():
    out, now = io.StringIO(), [0.0]
    p = run_progress.ProgressPrinter(out, prefix="> ", interval=10.0, clock=lambda: now[0])
    for step in range(0, 101):
        now[0] = step * 0.5  # 50 s of updates, one every 0.5 s
        p.feed("stderr", f"\rtrain unet: {step:3d}%|#| {step}/100 [00:{step:02d}<00:10]")
    p.feed("stderr", "\n")
    p.feed("stdout", "saved model\n")
    p.feed("stderr", "\rsample:  50%|#| 1/2\r" + " " * 40 + "\r")  # a leave=False bar: cleared at the end
    p.feed("stderr", "\n\rinner:   0%|  | 0/3\x1b[A\n" + " " * 30 + "\x1b[A\r")  # a nested bar: cursor moves
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue() and all(line.startswith("> ") for line in lines)
    assert all(line[2:].strip() for line in lines)  # no blank lines
    bars = [line for line in lines if line.startswith("> train unet")]
    assert bars[0].startswith("> train unet:   0%") and bars[-1].startswith("> train unet: 100%")
    assert 5 <= len(bars) <= 8  # start, every 10 s of a 50 s bar, end: not 101 lines
    assert "> saved model" in lines and any(line.startswith("> sample:  50%") for line in lines)


@pytest.mark.slow
def test_real_run_shows_progress_without_noise_and_reruns_only_what_changed(tmp_path, capfd):
    nbs = _notebooks(tmp_path / "nbs")
    out, term = tmp_path / "out", io.StringIO()
    cfg = runner.RunConfig(run=str(out), notebooks_dir=nbs, extra_parameters={"value": 3}, progress_interval=0.5,
                           stream=term)
    table = runner.run_notebooks(cfg)
    text = term.getvalue()
    captured = capfd.readouterr()
    noise = captured.out + captured.err + text
    for false_alarm in ("without encryption", "Unable to parse line", "Passed unknown parameter", "\r"):
        assert false_alarm not in noise, false_alarm
    assert "[1/2] 00_loop.ipynb (started" in text and "[2/2] 01_other.ipynb" in text
    bars = [line for line in text.splitlines() if "train toy:" in line]
    assert 2 <= len(bars) <= 10 and any("100%" in b for b in bars), text  # text bars from the kernel, condensed
    assert "    value is 3" in text and "    other is 2" in text
    assert f"results in {out}" in text and table.status.tolist() == ["ok", "ok"]
    executed = nbformat.read(str(out / "notebooks" / "01_other.ipynb"), as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "value" not in injected.source  # -p value went to the notebook declaring it only
    loop = nbformat.read(str(out / "notebooks" / "00_loop.ipynb"), as_version=4)
    stderr = [o for c in loop.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert len(stderr) == 1 and "\r" not in stderr[0].text  # the saved copy keeps the bar's last state only
    assert not list((out / "notebooks").glob(".*partial*"))
    cells = pd.read_csv(out / "tables" / "cell_timings.csv")  # where the time went: the toy training loop cell
    slow = cells.sort_values("seconds").iloc[-1]
    assert slow.notebook == "00_loop.ipynb" and slow.seconds >= 1.5 and slow.code == "import time"
    assert set(cells.notebook) == {"00_loop.ipynb", "01_other.ipynb"}
    assert "slowest cells (tables/cell_timings.csv):" in text and "00_loop.ipynb cell" in text

    # rerun: nothing to do
    mtime = (out / "notebooks" / "00_loop.ipynb").stat().st_mtime_ns
    term2 = io.StringIO()
    again = runner.run_notebooks(runner.RunConfig(**{**cfg.__dict__, "stream": term2}))
    assert again.status.tolist() == ["up to date", "up to date"]
    assert (out / "notebooks" / "00_loop.ipynb").stat().st_mtime_ns == mtime
    assert "0 notebook(s) executed, 2 up to date" in term2.getvalue()
    assert list(again.seconds) == list(table.seconds)  # timings.csv keeps the times of the runs that made the outputs

    # a changed notebook reruns (and what comes after it); the one before stays up to date
    write_notebook(nbs / "01_other.ipynb", [("params", "run_dir = 'x'\nother = 2"), ("code", "print('changed')")])
    third = runner.run_notebooks(runner.RunConfig(**{**cfg.__dict__, "stream": io.StringIO()}))
    assert third.status.tolist() == ["up to date", "ok"]


def _fake_papermill(monkeypatch, behaviour):
    """Replace papermill's execution: ``behaviour(output_path)`` writes what a kernel would, then returns or raises."""
    import papermill

    def fake(input_path, output_path, parameters=None, **kw):
        behaviour(Path(output_path), parameters)

    monkeypatch.setattr(papermill, "execute_notebook", fake)


def _write_nb(path: Path, text: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(text))
    nbformat.write(nb, str(path))


def test_interrupted_run_keeps_the_complete_outputs_and_reruns(tmp_path, monkeypatch):
    """Executed notebooks used to be written in place: a kill left a half notebook where the complete one was."""
    nbs = _notebooks(tmp_path / "nbs")
    out = tmp_path / "out"
    cfg = runner.RunConfig(run=str(out), notebooks_dir=nbs, only=["01"], stream=io.StringIO())
    calls = []

    def complete(path, params):
        calls.append(path)
        _write_nb(path, "complete")

    _fake_papermill(monkeypatch, complete)
    runner.run_notebooks(cfg)
    assert len(calls) == 1 and calls[0].name != "01_other.ipynb"  # papermill wrote a temporary copy, renamed
    final = out / "notebooks" / "01_other.ipynb"
    assert "complete" in final.read_text()
    runner.run_notebooks(cfg)
    assert len(calls) == 1  # up to date: skipped

    def killed(path, params):
        _write_nb(path, "half")
        raise KeyboardInterrupt  # stands for a kill in the middle of a cell

    _fake_papermill(monkeypatch, killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_notebooks(runner.RunConfig(**{**cfg.__dict__, "force": True}))
    assert "complete" in final.read_text()  # the complete copy is intact ...
    assert not (out / run_markers.STATE_DIR / "01_other.ipynb.json").exists()  # ... but no longer marked complete
    _fake_papermill(monkeypatch, complete)
    table = runner.run_notebooks(cfg)  # the same command again: redone, not skipped
    assert len(calls) == 2 and table.status.tolist() == ["ok"]
    assert not list((out / "notebooks").glob(".*partial*"))  # the killed run's temporary copy is cleaned up


def test_run_outputs_are_written_atomically(tmp_path, monkeypatch):
    nbs = _notebooks(tmp_path / "nbs")
    written = []
    real = runner.atomic_write_text
    monkeypatch.setattr(runner, "atomic_write_text", lambda p, t: (written.append(Path(p).name), real(p, t)))
    _fake_papermill(monkeypatch, lambda path, params: _write_nb(path, "ok"))
    runner.run_notebooks(runner.RunConfig(run=str(tmp_path / "out"), notebooks_dir=nbs, stream=io.StringIO()))
    assert "timings.csv" in written and "RESULTS.md" in written
    marker = json.loads((tmp_path / "out" / run_markers.STATE_DIR / "00_loop.ipynb.json").read_text())
    assert marker["parameters"] == {"run_dir": str((tmp_path / "out").resolve())} and len(marker["key"]) == 20


def test_force_flag_reruns(tmp_path, monkeypatch):
    nbs = _notebooks(tmp_path / "nbs")
    calls = []
    _fake_papermill(monkeypatch, lambda path, params: (calls.append(path), _write_nb(path, "ok")))
    args = ["--notebooks", str(nbs), "--run", str(tmp_path / "out"), "--only", "01"]
    assert runner.main(args) == 0 and runner.main(args) == 0 and len(calls) == 1
    assert runner.main(args + ["--force"]) == 0 and len(calls) == 2


# ------------------------------------------------------------------------------------------ impossible numbers


def test_impossible_numbers_are_errors(tiny_unet_path, tmp_path):
    """`image_size or model.native_image_size` used to treat 0 as "the default"."""
    from revelio_nb import data, directions, features, capture, models, sampling

    with pytest.raises(ValueError, match="image_size"):
        features.ExtractionConfig(image_size=0).validate()
    with pytest.raises(ValueError, match="image_size"):
        directions.SampleConfig(image_size=0).validate()
    with pytest.raises(ValueError, match="image_size"):
        directions.CaptionMapConfig(image_size=-8).validate()
    with pytest.raises(ValueError, match="positive integer, got 0"):
        features.stratified_subset(np.arange(10), np.zeros(10, int), 0, seed=0)
    m = models.load_model(tiny_unet_path)
    with pytest.raises(ValueError, match="image size 0"):
        capture.list_blocks(m, image_size=0)
    with pytest.raises(ValueError, match="image size 0"):
        sampling.sample(m, 1, steps=1, image_size=0)
    with pytest.raises(ValueError, match="n .* positive integer, got 0"):
        sampling.sample(m, 0, steps=1)
    with pytest.raises(data.DatasetError, match="max_images must be None or a positive integer, got -1"):
        data.load_dataset("digits", max_images=-1)


# ------------------------------------------------------------------------------------------ repository layout


def test_data_folder_is_in_the_clone_and_the_cache_ignored():
    import subprocess

    assert (REPO / "data" / "README.md").is_file()
    assert "data/cache/" in (REPO / ".gitignore").read_text().split()
    if (REPO / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "data"], cwd=REPO, capture_output=True, text=True).stdout
        assert "data/README.md" in tracked.split()
        ignored = subprocess.run(["git", "check-ignore", "-q", "data/cache/models/x"], cwd=REPO)
        assert ignored.returncode == 0


def test_pyproject_license_is_an_spdx_string_without_deprecation_warnings():
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert not [str(w.message)[:120] for w in caught if "license" in str(w.message).lower()]
    assert getattr(dist.metadata, "license_expression", None) == "MIT"
