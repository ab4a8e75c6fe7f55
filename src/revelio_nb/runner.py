"""Run the numbered notebooks headlessly with papermill into ``results/<run>/``.

    python -m revelio_nb.runner --run default            # every notebook, full parameters
    python -m revelio_nb.runner --run smoke --profile smoke
    python -m revelio_nb.runner --only 00,01             # a subset, by number prefix

Each notebook gets ``run_dir`` (absolute) plus the profile's overrides from ``notebooks/<profile>.yaml``
(a mapping from notebook file name, or ``_all``, to parameters). Executed notebooks land in
``results/<run>/notebooks/``; each notebook's wall time is printed and written to
``results/<run>/tables/timings.csv``; the tables' short summary goes to ``results/<run>/RESULTS.md``
(:mod:`revelio_nb.report`). The run stops at the first failing notebook (later ones build on it),
keeping everything already produced.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from .paths import project_root, results_dir

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


@dataclass
class RunConfig:
    run: str = "default"
    profile: str = "full"  # "full" (no overrides) or the stem of notebooks/<profile>.yaml
    only: list[str] = field(default_factory=list)  # number prefixes, e.g. ["00", "01"]
    notebooks_dir: Path | None = None
    results_root: Path | None = None
    kernel_name: str = "python3"
    extra_parameters: dict = field(default_factory=dict)


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


def profile_parameters(folder: Path, profile: str, notebook: str) -> dict:
    if profile == "full":
        return {}
    path = folder / f"{profile}.yaml"
    if not path.is_file():
        choices = ["full"] + sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}: no {path}; choices: {choices}")
    table = yaml.safe_load(path.read_text()) or {}
    return {**(table.get("_all") or {}), **(table.get(notebook) or {})}


def run_notebooks(cfg: RunConfig) -> pd.DataFrame:
    """Execute the notebooks; returns (and saves) the timings table. Raises after saving if one fails."""
    import papermill as pm

    root = project_root() or Path.cwd()
    nb_dir = Path(cfg.notebooks_dir or root / "notebooks").resolve()
    out = results_dir(cfg.run, cfg.results_root).resolve()
    (out / "notebooks").mkdir(exist_ok=True)
    notebooks = find_notebooks(nb_dir, cfg.only)
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {nb_dir}")
    rows, failure = [], None
    print(f"running {len(notebooks)} notebooks into {out} (profile {cfg.profile})", flush=True)
    for nb in notebooks:
        params = {"run_dir": str(out), **profile_parameters(nb_dir, cfg.profile, nb.name), **cfg.extra_parameters}
        start = time.time()
        status = "ok"
        try:
            pm.execute_notebook(str(nb), str(out / "notebooks" / nb.name), parameters=params, cwd=str(nb_dir),
                                kernel_name=cfg.kernel_name, progress_bar=False, log_output=False)
        except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
            status, failure = "failed", (nb.name, e)
        seconds = time.time() - start
        rows.append({"notebook": nb.name, "seconds": round(seconds, 1), "status": status, "profile": cfg.profile})
        print(f"  {nb.name:<45s} {seconds:8.1f} s  {status}", flush=True)
        _save_timings(rows, out)
        if failure:
            break
    table = _save_timings(rows, out)
    print(f"total {table['seconds'].sum():.1f} s; results in {out}", flush=True)
    try:  # the run's short results section (README tables), regenerated from whatever tables exist
        from .report import run_markdown

        (out / "RESULTS.md").write_text(run_markdown(out))
    except FileNotFoundError:
        pass
    if failure:
        name, err = failure
        raise RuntimeError(f"notebook {name} failed; executed copy with the error: {out / 'notebooks' / name}\n{err}")
    return table


def _save_timings(rows: list[dict], out: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.to_csv(out / "tables" / "timings.csv", index=False)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="default", help="results/<run>/ folder name (or an absolute path)")
    p.add_argument("--profile", default="full", help="'full' or the stem of notebooks/<profile>.yaml (e.g. smoke)")
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra parameter for every notebook (YAML value), repeatable")
    a = p.parse_args(argv)
    extra = {}
    for kv in a.param:
        if "=" not in kv:
            p.error(f"--param needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = yaml.safe_load(v)
    cfg = RunConfig(run=a.run, profile=a.profile, only=[o for o in a.only.split(",") if o], extra_parameters=extra)
    try:
        run_notebooks(cfg)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
