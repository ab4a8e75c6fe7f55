"""Capture the outputs of any blocks of a UNet or transformer denoiser, with early exit.

Block names are module paths of the denoiser (``mid_block``, ``up_blocks.1``, ``transformer_blocks.3``,
``down_blocks.0.resnets.1`` ...). Each output is reduced to its **image stream** by the model's adapter (UNet
blocks: the hidden states; joint SD3 / FLUX blocks: the image element of ``(text, image)``, never the text
stream) and normalised to a spatial map (B, C, h, w): transformer tokens go back on the family's grid (patch size,
FLUX 2x2 packing, non-square sizes) with the right permute.
With ``early_exit`` the forward pass stops as soon as every requested block has fired, so asking for the
bottleneck skips the whole decoder. Hooks are removed in a ``finally``, also when the forward raises.
"""

from __future__ import annotations

import difflib
import math
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd
import torch
import torch.nn as nn

from .models import DiffusionModel
from .models.adapters import first_tensor
from .models.adapters import tokens_to_grid as _tokens_to_grid


class BlockNotFoundError(ValueError):
    """A requested block is not a module of the denoiser."""


class _EarlyExit(Exception):
    """Raised inside a hook to stop the forward pass once every requested block has been captured."""


def block_depth(name: str) -> int:
    return name.count(".") + 1


def hookable_blocks(denoiser: nn.Module, max_depth: int | None = None) -> list[str]:
    """Every sub-module path of the denoiser (optionally only the top ``max_depth`` levels), in definition order."""
    return [n for n, _ in denoiser.named_modules() if n and (max_depth is None or block_depth(n) <= max_depth)]


def validate_blocks(denoiser: nn.Module, blocks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Check block names; an unknown one is an error that lists the valid top-level names and close matches."""
    if isinstance(blocks, str):
        blocks = [blocks]
    blocks = list(blocks)
    if not blocks:
        raise BlockNotFoundError("no blocks requested; ask for at least one, e.g. 'mid_block'")
    modules = dict(denoiser.named_modules())
    for b in blocks:
        if not b or b not in modules:
            valid = hookable_blocks(denoiser, max_depth=2)
            close = difflib.get_close_matches(str(b), list(modules), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise BlockNotFoundError(
                f"unknown block {b!r} for {type(denoiser).__name__}.{hint} Valid blocks (top two levels; deeper "
                f"module paths work too): {valid}"
            )
    if len(set(blocks)) != len(blocks):
        raise BlockNotFoundError(f"block list has duplicates: {blocks}")
    return blocks


_first_tensor = first_tensor


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, D) tokens in row-major patch order -> (B, D, h, w), the grid having the aspect height:width.

    Patchify flattens (B, D, h, w) as ``flatten(2).transpose(1, 2)``, so the inverse is
    ``reshape(B, h, w, D).permute(0, 3, 1, 2)`` (a bare ``reshape(B, D, h, w)`` would scramble channels and space).
    Model-aware callers use :func:`image_stream_map`, which knows the family's exact grid.
    """
    b, n, d = tokens.shape
    h = int(round(math.sqrt(n * height / width)))
    w = n // max(h, 1)
    if h * w != n:
        raise ValueError(f"cannot put {n} tokens on a grid with aspect {height}:{width}")
    return _tokens_to_grid(tokens, h, w)


def normalise_output(output: Any, input_hw: tuple[int, int]) -> torch.Tensor | None:
    """Model-agnostic normalisation (first tensor; tokens on a grid of the input's aspect). Prefer
    :func:`image_stream_map`, which takes the image stream of joint blocks and the family's own grid."""
    t = first_tensor(output)
    if t is None:
        return None
    if t.ndim == 3:  # transformer tokens
        return tokens_to_grid(t, *input_hw)
    return t


def image_stream_map(model: DiffusionModel, block: str, module: nn.Module, output: Any,
                     latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """The image stream of a block's output as a spatial map (B, C, h, w), per the model's adapter."""
    t = model.adapter.image_stream(block, module, output)
    if t is None:
        return None
    return model.adapter.to_grid(t, latent_hw)


class HookHandles:
    """Owner of hooks on a denoiser's modules (handles in ``self._handles``): :meth:`remove` takes them all off, as
    does leaving the owner's ``with`` block."""

    _handles: list[Any]

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class FeatureCapture(HookHandles):
    """Forward hooks on some blocks of a denoiser.

    >>> with FeatureCapture(model, ["mid_block", "up_blocks.0"]) as cap:
    ...     feats = cap.run(x_t, t, cond)          # {"mid_block": (B, C, h, w), ...}
    """

    def __init__(self, model: DiffusionModel, blocks: list[str] | str, early_exit: bool = True):
        self.model = model
        self.blocks = validate_blocks(model.denoiser, [model.resolve_block(b) for b in
                                                       ([blocks] if isinstance(blocks, str) else blocks)])
        self.early_exit = early_exit
        self._handles: list[Any] = []
        self._store: dict[str, torch.Tensor] = {}
        self._input_hw = (1, 1)

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if name not in self._store:
                t = image_stream_map(self.model, name, module, output, self._input_hw)
                if t is None:
                    raise TypeError(f"block {name!r} returned {type(output).__name__}, which holds no tensor to capture")
                self._store[name] = t.detach()
            if self.early_exit and len(self._store) == len(self.blocks):
                raise _EarlyExit
        return hook

    def __enter__(self) -> "FeatureCapture":
        modules = dict(self.model.denoiser.named_modules())
        try:
            for name in self.blocks:
                self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    @torch.no_grad()
    def run(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """One denoiser pass at user timestep ``t`` (0..N-1); returns the captured image streams as maps (stops
        early when allowed)."""
        if not self._handles:
            raise RuntimeError("FeatureCapture.run outside its `with` block: hooks are not registered")
        self._store = {}
        self._input_hw = tuple(x_t.shape[-2:])
        try:
            self.model.denoise(x_t, t, cond)
        except _EarlyExit:
            pass
        missing = [b for b in self.blocks if b not in self._store]
        if missing:
            raise RuntimeError(f"blocks {missing} never ran during the forward pass (are they used by this model?)")
        out, self._store = self._store, {}
        return out


@contextmanager
def capture(model: DiffusionModel, blocks: list[str] | str, early_exit: bool = True) -> Iterator[FeatureCapture]:
    with FeatureCapture(model, blocks, early_exit=early_exit) as cap:
        yield cap


@torch.no_grad()
def list_blocks(model: DiffusionModel, image_size: int | None = None, max_depth: int | None = 2,
                timestep: int = 0) -> pd.DataFrame:
    """Every hookable block with its type, captured output shape (the image stream as (C, h, w)) and execution
    order, for one input size. Blocks whose output holds no image stream (text-stream / conditioning modules of
    joint transformers, embeddings) have ``output_shape`` None and their raw shape in ``raw_shape``."""
    size = model.check_image_size(model.native_image_size if image_size is None else image_size)
    names = hookable_blocks(model.denoiser, max_depth)
    modules = dict(model.denoiser.named_modules())
    x = torch.zeros(model.latent_shape(1, size), device=model.device, dtype=model.dtype)
    shapes: dict[str, tuple[int, ...] | None] = {}
    raw: dict[str, Any] = {}
    order: dict[str, int] = {}
    hw = tuple(x.shape[-2:])

    def make(name):
        def hook(module, args, output):
            if name not in order:
                order[name] = len(order)
                t0 = first_tensor(output)
                raw[name] = tuple(t0.shape[1:]) if t0 is not None else None
                try:
                    t = image_stream_map(model, name, module, output, hw)
                    shapes[name] = tuple(t.shape[1:]) if t is not None else None
                except (ValueError, TypeError):
                    shapes[name] = None
        return hook
    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        model.denoise(x, timestep)
    finally:
        for h in handles:
            h.remove()
    rows = [
        {"block": n, "type": type(modules[n]).__name__, "depth": block_depth(n),
         "output_shape": shapes.get(n), "channels": shapes[n][0] if shapes.get(n) else None,
         "raw_shape": raw.get(n), "exec_order": order.get(n)}
        for n in names
    ]
    return pd.DataFrame(rows)
