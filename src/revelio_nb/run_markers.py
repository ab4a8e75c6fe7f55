"""Completion markers of a run's notebooks: what makes a rerun skip a notebook that is up to date.

A notebook that finished is recorded in ``results/<run>/.runner/<notebook>.json`` (:func:`marker_path`, written by
the runner after its executed copy is in place) with a key (:func:`notebook_keys`) hashing its parameters, its
source, the package source (:func:`package_fingerprint`) and the keys of the notebooks before it. :func:`completed`
says whether a notebook's outputs are complete for a key; :func:`remove_stale_partials` clears the half-written
copies that killed runs left behind. Used by :mod:`revelio_nb.runner`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .artifacts import key_of

STATE_DIR = ".runner"  # results/<run>/.runner/<notebook>.json: the completion markers


def package_fingerprint() -> str:
    """Hash of the package's Python sources and version: a code change makes every notebook out of date."""
    from . import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def notebook_keys(notebooks: list[Path], plan: dict[str, dict], package: str) -> dict[str, str]:
    """Completion key of each notebook: its parameters, its source, the package, and the keys before it."""
    keys, upstream = {}, []
    for nb in notebooks:
        key = key_of({"notebook": hashlib.sha256(nb.read_bytes()).hexdigest(), "parameters": plan[nb.name],
                      "package": package, "upstream": upstream}, length=20)
        keys[nb.name] = key
        upstream = upstream + [key]
    return keys


def marker_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def completed(out: Path, name: str, key: str) -> dict | None:
    """The marker of a notebook whose outputs are complete for this key (executed copy present), else None."""
    try:
        marker = json.loads(marker_path(out, name).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("key") != key or not (out / "notebooks" / name).is_file():
        return None
    return marker


def remove_stale_partials(folder: Path, name: str) -> None:
    for p in folder.glob(f".{Path(name).stem}.partial-*.ipynb"):
        pid = p.name.rsplit("-", 1)[-1].split(".")[0]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = int(pid) != os.getpid()
            except OSError:
                alive = False
        if not alive:
            p.unlink(missing_ok=True)
