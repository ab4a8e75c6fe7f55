"""Few-step DDIM sampling with optional classifier-free guidance, for any :class:`~revelio_nb.models.DiffusionModel`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .models import DiffusionModel


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    *,
    prompts: list[str] | str | None = None,
    class_labels: list[int] | int | None = None,
    steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    image_size: int | None = None,
    eta: float = 0.0,
    step_callback: Callable[[int, int, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1] (n, C, H, W) with DDIM.

    ``guidance_scale`` > 1 mixes conditional and neutral predictions (classifier-free guidance).
    ``step_callback(i, t, x_t)`` runs before every denoiser call (e.g. to record which step a hook saw).
    """
    from diffusers import DDIMScheduler

    if steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if n <= 0:
        raise ValueError(f"n (the number of images) must be a positive integer, got {n}")
    size = model.check_image_size(model.native_image_size if image_size is None else image_size)
    sched = DDIMScheduler.from_config(model.scheduler.config, clip_sample=model.vae is None, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    c = model.denoiser.config.in_channels
    x = torch.randn((n, c, size // model.vae_factor, size // model.vae_factor), generator=g).to(model.device, model.dtype)
    cond = model.conditioning(n, prompts=prompts, class_labels=class_labels)
    guided = guidance_scale != 1.0 and (prompts is not None or class_labels is not None)
    neutral = model.conditioning(n) if guided else None
    for i, t in enumerate(tqdm(sched.timesteps, desc="sample", disable=not progress, leave=False)):
        if step_callback is not None:
            step_callback(i, int(t), x)
        eps = model.denoise(x, int(t), cond)
        if guided:
            eps_u = model.denoise(x, int(t), neutral)
            eps = eps_u + guidance_scale * (eps - eps_u)
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    return model.decode_latents(x).float().cpu()


def to_uint8(images: torch.Tensor) -> "Any":
    """[-1, 1] (N, C, H, W) -> uint8 numpy (N, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
