"""Pixel-space ``UNet2DModel`` (DDPM; unconditional or class-conditional), e.g. ``google/ddpm-cifar10-32`` and the
embedded models."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter


class UNetAdapter(Adapter):
    family = "unet"
    label = "pixel UNet"
    classes = ("UNet2DModel",)
    subfolders = ("unet",)
    examples = "embedded:animals-unet, google/ddpm-cifar10-32"
    noise_doc = "DDPM (epsilon, or v / sample per the scheduler's prediction_type)"

    def size_multiple(self) -> int:
        return 2 ** (len(self.cfg.down_block_types) - 1) * self.model.vae_factor

    def main_blocks(self) -> list[str]:
        d = self.model.denoiser
        return ([f"down_blocks.{i}" for i in range(len(d.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(d.up_blocks))])

    def h_block(self) -> str:
        return "mid_block"

    def num_classes(self) -> int | None:
        n = getattr(self.cfg, "num_class_embeds", None)
        return int(n) - 1 if n else None  # our class-conditional UNets reserve the last id as the null class

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.model.denoiser(x, t, **cond).sample[:, : x.shape[1]]
