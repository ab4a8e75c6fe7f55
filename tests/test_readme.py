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
