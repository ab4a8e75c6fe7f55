"""Run the numbered notebooks headlessly with papermill into ``results/<run>/``.

    python -m revelio_nb.runner --run default            # every notebook, full parameters
    python -m revelio_nb.runner --run smoke --profile smoke
    python -m revelio_nb.runner --only 00,01             # a subset, by number prefix
    python -m revelio_nb.runner -p model=/path/to/model  # a parameter for the notebooks that declare it
    python -m revelio_nb.runner --force                  # rerun notebooks that are up to date

Parameters (:mod:`revelio_nb.run_plan`). Each notebook gets ``run_dir`` (absolute) plus the profile's overrides from
``notebooks/<profile>.yaml`` (a mapping from notebook file name, or ``_all``, to parameters) plus ``-p KEY=VALUE``.
Before anything runs, every key is checked against the notebooks' ``parameters`` cells: a ``-p`` or ``_all`` key
goes to the selected notebooks that declare it, and one that none of them declares is an error listing the declared
parameters (a typo such as ``-p modle=...`` never silently runs the defaults); a key set for one notebook must be
declared by that notebook.

Terminal. Each notebook's header, then its cells' printed lines and progress bars as they come, condensed: a bar is
shown when it starts, at most every ``progress_interval`` seconds while it runs, and when it ends (the kernel draws
text bars: the runner sets ``REVELIO_PROGRESS=text``; :mod:`revelio_nb.run_progress`). A summary lists each
notebook's time and status and the results folder. The kernel talks to the runner over IPC sockets in a private
temporary folder (no TCP, so no "running over TCP without encryption" warning).

Outputs. Executed notebooks land in ``results/<run>/notebooks/`` (written under a temporary name, renamed when the
notebook ends, ok or failed), each notebook's wall time in ``results/<run>/tables/timings.csv`` (each code cell's
in ``cell_timings.csv``) and the tables' short summary in ``results/<run>/RESULTS.md`` (:mod:`revelio_nb.report`),
all written atomically. The run stops at the
first failing notebook (later ones build on it), keeping everything already produced.

Reruns. A notebook that finished is recorded in ``results/<run>/.runner/<notebook>.json`` (written atomically after
its executed copy is in place; :mod:`revelio_nb.run_markers`) with a key hashing its parameters, its source, the
package source and the keys of the notebooks before it. A rerun (e.g. after a killed ``make reproduce``) skips
notebooks whose key matches and whose executed copy exists, and reruns the rest; ``--force`` reruns everything. The
key does not see the *content* of a dataset folder given by path: after changing the images in a folder, rerun with
``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

import pandas as pd
import yaml

from .paths import atomic_write_json, atomic_write_text, project_root, results_dir
from .run_markers import STATE_DIR, completed, marker_path, notebook_keys, package_fingerprint, remove_stale_partials
from .run_plan import find_notebooks, load_profile, plan_parameters
from .run_progress import ProgressPrinter, StreamFile, quiet_headless_kernel


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
    with quiet_headless_kernel(progress_mininterval=min(5.0, max(0.5, cfg.progress_interval / 3))):
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
            marker_path(out, nb.name).unlink(missing_ok=True)  # from here on the old outputs are being replaced
            remove_stale_partials(out / "notebooks", nb.name)
            partial = out / "notebooks" / f".{nb.stem}.partial-{os.getpid()}.ipynb"
            start, status = time.time(), "ok"
            try:
                pm.execute_notebook(str(nb), str(partial), parameters=plan[nb.name], cwd=str(nb_dir),
                                    kernel_name=cfg.kernel_name, progress_bar=False, log_output=False,
                                    stdout_file=StreamFile(printer, "stdout"),
                                    stderr_file=StreamFile(printer, "stderr"), config=kernel_config,
                                    coalesce_streams=True)  # the saved copy keeps each bar's last state only
            except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
                status, failure = "failed", (nb.name, e)
            finally:  # Ctrl-C (like a kill) leaves the partial copy hidden; the marker is gone, so a rerun redoes it
                printer.close()
            if partial.is_file():  # finished, ok or failed: the executed copy (with the error) takes its place
                os.replace(partial, out / "notebooks" / nb.name)
            seconds = time.time() - start
            if status == "ok":
                atomic_write_json(marker_path(out, nb.name), {
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
    cells_path = out / "tables" / "cell_timings.csv"
    if cells_path.is_file():
        from .cell_timings import slowest

        lines = slowest(pd.read_csv(cells_path), n=5)
        if lines:
            say.write("slowest cells (tables/cell_timings.csv):\n" + "".join(f"  {ln}\n" for ln in lines))
    say.write(f"results in {out}  (RESULTS.md, tables/, figures/, notebooks/)\n")
    say.flush()


def _save_timings(rows: list[dict], out: Path) -> pd.DataFrame:
    """``tables/timings.csv`` (each notebook's wall time) and ``tables/cell_timings.csv`` (each code cell's seconds,
    read from the executed copies of the same notebooks: :mod:`revelio_nb.cell_timings`)."""
    from .cell_timings import run_cell_timings

    table = pd.DataFrame(rows)
    atomic_write_text(out / "tables" / "timings.csv", table.to_csv(index=False))
    cells = run_cell_timings(out / "notebooks", [r["notebook"] for r in rows])
    atomic_write_text(out / "tables" / "cell_timings.csv", cells.to_csv(index=False))
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
