"""Sana (``SanaTransformer2DModel`` + ``AutoencoderDC``): Gemma-2 prompt states with their mask (and the pipeline's
complex human instruction), patch 1 tokens, flow matching (FlowMatchEuler shift, or DPM-Solver ``flow_shift``),
timestep scaled by ``timestep_scale``; the DC autoencoder has no ``latent_dist`` (``encode().latent``)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .base import Adapter


class SanaAdapter(Adapter):
    family = "sana"
    label = "Sana"
    classes = ("SanaTransformer2DModel",)
    examples = "Efficient-Large-Model/Sana_600M_512px_diffusers, Sana_1600M_1024px_diffusers"
    noise_doc = "flow matching, static shift (flow_shift / shift)"
    takes_prompts = True
    sampler = "flow"

    @property
    def text_max_length(self) -> int:
        return int(self.model.info.get("text_max_length") or 300)

    def reset(self) -> None:
        self._pipe = None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        import diffusers

        m = self.model
        self._need("text_encoder", "tokenizer")
        pipe = self._pipeline("SanaPipeline", tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae,
                              transformer=m.denoiser, scheduler=m.scheduler)
        chi = m.info.get("complex_human_instruction", "default")
        if chi == "default":  # what SanaPipeline.__call__ uses unless told otherwise
            chi = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=m.device,
                                                clean_caption=False, max_sequence_length=self.text_max_length,
                                                complex_human_instruction=chi)
        return {"encoder_hidden_states": embeds.to(m.device, m.dtype), "encoder_attention_mask": mask.to(m.device)}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        scale = float(getattr(self.cfg, "timestep_scale", 1.0) or 1.0)
        kw = {"guidance": cond["guidance"]} if "guidance" in cond else {}
        return self.model.denoiser(x, encoder_hidden_states=cond["encoder_hidden_states"],
                                   encoder_attention_mask=cond.get("encoder_attention_mask"),
                                   timestep=(t * scale).to(x.dtype), **kw).sample[:, : x.shape[1]]
