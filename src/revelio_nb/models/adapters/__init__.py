"""One adapter per model family, registered by diffusers class name and config traits.

A new family is one new file: subclass :class:`~revelio_nb.models.adapters.base.Adapter` and add it to
:data:`ADAPTERS`. The first adapter whose ``matches`` accepts a folder's denoiser class and config loads it.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelLoadError
from .base import Adapter, first_tensor, grid_to_tokens, tokens_to_grid
from .dit import DiTAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .unet_cond import UNetCondAdapter

ADAPTERS: list[type[Adapter]] = [UNetAdapter, UNetCondAdapter, DiTAdapter, PixArtAdapter, SD3Adapter, FluxAdapter,
                                 SanaAdapter]


def supported() -> dict[str, list[str]]:
    """Family -> the diffusers denoiser classes it takes."""
    return {a.family: list(a.classes) for a in ADAPTERS}


def find_adapter(class_name: str, config: dict[str, Any], model_index: dict[str, Any] | None = None,
                 where: str = "") -> type[Adapter]:
    for a in ADAPTERS:
        if a.matches(class_name, config, model_index or {}):
            return a
    fams = "; ".join(f"{a.family} ({a.label}): {', '.join(a.classes)}" for a in ADAPTERS)
    raise ModelLoadError(f"{where}: unsupported denoiser class {class_name!r}"
                         + (f" (norm_type={config.get('norm_type')!r})" if class_name == "Transformer2DModel" else "")
                         + f"; supported families: {fams}")


def adapter_for_family(family: str) -> type[Adapter]:
    for a in ADAPTERS:
        if a.family == family:
            return a
    raise ModelLoadError(f"unknown model family {family!r}; valid: {[a.family for a in ADAPTERS]}")


__all__ = ["ADAPTERS", "Adapter", "adapter_for_family", "find_adapter", "first_tensor", "grid_to_tokens",
           "supported", "tokens_to_grid"]
