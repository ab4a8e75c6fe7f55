"""The package's one sampler loop, with a per-family step, for any :class:`~revelio_nb.models.DiffusionModel`.

* **DDIM** (``"ddim"``: pixel / SD UNets, DiT, PixArt): epsilon or v prediction, as the scheduler says;
* **flow-matching Euler** (``"flow"``: SD3, FLUX.1, Sana): the scheduler's shift (static, or from the image's
  token count for resolution-dependent shifting);
* **LCM** (``"lcm"``: UNets with ``time_cond_proj_dim`` / an LCMScheduler): every step predicts x0 and re-noises it
  with fresh seeded noise; the guidance is the model's ``timestep_cond`` embedding of w = guidance - 1, with **no**
  classifier-free-guidance batch; 2-8 steps.

:func:`denoise_loop` is the loop (hooks stay registered by the caller; ``step_callback`` runs before every
denoiser call); :func:`sample` and :func:`revelio_nb.directions.generate` are built on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # sampling needs no import of the models package: models.embedded uses sampling, not the reverse
    from .models import DiffusionModel

SAMPLERS = ("ddim", "flow", "lcm")


class Sampler:
    """The timesteps and the step of one family's sampler, for ``steps`` steps at one latent size."""

    def __init__(self, model: DiffusionModel, steps: int, *, eta: float = 0.0, generator: torch.Generator | None = None,
                 latent_hw: tuple[int, int] | None = None, noise_fn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
                 kind: str | None = None):
        if not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.kind = kind or model.adapter.sampler
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler {self.kind!r} is not one of {list(SAMPLERS)}")
        self.model, self.eta, self.generator = model, float(eta), generator
        self.noise_fn = noise_fn
        if self.kind == "ddim":
            from diffusers import DDIMScheduler

            self.scheduler = DDIMScheduler.from_config(model.scheduler.config, clip_sample=model.vae is None,
                                                       set_alpha_to_one=True)
            self.scheduler.set_timesteps(steps)
        elif self.kind == "lcm":
            from diffusers import LCMScheduler

            self.scheduler = LCMScheduler.from_config(model.scheduler.config)
            self.scheduler.set_timesteps(steps)
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            noise = model.noise
            if type(model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
                self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
            else:  # e.g. Sana's DPM-Solver with flow sigmas: Euler with the same shift
                self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=noise.num_train_timesteps,
                                                                 shift=noise.shift)
            kw: dict[str, Any] = {}
            sigmas = model.adapter.flow_sigmas(steps)  # the family pipeline's own sigma grid (FLUX), else default
            if sigmas is not None:
                kw["sigmas"] = sigmas
            if noise.dynamic:
                if latent_hw is None:
                    raise ValueError("a resolution-shifted flow sampler needs the latent size")
                kw["mu"] = noise.mu(model.seq_len(tuple(latent_hw)))
            self.scheduler.set_timesteps(None if sigmas is not None else steps, **kw)
        self.timesteps = self.scheduler.timesteps
        self._denoised: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_t(self, i: int) -> int | float:
        """The model timestep of step i (DDPM-style: an integer on the training scale; flow: sigma * N)."""
        t = self.timesteps[i]
        return float(t) if self.kind == "flow" else int(t)

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.noise_fn is not None:
            z = self.noise_fn(shape)
        else:
            z = torch.randn(shape, generator=self.generator)
        return z.to(like.device, like.dtype)

    def step(self, pred: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[i]
        if self.kind == "ddim":
            return self.scheduler.step(pred, t, x, eta=self.eta, generator=self.generator).prev_sample
        if self.kind == "flow":
            return self.scheduler.step(pred.to(x.dtype), t, x).prev_sample.to(x.dtype)
        # LCM: the scheduler's own x0 (boundary-condition scalings), then re-noise with our seeded noise
        sched = self.scheduler
        _, denoised = sched.step(pred, t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
        self._denoised = denoised
        if i == len(self) - 1:
            return denoised
        prev_t = int(self.timesteps[i + 1])
        abar = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        abar = abar.to(torch.float32)
        noise = self._noise(tuple(pred.shape), denoised)
        return (abar.sqrt() * denoised.float() + (1 - abar).sqrt() * noise.float()).to(x.dtype)


def denoise_loop(
    model: DiffusionModel,
    x: torch.Tensor,
    steps: int,
    predict: Callable[[int, int | float, torch.Tensor], torch.Tensor],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    step_callback: Callable[[int, Any, torch.Tensor], None] | None = None,
    on_step: Callable[[int, Any, torch.Tensor], None] | None = None,
    progress: bool = False,
    desc: str = "sample",
) -> torch.Tensor:
    """Run the family's sampler from x (the start noise) and return the final latents.

    ``predict(i, model_t, x)`` returns the model's prediction at step i (guidance, hooks and extra passes are
    the caller's); ``step_callback(i, model_t, x_t)`` runs before it, ``on_step(i, model_t, x_next)`` after the step.
    """
    sampler = Sampler(model, steps, eta=eta, generator=generator, latent_hw=tuple(x.shape[-2:]), noise_fn=noise_fn)
    for i in tqdm(range(len(sampler)), desc=desc, disable=not progress, leave=False):
        t = sampler.model_t(i)
        if step_callback is not None:
            step_callback(i, t, x)
        x = sampler.step(predict(i, t, x), i, x)
        if on_step is not None:
            on_step(i, t, x)
    return x


@torch.no_grad()
def sample(
    model: DiffusionModel,
    n: int,
    *,
    prompts: list[str] | str | None = None,
    class_labels: list[int] | int | None = None,
    steps: int = 50,
    guidance_scale: float | None = None,
    seed: int = 0,
    image_size: int | None = None,
    eta: float = 0.0,
    step_callback: Callable[[int, Any, torch.Tensor], None] | None = None,
    progress: bool = False,
    decode: bool = True,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1] (n, C, H, W) with the model family's sampler.

    ``guidance_scale`` (None: the family's default, 1.0 = none for DDIM / flow models, 8.5 for LCMs, 3.5 for
    FLUX-dev): > 1 mixes conditional and neutral predictions (classifier-free guidance), except for models that
    take guidance as an input (LCM ``timestep_cond``, FLUX-dev ``guidance``), which get it there with no second
    pass. ``step_callback(i, t, x_t)`` runs before every denoiser call (e.g. to record which step a hook saw).
    ``decode=False`` returns the final latents; ``latents`` replaces the seeded start noise.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if n <= 0:
        raise ValueError(f"n (the number of images) must be a positive integer, got {n}")
    size = model.check_image_size(model.native_image_size if image_size is None else image_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(model.latent_shape(n, size), generator=g) if latents is None else latents.float().cpu()
    x = x.to(model.device, model.dtype)
    scale = model.adapter.default_guidance if guidance_scale is None else float(guidance_scale)
    cond = model.conditioning(n, prompts=prompts, class_labels=class_labels, guidance=scale)
    guided = model.adapter.uses_cfg() and scale != 1.0 and (prompts is not None or class_labels is not None)
    neutral = model.conditioning(n, guidance=scale) if guided else None

    def predict(i: int, t, x_t: torch.Tensor) -> torch.Tensor:
        pred = model.predict(x_t, t, cond)
        if guided:
            pred_u = model.predict(x_t, t, neutral)
            pred = pred_u + scale * (pred - pred_u)
        return pred

    x = denoise_loop(model, x, steps, predict, eta=eta, generator=g, step_callback=step_callback, progress=progress)
    return model.decode_latents(x).float().cpu() if decode else x.float().cpu()


def to_uint8(images: torch.Tensor) -> "Any":
    """[-1, 1] (N, C, H, W) -> uint8 numpy (N, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
