"""The per-cell breakdown of a run (tables/cell_timings.csv) read from papermill's cell metadata."""

from __future__ import annotations

import json

from revelio_nb.cell_timings import notebook_cell_timings, run_cell_timings, slowest


def _executed(path, cells):
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": kind, "source": src, "metadata": ({"papermill": {"duration": d}} if d is not None else {}),
         **({"outputs": [], "execution_count": None} if kind == "code" else {})}
        for kind, src, d in cells]}
    path.write_text(json.dumps(nb))
    return path


def test_code_cells_with_durations_become_rows(tmp_path):
    nb = _executed(tmp_path / "01_x.ipynb", [
        ("markdown", "# title", 0.01),                                        # not code: left out
        ("code", "run_dir = 'x'", 0.02),
        ("code", ["# train the models\n", "\n", "models = nb.train(cfg)  # slow\n"], 12.5),  # first code line
        ("code", "store = extract(" + "a" * 120 + ")", 3.0),                 # long line: shortened
        ("code", "never_ran()", None),                                        # no duration (run stopped): left out
    ])
    t = notebook_cell_timings(nb)
    assert t["cell"].tolist() == [1, 2, 3]
    assert t["seconds"].tolist() == [0.02, 12.5, 3.0]
    assert t["code"].iloc[1] == "models = nb.train(cfg)  # slow"
    assert t["code"].iloc[2].endswith("...") and len(t["code"].iloc[2]) == 90
    assert set(t["notebook"]) == {"01_x.ipynb"}


def test_run_table_and_slowest_cells(tmp_path):
    _executed(tmp_path / "00_a.ipynb", [("code", "a()", 1.0), ("code", "b()", 6.0)])
    _executed(tmp_path / "01_b.ipynb", [("code", "c()", 3.0)])
    t = run_cell_timings(tmp_path, ["00_a.ipynb", "01_b.ipynb", "02_missing.ipynb"])
    assert len(t) == 3
    lines = slowest(t, n=2)
    assert len(lines) == 2 and "00_a.ipynb cell 1: b()" in lines[0] and "60.0 %" in lines[0]
    assert "01_b.ipynb cell 0: c()" in lines[1]
    assert slowest(run_cell_timings(tmp_path, ["02_missing.ipynb"])) == []
