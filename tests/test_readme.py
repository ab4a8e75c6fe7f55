"""Every ```python example of README.md runs as written on an empty cache.

Conventions (stated in the README): a line whose comment ends in ``needs network`` is skipped (hub ids cannot load
offline); string literals ``"/path/to/..."`` are placeholders pointed at folders the test builds. To keep it cheap,
the embedded models' training budgets are shrunk (same recipes, a few steps) and Animal-MNIST is cut to a
stratified few images per class; the README code itself is not changed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDS_NETWORK = re.compile(r"#.*needs network\s*$")


def readme_python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def runnable(block: str, placeholders: dict[str, str]) -> str:
    lines = []
    for line in block.splitlines():
        if NEEDS_NETWORK.search(line):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}pass  # skipped: needs network"
        lines.append(line)
    code = "\n".join(lines) + "\n"
    for placeholder, real in placeholders.items():
        code = code.replace(repr(placeholder).replace("'", '"'), repr(real))
    left = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.startswith("/path/to/")]
    assert not left, f"README placeholders the test does not know: {left}; add them to the test's placeholders"
    return code


def test_readme_blocks_are_found_and_marked():
    blocks = readme_python_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md has no ```python example"
    skipped = [l for b in blocks for l in b.splitlines() if NEEDS_NETWORK.search(l)]
    assert all("load_model(" in l or "load_dataset(" in l for l in skipped), skipped


@pytest.fixture
def small_embedded(monkeypatch):
    """Embedded models at a few training steps, Animal-MNIST cut to 12 images per class."""
    from revelio_nb import data, models

    for name, spec in list(models.EMBEDDED_MODELS.items()):
        monkeypatch.setitem(models.EMBEDDED_MODELS, name, replace(
            spec, train=replace(spec.train, steps=2, warmup_steps=1, batch_size=8)))
    full = data._load_animal_mnist

    def small_animals():
        images, labels, names = full()
        keep = np.concatenate([np.where(labels == c)[0][:12] for c in range(len(names))])
        return images[keep], labels[keep], names

    monkeypatch.setattr(data, "_load_animal_mnist", small_animals)


@pytest.mark.slow
def test_readme_examples_run_on_an_empty_cache(small_embedded, tiny_unet_path, tmp_path, monkeypatch):
    """Each block alone, in a fresh namespace, on its own empty cache (the README's one-call extraction used to die
    with "element 0 of tensors does not require grad": first-use training inside the no_grad extraction)."""
    monkeypatch.chdir(tmp_path)
    placeholders = {"/path/to/a/diffusers/folder": str(tiny_unet_path)}
    blocks = readme_python_blocks((REPO / "README.md").read_text())
    spaces = []
    for i, block in enumerate(blocks):
        monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / f"empty-cache-{i}"))
        namespace: dict = {}
        exec(compile(runnable(block, placeholders), f"README.md python block {i}", "exec"), namespace)
        spaces.append(namespace)
    # the one-call extraction trained the embedded model on first use and filled its store
    store = next(ns["store"] for ns in spaces if "store" in ns)
    assert store.array("mid_block", 25).shape[0] == len(store.indices) == 10 * round(0.7 * 12)  # 70 % of 12 per class
    assert np.isfinite(np.asarray(store.array("up_blocks.0", 100))).all()


def test_readme_package_layout_is_the_generated_one():
    """The README's package layout is regenerated from the tree (``python -m revelio_nb.report --layout``): a module
    added, removed or re-documented without regenerating it fails here."""
    from revelio_nb.report import LAYOUT_MARKERS, package_layout_markdown

    text = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = LAYOUT_MARKERS
    section = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert section == package_layout_markdown(REPO / "src" / "revelio_nb").strip(), (
        "README.md's package layout is stale: run `python -m revelio_nb.report --layout README.md`")


def test_package_layout_lists_every_module_with_its_purpose(tmp_path):
    from revelio_nb.report import package_layout_markdown

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Top."""\n')
    (pkg / "alpha.py").write_text('"""Does alpha things. More detail here."""\nx = 1\n')
    (pkg / "sub" / "__init__.py").write_text('"""A sub-package | with a pipe."""\n')
    (pkg / "sub" / "beta.py").write_text("y = 2\n")
    rows = package_layout_markdown(pkg).splitlines()[2:]
    assert rows == ["| `alpha` | 2 | Does alpha things. |", "| `sub/` | 1 | A sub-package \\| with a pipe. |",
                    "| `sub.beta` | 1 |  |"]
