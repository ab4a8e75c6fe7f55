"""``UNet2DConditionModel``: Stable Diffusion 1.x / 2.x (epsilon and v-prediction), SDXL (second text encoder and
added conditions), latent consistency models (``time_cond_proj_dim``: the guidance embedding ``timestep_cond``,
sampled with the LCM step and no CFG batch) and the embedded text model (MiniLM)."""

from __future__ import annotations

from typing import Any

import torch

from .unet import UNetAdapter

LCM_DEFAULT_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's default guidance_scale (w = 7.5)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The LCM guidance embedding of w (as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``)."""
    w = w.reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class UNetCondAdapter(UNetAdapter):
    family = "unet_cond"
    label = "Stable Diffusion UNet"
    classes = ("UNet2DConditionModel",)
    examples = ("SD 1.5, SD 2.1 (768, v), SDXL base / Turbo, LCM-Dreamshaper-v7, embedded:animals-unet-text")
    noise_doc = "DDPM epsilon or v (scheduler prediction_type); LCM: LCMScheduler with timestep_cond"
    takes_prompts = True

    @property
    def is_lcm(self) -> bool:
        return bool(getattr(self.cfg, "time_cond_proj_dim", None)) or type(self.model.scheduler).__name__ == "LCMScheduler"

    @property
    def sampler(self) -> str:  # type: ignore[override]
        return "lcm" if self.is_lcm else "ddim"

    @property
    def default_guidance(self) -> float:  # type: ignore[override]
        if not getattr(self.cfg, "time_cond_proj_dim", None):
            return 1.0
        own = self.model.info.get("default_guidance")  # an embedded LCM's own (its distillation's w range)
        return float(own) if own is not None else LCM_DEFAULT_GUIDANCE

    def uses_cfg(self) -> bool:
        return not self.is_lcm

    def num_classes(self) -> int | None:
        return None

    def guidance_cond(self, batch_size: int, guidance: float | None) -> dict[str, torch.Tensor]:
        dim = getattr(self.cfg, "time_cond_proj_dim", None)
        if not dim:
            return {}
        g = self.default_guidance if guidance is None else float(guidance)
        w = torch.full((batch_size,), g - 1.0)
        return {"timestep_cond": guidance_scale_embedding(w, int(dim)).to(self.model.device, self.model.dtype)}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        m = self.model
        self._need("text_encoder", "tokenizer")

        def run(tok, enc, use_penultimate):
            max_len = min(getattr(tok, "model_max_length", 77) or 77, 77)
            if m.info.get("text_max_length"):
                max_len = int(m.info["text_max_length"])
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
            dev = next(enc.parameters()).device
            out = enc(ids.input_ids.to(dev), output_hidden_states=use_penultimate)
            hidden = out.hidden_states[-2] if use_penultimate else out[0]
            return hidden, out

        if m.text_encoder_2 is None:
            hidden, _ = run(m.tokenizer, m.text_encoder, False)
            return {"encoder_hidden_states": hidden.to(m.device, m.dtype)}
        # SDXL: penultimate states of both encoders, pooled projection of the second, size/crop ids.
        h1, _ = run(m.tokenizer, m.text_encoder, True)
        h2, out2 = run(m.tokenizer_2, m.text_encoder_2, True)
        size = self.native_image_size()
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=m.device, dtype=m.dtype)
        return {
            "encoder_hidden_states": torch.cat([h1, h2.to(h1.device)], dim=-1).to(m.device, m.dtype),
            "added_cond_kwargs": {"text_embeds": out2[0].to(m.device, m.dtype),
                                  "time_ids": time_ids.repeat(len(prompts), 1)},
        }

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        if getattr(self.cfg, "time_cond_proj_dim", None) and "timestep_cond" not in cond:
            cond = {**cond, **self.guidance_cond(x.shape[0], None)}  # never run an LCM off-distribution
        return self.model.denoiser(x, t, **cond).sample[:, : x.shape[1]]

