"""PixArt-alpha / PixArt-Sigma (``PixArtTransformer2DModel``; checkpoints saved as ``Transformer2DModel`` with
``norm_type="ada_norm_single"`` are loaded as PixArt, as diffusers remaps them): T5 prompt states with their
attention mask, micro-conditions (resolution, aspect ratio) when ``use_additional_conditions``, learned sigma."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter


class PixArtAdapter(Adapter):
    family = "pixart"
    label = "PixArt"
    classes = ("PixArtTransformer2DModel", "Transformer2DModel")
    examples = "PixArt-alpha/PixArt-XL-2-512x512, PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    noise_doc = "DDPM epsilon, learned sigma (first half of the output)"
    takes_prompts = True

    @classmethod
    def matches(cls, class_name: str, config: dict[str, Any], model_index: dict[str, Any]) -> bool:
        if class_name == "Transformer2DModel":
            return config.get("norm_type") == "ada_norm_single"
        return class_name == "PixArtTransformer2DModel"

    @classmethod
    def denoiser_class(cls, class_name: str, config: dict[str, Any]) -> str:
        return "PixArtTransformer2DModel"

    @property
    def is_sigma(self) -> bool:
        return "Sigma" in (self.model.pipeline_class or "")

    @property
    def text_max_length(self) -> int:
        return int(self.model.info.get("text_max_length") or (300 if self.is_sigma else 120))

    def reset(self) -> None:
        self._pipe = None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        m = self.model
        self._need("text_encoder", "tokenizer")
        pipe = self._pipeline("PixArtSigmaPipeline" if self.is_sigma else "PixArtAlphaPipeline",
                              tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, transformer=m.denoiser,
                              scheduler=m.scheduler)
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=m.device,
                                                clean_caption=False, max_sequence_length=self.text_max_length)
        return {"encoder_hidden_states": embeds.to(m.device, m.dtype), "encoder_attention_mask": mask.to(m.device)}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.model.denoiser, "use_additional_conditions", False):
            hh, ww = x.shape[-2] * self.model.vae_factor, x.shape[-1] * self.model.vae_factor
            added = {"resolution": torch.tensor([[hh, ww]], dtype=x.dtype, device=x.device).repeat(len(x), 1),
                     "aspect_ratio": torch.tensor([[hh / ww]], dtype=x.dtype, device=x.device).repeat(len(x), 1)}
        out = self.model.denoiser(x, encoder_hidden_states=cond["encoder_hidden_states"],
                                  encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=t,
                                  added_cond_kwargs=added).sample
        return out[:, : x.shape[1]]
