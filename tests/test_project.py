"""House rules: clean notebooks with a parameters cell, pins in sync, runner behaviour."""

import json
from pathlib import Path

import pytest
import yaml

from revelio_nb import run_plan, runner

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS][:2] == ["00", "01"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_clean_with_parameters_first(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code"
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), f"{path.name}: first code cell must be tagged parameters"
    assert "run_dir" in "".join(code[0]["source"]), f"{path.name}: parameters must include run_dir"
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name} is committed with outputs"
        assert len("".join(c["source"]).splitlines()) <= 20, f"{path.name}: a cell over 20 lines is a missing function"


def test_smoke_profile_names_existing_notebooks():
    table = yaml.safe_load((REPO / "notebooks" / "smoke.yaml").read_text())
    names = {p.name for p in NOTEBOOKS}
    assert set(table) - {"_all"} <= names
    assert names <= set(table), f"notebooks without smoke parameters: {names - set(table)}"


def test_environment_yml_pins_match_requirements():
    req = {l.strip() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == req
    assert "torch==2.13.0" in req


def test_runner_selection_and_profiles(tmp_path):
    nb_dir = REPO / "notebooks"
    assert [p.name for p in run_plan.find_notebooks(nb_dir, ["01"])] == ["01_extract_features.ipynb"]
    with pytest.raises(ValueError, match="available"):
        run_plan.find_notebooks(nb_dir, ["42"])
    assert run_plan.profile_parameters(nb_dir, "full", "01_extract_features.ipynb") == {}
    assert run_plan.profile_parameters(nb_dir, "smoke", "01_extract_features.ipynb")["max_images"] > 0
    with pytest.raises(ValueError, match="choices: \\['full', 'smoke'"):
        run_plan.profile_parameters(nb_dir, "tiny", "01_extract_features.ipynb")


def test_runner_executes_and_times(tmp_path):
    """A real papermill run of a one-cell notebook: parameters injected, timings written."""
    import sys
    sys.path.insert(0, str(REPO))
    from tools.nbbuild import write_notebook

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "00_hello.ipynb", [("params", "run_dir = 'x'\nvalue = 1"),
                                            ("code", "from pathlib import Path\n(Path(run_dir) / 'tables' / 'v.txt').write_text(str(value))")])
    (nbs / "smoke.yaml").write_text("00_hello.ipynb: {value: 7}\n")
    table = runner.run_notebooks(runner.RunConfig(run=str(tmp_path / "out"), profile="smoke", notebooks_dir=nbs))
    assert (tmp_path / "out" / "tables" / "v.txt").read_text() == "7"
    assert table.status.tolist() == ["ok"] and (tmp_path / "out" / "tables" / "timings.csv").is_file()
    assert "Notebook wall times (smoke profile): 00 " in (tmp_path / "out" / "RESULTS.md").read_text()
    write_notebook(nbs / "01_fail.ipynb", [("params", "run_dir = 'x'"), ("code", "raise ValueError('boom')")])
    with pytest.raises(RuntimeError, match="01_fail.ipynb failed"):
        runner.run_notebooks(runner.RunConfig(run=str(tmp_path / "out2"), notebooks_dir=nbs))
    assert (tmp_path / "out2" / "tables" / "timings.csv").read_text().count("failed") == 1


def test_public_api_resolves_lazily():
    """Every name of ``revelio_nb.__all__`` resolves to the object of the module that owns it, and importing the
    package alone loads no heavy dependency."""
    import subprocess
    import sys

    code = ("import sys, revelio_nb as rv; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; missing = [n for n in rv.__all__ if getattr(rv, n, None) is None]; "
            "assert not missing, missing; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    import revelio_nb as rv
    from revelio_nb.sae import TrainConfig

    assert rv.TrainConfig is TrainConfig and rv.sae.TrainConfig is TrainConfig
    with __import__("pytest").raises(AttributeError, match="no attribute 'nope'"):
        rv.nope  # noqa: B018


def test_package_data_ships_every_non_python_file():
    """The static page's template, style and script (``browse/static/``) and any other non-Python file of the
    package match a [tool.setuptools.package-data] pattern, so a wheel carries them, not only an editable install."""
    tomllib = pytest.importorskip("tomllib")
    package = REPO / "src" / "revelio_nb"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["revelio_nb"]
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}
    assert {p.relative_to(package).as_posix() for p in data - shipped} == set()
    assert {"browse/static/page.css", "browse/static/page.js", "browse/static/page.html"} <= {
        p.relative_to(package).as_posix() for p in shipped}


def _package_imports(package: Path) -> dict[str, set[str]]:
    """Module name -> the package modules it imports, at module level or inside functions (a lazy import that only
    hides a cycle is still a cycle); ``if TYPE_CHECKING:`` imports are left out."""
    import ast

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()

        def visit(node, in_type_checking=False):
            for child in ast.iter_child_nodes(node):
                skip = in_type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                if isinstance(child, ast.Import) and not skip:
                    targets.update(a.name for a in child.names)
                elif isinstance(child, ast.ImportFrom) and not skip:
                    base = child.module or ""
                    if child.level:
                        up = here.split(".")[: len(here.split(".")) - child.level + 1]
                        base = ".".join(up + ([child.module] if child.module else []))
                    # `from pkg import mod` imports the module; `from pkg import name` imports pkg itself
                    targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names)
                visit(child, skip)

        visit(ast.parse(path.read_text()))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def dfs(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt) and (found := dfs(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := dfs(node, [])):
            return found
    return None


def test_import_graph_has_no_cycle(tmp_path):
    """No module of the package imports, even lazily, a module that imports it back (issue 14)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("def f():\n    from .sub import two\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "two.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import one\n")
    assert _find_cycle(_package_imports(pkg)) is None  # the type-only import back is not a cycle
    (pkg / "sub" / "two.py").write_text("from ..one import f\n")
    assert _find_cycle(_package_imports(pkg)) == ["pkg.one", "pkg.sub.two", "pkg.one"]

    graph = _package_imports(REPO / "src" / "revelio_nb")
    assert len(graph) > 50 and "revelio_nb.models.loading" in graph["revelio_nb.models.sources"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
