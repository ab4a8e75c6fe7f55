"""Class-conditional ``DiTTransformer2DModel`` (DiT-XL/2-256, -512; the embedded DiT): patchified tokens, learned
sigma (the first half of the output channels is the noise prediction), null class = ``num_embeds_ada_norm``."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter


class DiTAdapter(Adapter):
    family = "dit"
    label = "DiT"
    classes = ("DiTTransformer2DModel", "Transformer2DModel")
    examples = "facebook/DiT-XL-2-256, facebook/DiT-XL-2-512, embedded:animals-dit"
    noise_doc = "DDPM epsilon, learned sigma (first half of the output)"
    fixed_size = True

    @classmethod
    def matches(cls, class_name: str, config: dict[str, Any], model_index: dict[str, Any]) -> bool:
        if class_name == "Transformer2DModel":  # DiT checkpoints; PixArt ones (ada_norm_single) go to PixArt
            return config.get("norm_type") == "ada_norm_zero" or (
                config.get("num_embeds_ada_norm") is not None and config.get("norm_type") != "ada_norm_single")
        return class_name in cls.classes

    @classmethod
    def denoiser_class(cls, class_name: str, config: dict[str, Any]) -> str:
        return "DiTTransformer2DModel"

    def num_classes(self) -> int | None:
        return int(self.cfg.num_embeds_ada_norm)

    def null_class(self) -> int | None:
        if (self.model.info.get("spec") or {}).get("conditioning") == "none":
            return 0  # unconditional embedded DiT: trained with label 0 (its CFG-dropout row saw only ~10 % of steps)
        return self.num_classes()

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.model.denoiser(x, timestep=t, class_labels=cond["class_labels"]).sample[:, : x.shape[1]]
