"""Where a run's time went, cell by cell: the seconds papermill recorded for every code cell of the executed
notebooks (``results/<run>/notebooks/*.ipynb``), as ``tables/cell_timings.csv`` and a short "slowest cells" list.

Notebook cells are short calls into the package (one phase each: train the embedded models, extract a store, fit
the probes ...), so the cell table is the per-phase breakdown of a ``make reproduce`` without any timing code in
the notebooks. A cell that did not finish (the run failed or was stopped there) has no duration and is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["notebook", "cell", "seconds", "code"]


def _first_line(source: str | list[str], width: int = 90) -> str:
    text = "".join(source) if isinstance(source, list) else source
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def notebook_cell_timings(executed: str | Path) -> pd.DataFrame:
    """One row per finished code cell of an executed notebook: its index among the notebook's cells, seconds,
    and its first line of code. Empty when the notebook holds no papermill timings (never executed)."""
    executed = Path(executed)
    cells = json.loads(executed.read_text(encoding="utf-8")).get("cells", [])
    rows = []
    for i, cell in enumerate(cells):
        duration = (cell.get("metadata", {}).get("papermill") or {}).get("duration")
        if cell.get("cell_type") != "code" or duration is None:
            continue
        rows.append({"notebook": executed.name, "cell": i, "seconds": round(float(duration), 2),
                     "code": _first_line(cell.get("source", ""))})
    return pd.DataFrame(rows, columns=COLUMNS)


def run_cell_timings(notebooks_dir: str | Path, names: list[str]) -> pd.DataFrame:
    """The cell timings of the executed copies of ``names`` in ``notebooks_dir`` (missing copies skipped)."""
    frames = [notebook_cell_timings(Path(notebooks_dir) / n) for n in names if (Path(notebooks_dir) / n).is_file()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def slowest(table: pd.DataFrame, n: int = 8) -> list[str]:
    """Lines naming the ``n`` slowest cells with their share of the total cell time."""
    if table.empty:
        return []
    total = float(table["seconds"].sum()) or 1.0
    top = table.sort_values("seconds", ascending=False).head(n)
    return [f"{r.seconds:8.1f} s {100 * r.seconds / total:5.1f} %  {r.notebook} cell {r.cell}: {r.code}"
            for r in top.itertuples()]
