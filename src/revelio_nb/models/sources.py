"""The sources :func:`load_model` accepts and which loader each goes to: ``embedded:<name>`` (trained on first use,
:mod:`.embedded`), ``random:<name>`` (:mod:`.random_init`), a local folder or a hub id (:mod:`.loading`).

Its own module so that the loaders never import each other: embedded and random-init models are built with
:mod:`.loading`'s helpers, and only this dispatcher needs all three.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .core import DiffusionModel
from .embedded import ensure_embedded
from .embedded_specs import embedded_names
from .errors import ModelLoadError
from .loading import _hub_snapshot, load_from_folder
from .random_init import random_init_model

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} (or a torch.dtype)")
    return DTYPES[dtype]


def load_model(
    source: str | os.PathLike = "embedded:animals-unet",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    train_steps: int | None = None,
    progress: bool = True,
) -> DiffusionModel:
    """Load ``embedded:<name>``, ``random:<name>`` (an embedded architecture with seeded random weights), a local
    folder, or a hub id.

    ``dtype`` is applied while loading (every component), so a large model never exists in fp32 in memory.
    ``train_steps`` overrides an embedded model's training budget (smoke runs); it is part of the cache key.
    """
    src = str(source)
    torch_dtype = _dtype(dtype)
    if src.startswith("embedded:"):
        folder = ensure_embedded(src.split(":", 1)[1], train_steps=train_steps, progress=progress)
        model = load_from_folder(folder, model_id=src if train_steps is None else f"{src}@{train_steps}",
                                 torch_dtype=torch_dtype)
    elif src.startswith("random:"):
        model = random_init_model(src.split(":", 1)[1])
    elif Path(src).expanduser().exists():
        model = load_from_folder(src, torch_dtype=torch_dtype)
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and "/" in src:
        raise ModelLoadError(
            f"{src!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1). "
            f"Embedded choices: {embedded_names()}; or pass a local diffusers folder."
        )
    elif "/" in src and not src.startswith((".", "/", "~")):
        model = load_from_folder(_hub_snapshot(src), model_id=src, torch_dtype=torch_dtype)
    else:
        raise ModelLoadError(
            f"unknown model {src!r}: not an embedded name, not an existing folder, not a hub id (owner/name). "
            f"Embedded choices: {embedded_names()}"
        )
    if device is not None or (dtype is not None and model.dtype != torch_dtype):
        model.to(device=device, dtype=torch_dtype)
    return model
