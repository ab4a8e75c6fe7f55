"""Where caches and results live. Nothing here is global state: every function takes or derives paths."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Any, Iterator


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


_TMP_MARK = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh sibling of ``path`` to write before renaming it onto ``path``.

    Unique per process, thread and call (pid, thread id and a random token: two processes on different machines
    writing to a shared folder cannot collide either), hidden (leading dot), and it keeps ``path``'s suffix, so
    writers that infer the format from the name (matplotlib, ``np.savez``) write the right one.
    """
    path = Path(path)
    token = f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}{_TMP_MARK}{token}{path.suffix}")


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary siblings of ``path`` (from :func:`temporary_path`) left behind by killed writers."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}{_TMP_MARK}*"))


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete the leftovers of killed writers of ``path``; only for files that one process owns while it runs
    (a training checkpoint), never for shared outputs another process may be writing right now."""
    n = 0
    for tmp in stale_temporaries(path):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Write a file atomically through any writer that takes a path: the one helper every atomic write uses.

    ::

        with atomic_path(folder / "table.csv") as tmp:
            df.to_csv(tmp)

    The body writes the temporary path it is given (:func:`temporary_path`); when it returns, the file is
    flushed to disk and renamed onto ``path`` (``os.replace``: readers, and a process killed at any moment, see the
    old or the new content, never part of it). When the body raises, the temporary file is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        with contextlib.suppress(OSError):  # keep the permissions of the file it replaces
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a text file so that readers see the old or the new content, never half of it."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for a read-modify-write (``fcntl.flock`` on a ``.<name>.lock`` sibling).

    Blocks until every other holder (another process, or another thread with its own lock) has released it; the
    lock dies with its process, so a killed holder never blocks the next one. Advisory: it only excludes writers
    that take the same lock.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
