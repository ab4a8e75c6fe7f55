"""Which notebooks a run executes and with which parameters, checked before anything runs.

The numbered notebooks of a folder (``NN_name.ipynb``, :func:`find_notebooks`), the profile tables
``notebooks/<profile>.yaml`` (:func:`load_profile`: a mapping from notebook file name, or ``_all``, to parameters),
the parameters each notebook declares in its ``parameters`` cell (:func:`declared_parameters`), and the plan that
gives each notebook the profile's, ``_all``'s and ``-p`` keys it declares (:func:`plan_parameters`). A key that no
selected notebook declares is a :class:`ParameterError` listing the declared ones (a typo such as ``-p modle=...``
never silently runs the defaults). Used by :mod:`revelio_nb.runner`.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from pathlib import Path

import yaml

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")


class ParameterError(ValueError):
    """A parameter is declared by none of the notebooks it is meant for (the message lists the declared ones)."""



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

