"""The adapter interface: what one model family owns (see :mod:`revelio_nb.models.adapters`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ModelLoadError
from ..noise import noise_for_scheduler


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a block output (tensor, tuple/list, ``.sample`` output or dict)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if hasattr(output, "sample") and torch.is_tensor(output.sample):
        return output.sample
    if isinstance(output, dict) and output:
        return first_tensor(next(iter(output.values())))
    return None


def tokens_to_grid(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, N, D) tokens in row-major patch order -> (B, D, grid_h, grid_w).

    Patchify flattens (B, D, h, w) as ``flatten(2).transpose(1, 2)``, so the inverse is
    ``reshape(B, h, w, D).permute(0, 3, 1, 2)`` (a bare ``reshape(B, D, h, w)`` would scramble channels and space).
    """
    b, n, d = tokens.shape
    if grid_h * grid_w != n:
        raise ValueError(f"cannot put {n} tokens on a {grid_h}x{grid_w} grid")
    return tokens.reshape(b, grid_h, grid_w, d).permute(0, 3, 1, 2)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tokens_to_grid`: (B, D, h, w) -> (B, h*w, D)."""
    return grid.flatten(2).transpose(1, 2)


class Adapter:
    """One model family. Subclasses set the class attributes and override what differs."""

    family = ""  # registry key and DiffusionModel.kind
    label = ""  # human-readable family name
    classes: tuple[str, ...] = ()  # diffusers denoiser class names this adapter takes
    subfolders: tuple[str, ...] = ("transformer",)
    examples = ""
    noise_doc = ""
    takes_prompts = False
    fixed_size = False  # position embeddings only for the native size
    sampler = "ddim"  # "ddim" | "flow" | "lcm"
    default_guidance = 1.0  # classifier-free guidance scale when the caller gives none

    def __init__(self, model):
        self.model = model

    # -- registry
    @classmethod
    def matches(cls, class_name: str, config: dict[str, Any], model_index: dict[str, Any]) -> bool:
        return class_name in cls.classes

    @classmethod
    def denoiser_class(cls, class_name: str, config: dict[str, Any]) -> str:
        """The diffusers class that loads this folder (e.g. PixArt checkpoints saved as Transformer2DModel)."""
        return class_name

    @property
    def cfg(self):
        return self.model.denoiser.config

    def reset(self) -> None:
        """Forget cached encodings (after moving the model)."""

    # -- geometry
    def latent_channels(self) -> int:
        return int(self.cfg.in_channels)

    def patch_size(self) -> int:
        return int(getattr(self.cfg, "patch_size", None) or 1)

    def size_multiple(self) -> int:
        return self.patch_size() * self.model.vae_factor

    def native_image_size(self) -> int:
        s = self.cfg.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return int(s) * self.model.vae_factor

    def max_image_size(self) -> int | None:
        return None

    def check_image_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, (int,)) and not hasattr(size, "__index__"):
            raise ValueError(f"image size {size!r} must be a positive integer")
        size = int(size)
        m = self.size_multiple()
        native = self.native_image_size()
        if size <= 0 or size % m:
            ok = [m * i for i in range(1, 9)]
            raise ValueError(
                f"image size {size} cannot be taken by {self.model.model_id} ({self.family}): sides must be a positive "
                f"multiple of {m} (e.g. {ok}); its native size is {native}"
            )
        if self.fixed_size and size != native:
            raise ValueError(
                f"image size {size}: the {self.label} {self.model.model_id} has fixed position embeddings for {native}px; "
                f"use image_size={native}"
            )
        top = self.max_image_size()
        if top is not None and size > top:
            raise ValueError(f"image size {size} is larger than {self.model.model_id} can take ({self.label}: position "
                             f"embeddings up to {top}px); use at most {top}")
        return size

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.patch_size()
        return int(latent_hw[0]) // p, int(latent_hw[1]) // p

    def seq_len(self, latent_hw: tuple[int, int]) -> int:
        gh, gw = self.token_grid(latent_hw)
        return gh * gw

    def main_blocks(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(self.model.denoiser.transformer_blocks))]

    def h_block(self) -> str:
        """Default h of Decoding Diffusion on transformers: the middle block of :meth:`main_blocks`."""
        blocks = self.main_blocks()
        return blocks[len(blocks) // 2]

    # -- block outputs
    def image_stream(self, block: str, module: torch.nn.Module, output: Any) -> torch.Tensor | None:
        """The image stream of a block's output: a map (B, C, h, w) or tokens (B, N, D); None if it holds none."""
        return first_tensor(output)

    def with_image_stream(self, block: str, module: torch.nn.Module, output: Any, new: torch.Tensor) -> Any:
        """``output`` with its image stream replaced by ``new`` (for steering)."""
        if torch.is_tensor(output):
            return new
        if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
            return (new, *output[1:])
        if hasattr(output, "sample") and torch.is_tensor(output.sample):
            output.sample = new
            return output
        raise TypeError(f"cannot replace the image stream of block {block!r}: it returns {type(output).__name__}")

    def to_grid(self, stream: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """An image stream as a spatial map (B, C, h, w): tokens go back on the family's grid."""
        if stream.ndim == 3:
            return tokens_to_grid(stream, *self.token_grid(latent_hw))
        return stream

    def from_grid(self, grid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (B, C, h, w) map in the layout of the image stream ``like`` (tokens or map)."""
        return grid_to_tokens(grid) if like.ndim == 3 else grid

    # -- noise
    def make_noise(self):
        return noise_for_scheduler(self.model.scheduler)

    def flow_sigmas(self, steps: int):
        """Flow models: the sigma grid of the family's own pipeline for ``steps`` steps (None: the scheduler's)."""
        return None

    # -- conditioning
    def num_classes(self) -> int | None:
        return None

    def null_class(self) -> int | None:
        return self.num_classes()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.model.model_id} ({self.family}) is not text-conditioned; prompts cannot be used")

    def guidance_cond(self, batch_size: int, guidance: float | None) -> dict[str, torch.Tensor]:
        """Guidance the model takes as an input (LCM, FLUX-dev): none by default."""
        return {}

    def uses_cfg(self) -> bool:
        """Whether guidance > 1 means classifier-free guidance (a second, neutral pass)."""
        return True

    # -- the call
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    # -- helpers
    def _pipeline(self, cls_name: str, **components):
        """A diffusers pipeline object around the loaded components (for its own ``encode_prompt``)."""
        cache = getattr(self, "_pipe", None)
        if cache is None:
            import diffusers

            cls = getattr(diffusers, cls_name)
            cache = cls(**components)
            cache.set_progress_bar_config(disable=True)
            self._pipe = cache
        return cache

    def _need(self, *names: str) -> None:
        missing = [n for n in names if getattr(self.model, n) is None]
        if missing:
            raise ModelLoadError(f"{self.model.model_id} ({self.label}) needs {missing} to encode prompts; its folder "
                                 f"has none")


def middle(n: int) -> int:
    return int(math.floor(n / 2))
