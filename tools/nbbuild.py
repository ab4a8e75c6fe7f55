"""Tiny helper to (re)write a notebook from a list of cells: `cells` = [("md"|"code"|"params", source), ...].

Used by maintainers to keep notebooks clean (no outputs, a `parameters` cell first). Run as a library:
    from tools.nbbuild import write_notebook
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def write_notebook(path: str | Path, cells: list[tuple[str, str]]) -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(new_markdown_cell(src))
        elif kind == "params":
            nb.cells.append(new_code_cell(src, metadata={"tags": ["parameters"]}))
        else:
            nb.cells.append(new_code_cell(src))
    for i, c in enumerate(nb.cells):
        c["id"] = f"c{i:02d}"
    nbformat.write(nb, str(path))


if __name__ == "__main__":
    sys.exit("import write_notebook from this module")
