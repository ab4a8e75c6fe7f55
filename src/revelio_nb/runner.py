"""Run the numbered notebooks headlessly with papermill into ``results/<run>/``.

    python -m revelio_nb.runner --run default            # every notebook, full parameters
    python -m revelio_nb.runner --run smoke --profile smoke
    python -m revelio_nb.runner --only 00,01             # a subset, by number prefix
    python -m revelio_nb.runner -p model=/path/to/model  # a parameter for the notebooks that declare it
    python -m revelio_nb.runner --force                  # rerun notebooks that are up to date

Parameters. Each notebook gets ``run_dir`` (absolute) plus the profile's overrides from ``notebooks/<profile>.yaml``
(a mapping from notebook file name, or ``_all``, to parameters) plus ``-p KEY=VALUE``. Before anything runs, every
key is checked against the notebooks' ``parameters`` cells: a ``-p`` or ``_all`` key goes to the selected notebooks
that declare it, and one that none of them declares is an error listing the declared parameters (a typo such as
``-p modle=...`` never silently runs the defaults); a key set for one notebook must be declared by that notebook.

Terminal. Each notebook's header, then its cells' printed lines and progress bars as they come, condensed: a bar is
shown when it starts, at most every ``progress_interval`` seconds while it runs, and when it ends (the kernel draws
text bars: the runner sets ``REVELIO_PROGRESS=text``, see :func:`use_text_progress`). A summary lists each
notebook's time and status and the results folder. The kernel talks to the runner over IPC sockets in a private
temporary folder (no TCP, so no "running over TCP without encryption" warning).

Outputs. Executed notebooks land in ``results/<run>/notebooks/`` (written under a temporary name, renamed when the
notebook ends, ok or failed), each notebook's wall time in ``results/<run>/tables/timings.csv`` and the tables' short
summary in ``results/<run>/RESULTS.md`` (:mod:`revelio_nb.report`), all written atomically. The run stops at the
first failing notebook (later ones build on it), keeping everything already produced.

Reruns. A notebook that finished is recorded in ``results/<run>/.runner/<notebook>.json`` (written atomically after
its executed copy is in place) with a key hashing its parameters, its source, the package source and the keys of
the notebooks before it. A rerun (e.g. after a killed ``make reproduce``) skips notebooks whose key matches and whose
executed copy exists, and reruns the rest; ``--force`` reruns everything. The key does not see the *content* of a
dataset folder given by path: after changing the images in a folder, rerun with ``--force``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, TextIO

import pandas as pd
import yaml

from .artifacts import key_of
from .paths import atomic_write_json, atomic_write_text, project_root, results_dir

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves of nested tqdm bars, colours
STATE_DIR = ".runner"  # results/<run>/.runner/<notebook>.json: the completion markers


class ParameterError(ValueError):
    """A parameter is declared by none of the notebooks it is meant for (the message lists the declared ones)."""


@dataclass
class RunConfig:
    run: str = "default"
    profile: str = "full"  # "full" (no overrides) or the stem of notebooks/<profile>.yaml
    only: list[str] = field(default_factory=list)  # number prefixes, e.g. ["00", "01"]
    notebooks_dir: Path | None = None
    results_root: Path | None = None
    kernel_name: str = "python3"
    extra_parameters: dict = field(default_factory=dict)
    force: bool = False  # rerun notebooks whose outputs are complete and up to date
    progress_interval: float = 30.0  # seconds between two terminal lines of one running progress bar
    stream: TextIO | None = None  # where the terminal lines go (None: sys.stdout)


# ------------------------------------------------------------------------------------------ notebooks, parameters


def find_notebooks(folder: Path, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks of a folder in order; ``only`` filters by number prefix (errors list choices)."""
    found = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if only:
        numbers = {NOTEBOOK_PATTERN.match(p.name).group(1): p for p in found}
        bad = [o for o in only if o not in numbers]
        if bad:
            raise ValueError(f"no notebook numbered {bad} in {folder}; available: {sorted(numbers)}")
        found = [numbers[o] for o in sorted(set(only))]
    return found


def load_profile(folder: Path, profile: str) -> dict[str, dict]:
    """The profile table ``{notebook file name | "_all": {parameter: value}}`` (``{}`` for ``full``)."""
    if profile == "full":
        return {}
    path = folder / f"{profile}.yaml"
    if not path.is_file():
        choices = ["full"] + sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}: no {path}; choices: {choices}")
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, dict) or any(not isinstance(v, (dict, type(None))) for v in table.values()):
        raise ValueError(f"{path} must map notebook file names (or _all) to parameter mappings")
    return {k: dict(v or {}) for k, v in table.items()}


def profile_parameters(folder: Path, profile: str, notebook: str) -> dict:
    table = load_profile(folder, profile)
    return {**table.get("_all", {}), **table.get(notebook, {})}


def declared_parameters(notebook: Path) -> dict[str, str]:
    """``{name: default source}`` of the notebook's ``parameters`` cell (top-level assignments, parsed with ast)."""
    nb = json.loads(Path(notebook).read_text())
    cell = next((c for c in nb.get("cells", []) if c.get("cell_type") == "code"
                 and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ParameterError(f"{Path(notebook).name} has no code cell tagged 'parameters'")
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = ast.get_source_segment(source, node.value) if node.value is not None else ""
    return out


def plan_parameters(notebooks: list[Path], table: dict[str, dict], extra: dict, profile: str = "profile",
                    run_dir: str | None = None) -> dict[str, dict]:
    """The parameters each notebook gets, checked before anything runs.

    ``_all`` and ``extra`` (``-p``) keys go to the notebooks declaring them; a key no selected notebook declares is
    a :class:`ParameterError`, as is a notebook's own profile key that the notebook does not declare.
    """
    declared = {nb.name: declared_parameters(nb) for nb in notebooks}
    everything = sorted(set().union(*declared.values())) if declared else []
    errors = []
    for nb in notebooks:
        for key in table.get(nb.name, {}):
            if key not in declared[nb.name]:
                close = difflib.get_close_matches(key, sorted(declared[nb.name]), n=1)
                errors.append(f"{profile}.yaml sets {key!r} for {nb.name}, which does not declare it"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; it declares: {', '.join(sorted(declared[nb.name]))}")
    for origin, params in ((f"from {profile}.yaml _all", table.get("_all", {})), ("given with -p", extra)):
        for key in params:
            if not any(key in d for d in declared.values()):
                close = difflib.get_close_matches(key, everything, n=1)
                errors.append(f"{key!r} ({origin}) is declared by no selected notebook"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    if errors:
        names = ", ".join(nb.name for nb in notebooks)
        raise ParameterError("\n  ".join(["unknown parameters (nothing was run):", *errors])
                             + f"\nparameters declared by the selected notebooks ({names}): {', '.join(everything)}")
    plan = {}
    for nb in notebooks:
        d = declared[nb.name]
        shared = {**table.get("_all", {}), **table.get(nb.name, {}), **extra}
        base = {"run_dir": run_dir} if run_dir is not None and "run_dir" in d else {}
        plan[nb.name] = {**base, **{k: v for k, v in shared.items() if k in d}}
    return plan


def check_profile(folder: Path, profile: str) -> None:
    """Every key of ``<folder>/<profile>.yaml`` is declared by the notebook it is set for (or, for ``_all``, by some
    notebook), and every notebook it names exists; raises :class:`ParameterError` otherwise."""
    table = load_profile(folder, profile)
    notebooks = find_notebooks(folder)
    missing = sorted(set(table) - {"_all"} - {nb.name for nb in notebooks})
    if missing:
        raise ParameterError(f"{profile}.yaml names notebooks that do not exist: {missing}; "
                             f"notebooks: {[nb.name for nb in notebooks]}")
    plan_parameters(notebooks, table, {}, profile)


# ------------------------------------------------------------------------------------------ terminal progress


class ProgressPrinter:
    """Condenses a kernel's stdout/stderr into readable terminal lines (see the module docstring).

    ``feed(stream_name, text)`` takes text as it arrives. Lines ended by ``\\n`` are printed (prefixed); the
    ``\\r``-separated updates of a progress bar are printed when a new bar starts and then at most every
    ``interval`` seconds; blank clears (a closing ``leave=False`` bar) and terminal escape sequences (nested bars'
    cursor moves) are dropped. Nothing printed holds ``\\r``.
    """

    def __init__(self, out: TextIO, prefix: str = "    ", interval: float = 30.0, width: int = 150,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.prefix, self.interval, self.width, self.clock = out, prefix, interval, width, clock
        self.pending: dict[str, str] = {}
        self.last_bar_print = -float("inf")
        self.last_bar_name: str | None = None
        self.last_line: str | None = None
        self.lines = 0

    def _print(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip() or line == self.last_line:
            return
        self.last_line = line
        if len(line) > self.width:
            line = line[: self.width - 3] + "..."
        self.out.write(f"{self.prefix}{line}\n")
        self.out.flush()
        self.lines += 1

    @staticmethod
    def _bar_name(line: str) -> str:
        """What stays the same across a bar's updates: its text up to the first digit (tqdm's ``desc``)."""
        return re.match(r"\D*", line).group(0).strip()

    def _bar_update(self, line: str) -> None:
        if not line.strip():
            return
        name, now = self._bar_name(line), self.clock()
        if name != self.last_bar_name or now - self.last_bar_print >= self.interval:
            self._print(line)
            self.last_bar_name, self.last_bar_print = name, now

    def feed(self, stream: str, text: str) -> None:
        text = ANSI_ESCAPE.sub("", text)
        pending = self.pending.get(stream, "")
        for piece in re.split(r"(\r\n|\r|\n)", text):
            if piece in ("\n", "\r\n"):
                self._print(pending)  # a finished line (a closed leave=True bar ends this way too)
                self.last_bar_name = None if self._bar_name(pending) == self.last_bar_name else self.last_bar_name
                pending = ""
            elif piece == "\r":
                self._bar_update(pending)
                pending = ""
            else:
                pending += piece
        self.pending[stream] = pending

    def close(self) -> None:
        for stream, pending in self.pending.items():
            self._print(pending)
        self.pending.clear()


class _StreamFile:
    """The file-like object papermill writes one cell stream (stdout or stderr) to."""

    def __init__(self, printer: ProgressPrinter, name: str):
        self.printer, self.name = printer, name

    def write(self, text: str) -> int:
        self.printer.feed(self.name, text)
        return len(text)

    def flush(self) -> None:
        pass


def use_text_progress() -> None:
    """Make ``tqdm.auto`` draw text bars (to stderr) instead of notebook widgets, whose updates never reach a headless
    runner. Called by ``revelio_nb/__init__.py`` when ``REVELIO_PROGRESS=text`` (the runner sets it for its kernels)."""
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange


class _DropPapermillNoise(logging.Filter):
    """The runner checks parameters itself (:func:`plan_parameters`); papermill's own line parser warns about
    parameter comments holding '=' and calls their parameters unknown, which would be false alarms."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Unable to parse line") or msg.startswith("Passed unknown parameter"))


@contextlib.contextmanager
def _quiet_headless_kernel(progress_mininterval: float):
    """Environment for the kernels started inside: text progress bars, throttled at the source; papermill's
    parameter-parsing noise filtered; restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("REVELIO_PROGRESS", "TQDM_MININTERVAL")}
    os.environ["REVELIO_PROGRESS"] = "text"
    os.environ["TQDM_MININTERVAL"] = str(progress_mininterval)
    noise = _DropPapermillNoise()
    loggers = [logging.getLogger("papermill"), logging.getLogger("papermill.translators")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------ completion markers


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


def _marker(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def completed(out: Path, name: str, key: str) -> dict | None:
    """The marker of a notebook whose outputs are complete for this key (executed copy present), else None."""
    try:
        marker = json.loads(_marker(out, name).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("key") != key or not (out / "notebooks" / name).is_file():
        return None
    return marker


def _remove_stale_partials(folder: Path, name: str) -> None:
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


# ------------------------------------------------------------------------------------------ the run


def run_notebooks(cfg: RunConfig) -> pd.DataFrame:
    """Execute the notebooks; returns (and saves) the timings table. Raises after saving if one fails."""
    import papermill as pm
    from traitlets.config import Config

    say = cfg.stream or sys.stdout
    root = project_root() or Path.cwd()
    nb_dir = Path(cfg.notebooks_dir or root / "notebooks").resolve()
    notebooks = find_notebooks(nb_dir, cfg.only)
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {nb_dir}")
    table = load_profile(nb_dir, cfg.profile)
    plan_parameters(notebooks, table, cfg.extra_parameters, cfg.profile)  # errors before any folder is made
    out = results_dir(cfg.run, cfg.results_root).resolve()
    for sub in ("notebooks", STATE_DIR):
        (out / sub).mkdir(exist_ok=True)
    everything = find_notebooks(nb_dir)  # keys chain over all notebooks, so a subset run matches a full one
    plan = plan_parameters(everything, table, cfg.extra_parameters, cfg.profile, run_dir=str(out))
    keys = notebook_keys(everything, plan, package_fingerprint())
    rows, failure, started = [], None, time.time()
    say.write(f"running {len(notebooks)} notebook(s) into {out} (profile {cfg.profile})\n")
    say.flush()
    kernel_dir = tempfile.mkdtemp(prefix="revelio-kernel-")
    kernel_config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(kernel_dir, "k")}})
    with _quiet_headless_kernel(progress_mininterval=min(5.0, max(0.5, cfg.progress_interval / 3))):
        for i, nb in enumerate(notebooks, 1):
            header = f"[{i}/{len(notebooks)}] {nb.name}"
            done = None if cfg.force else completed(out, nb.name, keys[nb.name])
            if done is not None:
                say.write(f"{header}: up to date (finished {done.get('finished', '?')} in {done['seconds']:.0f} s; "
                          "--force reruns it), skipped\n")
                say.flush()
                rows.append({"notebook": nb.name, "seconds": done["seconds"], "status": "up to date",
                             "profile": cfg.profile})
                continue
            say.write(f"{header} (started {datetime.now():%H:%M:%S})\n")
            say.flush()
            printer = ProgressPrinter(say, interval=cfg.progress_interval)
            _marker(out, nb.name).unlink(missing_ok=True)  # from here on the old outputs are being replaced
            _remove_stale_partials(out / "notebooks", nb.name)
            partial = out / "notebooks" / f".{nb.stem}.partial-{os.getpid()}.ipynb"
            start, status = time.time(), "ok"
            try:
                pm.execute_notebook(str(nb), str(partial), parameters=plan[nb.name], cwd=str(nb_dir),
                                    kernel_name=cfg.kernel_name, progress_bar=False, log_output=False,
                                    stdout_file=_StreamFile(printer, "stdout"),
                                    stderr_file=_StreamFile(printer, "stderr"), config=kernel_config,
                                    coalesce_streams=True)  # the saved copy keeps each bar's last state only
            except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
                status, failure = "failed", (nb.name, e)
            finally:  # Ctrl-C (like a kill) leaves the partial copy hidden; the marker is gone, so a rerun redoes it
                printer.close()
            if partial.is_file():  # finished, ok or failed: the executed copy (with the error) takes its place
                os.replace(partial, out / "notebooks" / nb.name)
            seconds = time.time() - start
            if status == "ok":
                atomic_write_json(_marker(out, nb.name), {
                    "key": keys[nb.name], "seconds": round(seconds, 1), "finished": f"{datetime.now():%Y-%m-%d %H:%M}",
                    "parameters": plan[nb.name], "profile": cfg.profile})
            rows.append({"notebook": nb.name, "seconds": round(seconds, 1), "status": status, "profile": cfg.profile})
            say.write(f"{header}: {status} in {seconds:.1f} s\n")
            say.flush()
            _save_timings(rows, out)
            if failure:
                break
    try:
        os.rmdir(kernel_dir)
    except OSError:
        pass
    table_df = _save_timings(rows, out)
    try:  # the run's short results section (README tables), regenerated from whatever tables exist
        from .report import run_markdown

        atomic_write_text(out / "RESULTS.md", run_markdown(out))
    except FileNotFoundError:
        pass
    _summary(say, table_df, out, time.time() - started)
    if failure:
        name, err = failure
        raise RuntimeError(f"notebook {name} failed; executed copy with the error: {out / 'notebooks' / name}\n{err}")
    return table_df


def _summary(say: TextIO, table: pd.DataFrame, out: Path, wall: float) -> None:
    say.write("summary:\n")
    for r in table.itertuples():
        say.write(f"  {r.notebook:<45s} {r.seconds:8.1f} s  {r.status}\n")
    ran = table[table.status != "up to date"]
    say.write(f"this run {wall:.1f} s ({len(ran)} notebook(s) executed, {len(table) - len(ran)} up to date)\n")
    say.write(f"results in {out}  (RESULTS.md, tables/, figures/, notebooks/)\n")
    say.flush()


def _save_timings(rows: list[dict], out: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    atomic_write_text(out / "tables" / "timings.csv", table.to_csv(index=False))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="results/<run>/ folder name (or an absolute path)")
    p.add_argument("--profile", default="full", help="'full' or the stem of notebooks/<profile>.yaml (e.g. smoke)")
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter (YAML value) for the selected notebooks that declare it, repeatable")
    p.add_argument("--force", action="store_true", help="rerun notebooks whose outputs are complete and up to date")
    p.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between two terminal lines of one running progress bar (default 30)")
    p.add_argument("--notebooks", default=None, help=argparse.SUPPRESS)  # another notebooks folder (tests)
    a = p.parse_args(argv)
    extra = {}
    for kv in a.param:
        if "=" not in kv:
            p.error(f"--param needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = yaml.safe_load(v)
    if a.progress_interval < 0:
        p.error(f"--progress-interval must be >= 0, got {a.progress_interval}")
    cfg = RunConfig(run=a.run, profile=a.profile, only=[o for o in a.only.split(",") if o], extra_parameters=extra,
                    force=a.force, progress_interval=a.progress_interval,
                    notebooks_dir=Path(a.notebooks) if a.notebooks else None)
    try:
        run_notebooks(cfg)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
