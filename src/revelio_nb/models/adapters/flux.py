"""FLUX.1 (``FluxTransformer2DModel``): latents packed 2x2 into tokens of 4C channels (row-major), ``img_ids`` /
``txt_ids`` rotary positions, CLIP pooled + T5 prompt states, the guidance embedding of FLUX-dev
(``guidance_embeds``), timestep = sigma (the model multiplies by 1000), flow matching with the scheduler's
(resolution-dependent) shift. Double-stream blocks and single-stream blocks both return
``(encoder_hidden_states, hidden_states)`` in the pinned diffusers; a single block that returns the concatenated
``[text; image]`` sequence (older diffusers) is cut to its image part."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter
from .sd3 import JointStreamMixin

FLUX_DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, row-major (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latent size (h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary ids (0, row, col) of the packed (h/2, w/2) token grid (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(JointStreamMixin, Adapter):
    family = "flux"
    label = "FLUX.1"
    classes = ("FluxTransformer2DModel",)
    examples = "black-forest-labs/FLUX.1-schnell, black-forest-labs/FLUX.1-dev"
    noise_doc = "flow matching, resolution-dependent shift (dev) or none (schnell)"
    takes_prompts = True
    sampler = "flow"

    def latent_channels(self) -> int:
        return int(self.cfg.in_channels) // 4

    def patch_size(self) -> int:
        return 2  # the 2x2 packing

    @property
    def text_max_length(self) -> int:
        return int(self.model.info.get("text_max_length") or (512 if self.cfg.guidance_embeds else 256))

    def main_blocks(self) -> list[str]:
        d = self.model.denoiser
        return ([f"transformer_blocks.{i}" for i in range(len(d.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(d.single_transformer_blocks))])

    def native_image_size(self) -> int:
        return 1024 if self.model.vae is not None else 64

    def flow_sigmas(self, steps: int):
        import numpy as np

        return np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's grid

    def reset(self) -> None:
        self._pipe = None

    def image_stream(self, block: str, module: torch.nn.Module, output: Any) -> torch.Tensor | None:
        if type(module).__name__ == "FluxSingleTransformerBlock" and torch.is_tensor(output):
            return output[:, -self._n_image:]  # older diffusers: [text; image] concatenated
        return super().image_stream(block, module, output)

    def guidance_cond(self, batch_size: int, guidance: float | None) -> dict[str, torch.Tensor]:
        if not self.cfg.guidance_embeds:
            return {}
        g = FLUX_DEV_GUIDANCE if guidance is None else float(guidance)
        return {"guidance": torch.full((batch_size,), g, dtype=torch.float32, device=self.model.device)}

    @property
    def default_guidance(self) -> float:  # type: ignore[override]
        return FLUX_DEV_GUIDANCE if self.cfg.guidance_embeds else 1.0

    def uses_cfg(self) -> bool:
        return not self.cfg.guidance_embeds  # FLUX-dev: guidance is an input, not a second pass

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        m = self.model
        self._need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        pipe = self._pipeline("FluxPipeline", scheduler=m.scheduler, vae=m.vae, text_encoder=m.text_encoder,
                              tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2,
                              transformer=m.denoiser)
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=m.device, max_sequence_length=self.text_max_length)
        return {"encoder_hidden_states": embeds.to(m.device, m.dtype), "pooled_projections": pooled.to(m.device, m.dtype)}

    _n_image = 0

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        h, w = x.shape[-2:]
        self._n_image = (h // 2) * (w // 2)
        txt = cond["encoder_hidden_states"]
        out = self.model.denoiser(
            hidden_states=pack(x), encoder_hidden_states=txt, pooled_projections=cond["pooled_projections"],
            timestep=(t / 1000).to(x.dtype), guidance=cond.get("guidance"),
            img_ids=image_ids(h, w, x.device, x.dtype), txt_ids=torch.zeros(txt.shape[1], 3, device=x.device, dtype=x.dtype),
        ).sample
        return unpack(out, h, w)
