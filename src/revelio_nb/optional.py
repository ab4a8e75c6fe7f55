"""Optional dependencies: imported where needed, and a missing one is a one-line error naming the install command.

    W = require("ipywidgets")        # in a kernel without it: MissingDependency: ipywidgets is not installed ...
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (pip requirement, what needs it). Pins as in requirements.txt; `make venv` installs all of them.
OPTIONAL = {
    "datasets": ("datasets==5.2.0", "Hugging Face hub datasets (dataset='hf:<name>')"),
    "ipywidgets": ("ipywidgets==8.1.9", "the latent browser widget (notebook 03)"),
    "playwright": ("playwright==1.65.2", "the real-browser checks of the static latent page"),
}


class MissingDependency(ImportError):
    """An optional package is not installed in this Python (the message says how to install it)."""


def install_hint(module: str) -> str:
    requirement, purpose = OPTIONAL.get(module, (module, "this feature"))
    return (f"{module} is not installed in this Python, and {purpose} needs it: "
            f"pip install '{requirement}' (or `make venv`; restart the kernel afterwards)")


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` with the install command (no chained traceback)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # installed, but something it imports is missing: the original error says what
    raise MissingDependency(install_hint(module))
