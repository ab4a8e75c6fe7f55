"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint (MMDiT) blocks that return
``(encoder_hidden_states, hidden_states)`` (text first; the last block ``(None, hidden_states)``), CLIP-L + CLIP-G
(+ T5) prompt states and pooled projections, flow matching with a static shift."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, first_tensor

JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


class JointStreamMixin:
    """Blocks whose output holds a text stream beside the image stream (MMDiT)."""

    def _stream_index(self, block: str, module: torch.nn.Module, output: Any) -> int | None:
        name = type(module).__name__
        if name in JOINT_BLOCKS:
            if not (isinstance(output, tuple) and len(output) == 2 and torch.is_tensor(output[1])):
                raise TypeError(
                    f"block {block!r} ({name}) returned {type(output).__name__} "
                    f"{[type(o).__name__ for o in output] if isinstance(output, tuple) else ''}; this diffusers version "
                    "changed the joint-block output format (pinned: (encoder_hidden_states, hidden_states))")
            return 1
        if "context" in block.split(".")[-1] or block.split(".")[-1] in ("context_embedder", "time_text_embed"):
            raise ValueError(f"block {block!r} works on the text stream / conditioning, not on the image stream")
        if isinstance(output, tuple) and "Attention" in name:
            return 0  # diffusers' joint attention processors return (hidden_states, encoder_hidden_states)
        return None

    def image_stream(self, block: str, module: torch.nn.Module, output: Any) -> torch.Tensor | None:
        i = self._stream_index(block, module, output)
        if i is not None:
            return output[i]
        if isinstance(output, tuple):
            raise ValueError(f"block {block!r} ({type(module).__name__}) returns a tuple whose image stream is not "
                             "known; hook a transformer block or one of its attention modules")
        return first_tensor(output)

    def with_image_stream(self, block: str, module: torch.nn.Module, output: Any, new: torch.Tensor) -> Any:
        i = self._stream_index(block, module, output)
        if i is None:
            return super().with_image_stream(block, module, output, new)  # type: ignore[misc]
        out = list(output)
        out[i] = new
        return tuple(out)


class SD3Adapter(JointStreamMixin, Adapter):
    family = "sd3"
    label = "SD3"
    classes = ("SD3Transformer2DModel",)
    examples = "stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-medium / -large"
    noise_doc = "flow matching, static shift (scheduler shift, 3.0)"
    takes_prompts = True
    sampler = "flow"

    def max_image_size(self) -> int | None:
        top = getattr(self.cfg, "pos_embed_max_size", None)
        return int(top) * self.patch_size() * self.model.vae_factor if top else None

    @property
    def text_max_length(self) -> int:
        return int(self.model.info.get("text_max_length") or 256)

    def reset(self) -> None:
        self._pipe = None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        m = self.model
        self._need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        pipe = self._pipeline("StableDiffusion3Pipeline", transformer=m.denoiser, scheduler=m.scheduler, vae=m.vae,
                              text_encoder=m.text_encoder, tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2,
                              tokenizer_2=m.tokenizer_2, text_encoder_3=m.text_encoder_3, tokenizer_3=m.tokenizer_3)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=m.device, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.text_max_length)
        return {"encoder_hidden_states": embeds.to(m.device, m.dtype), "pooled_projections": pooled.to(m.device, m.dtype)}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.model.denoiser(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                                   pooled_projections=cond["pooled_projections"], timestep=t.to(x.dtype)).sample
