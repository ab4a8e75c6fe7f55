"""Where caches and results live. Nothing here is global state: every function takes or derives paths."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def project_root() -> Path | None:
    """The checkout this package is installed from (editable / src layout), or None when installed elsewhere."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def cache_dir(kind: str = "") -> Path:
    """Cache folder for expensive, reproducible artefacts (models, feature stores, SAEs).

    ``REVELIO_CACHE`` wins; otherwise ``<checkout>/data/cache``; otherwise ``~/.cache/revelio-nb``.
    """
    env = os.environ.get("REVELIO_CACHE")
    if env:
        base = Path(env)
    elif (root := project_root()) is not None:
        base = root / "data" / "cache"
    else:
        base = Path.home() / ".cache" / "revelio-nb"
    path = base / kind if kind else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(run: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``results/<run>/`` with its ``figures/`` and ``tables/`` subfolders created.

    ``run`` may also be an absolute path (papermill passes one), which is used as is.
    """
    run_path = Path(run)
    if not run_path.is_absolute():
        base = Path(root) if root is not None else (project_root() or Path.cwd()) / "results"
        run_path = base / run_path
    for sub in ("figures", "tables"):
        (run_path / sub).mkdir(parents=True, exist_ok=True)
    return run_path


def config_hash(config: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able config (dataclasses should pass ``dataclasses.asdict``)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
