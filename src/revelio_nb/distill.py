"""Latent consistency distillation (LCD, Luo et al. 2023, "Latent Consistency Models") of a text-conditioned
epsilon-prediction UNet on CPU: the few-step LCM sampler of Decoding Diffusion for the embedded text model.

Written after diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` (our own code):

* **student** = the teacher's ``UNet2DConditionModel`` with a guidance-scale embedding (``time_cond_proj_dim``,
  the ``timestep_cond`` input of LCMs) added, initialised from the teacher; the new projection starts at zero, so
  the untrained student *is* the teacher (:func:`make_student`);
* **skipping-step DDIM solver**: the 1000 training timesteps are thinned to ``num_ddim_timesteps`` (default 50:
  t = 19, 39, ..., 999, the LCMScheduler's ``original_inference_steps`` grid); a start timestep t_{n+k} is drawn
  from it, the image noised there, and one DDIM step of the teacher's **classifier-free-guided** prediction
  (x0 and eps mixed with w, drawn uniformly in [w_min, w_max]) goes to t_n = t_{n+k} - 1000 / num_ddim_timesteps;
* **EMA target**: the consistency target is the EMA copy of the student (``ema_decay``, 0.95 as the script) run
  at (x_{t_n}, t_n); both sides use the **boundary-condition parameterisation**
  f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 +
  s^2), s = 0.5 (the LCMScheduler's own scalings, so the sampler reads the student exactly as it was trained);
* pseudo-Huber loss (c = ``huber_c``) weighted by min(1, sqrt(SNR)) (pixel space: x0 = (x - sqrt(1 - a) eps) /
  sqrt(a) amplifies errors a thousandfold near t = 999; x0 is clamped to [-1, 1] as the sampler does), a share ``cond_dropout`` of empty prompts (the student keeps a neutral
  prediction: Decoding Diffusion reads h in a neutral pass).

Deterministic and resumable exactly as :mod:`revelio_nb.training`: every step's batch, timesteps, guidance and
noise come from a generator seeded by (seed, step), and the whole state (student, EMA target, optimizer, losses)
is ONE ``checkpoint.safetensors`` written by :func:`revelio_nb.training._save_checkpoint` (same format, same commit
point), so a killed run resumes to the weights of an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .paths import remove_stale_temporaries
from .training import CHECKPOINT, TrainState, _load_checkpoint, _step_generator, step_and_record

SIGMA_DATA = 0.5  # LCMScheduler / LCD boundary-condition constants
TIMESTEP_SCALING = 10.0


@dataclass
class DistillConfig:
    """How a consistency student is distilled from its teacher (part of the embedded model's cache key)."""

    steps: int = 80  # embedded text UNet (32 px), batch 24: ~6.8 CPU-s per step, ~5-6 min on 2 idle cores
    batch_size: int = 24
    lr: float = 2e-4
    warmup_steps: int = 8
    num_ddim_timesteps: int = 50  # the skipping-step solver's grid (= LCMScheduler original_inference_steps)
    w_min: float = 0.0  # guidance w of the teacher's CFG (guidance scale = 1 + w), drawn uniformly per image
    w_max: float = 3.0
    time_cond_proj_dim: int = 256  # guidance-embedding width (LCM-SD: 256)
    ema_decay: float = 0.95  # EMA target (the LCD script's default)
    huber_c: float = 0.001
    cond_dropout: float = 0.1  # empty prompts (the teacher's CFG then returns its neutral prediction)
    grad_clip: float = 1.0
    clip_x0: float | None = 1.0  # pixel models: x0 predictions clamped to [-1, 1] (the samplers' clip_sample); None
    # for latent models
    checkpoint_every: int = 50
    seed: int = 0
    num_threads: int = 0  # 0 = leave torch's default

    def validate(self) -> "DistillConfig":
        for name in ("steps", "batch_size", "num_ddim_timesteps", "time_cond_proj_dim", "checkpoint_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DistillConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        return self


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency boundary condition at integer timesteps t (f(x, 0) = x)."""
    s = timestep_scaling * t.float()
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2).sqrt()


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The solver's timesteps t_1..t_N (ascending): (1..N) * (T // N) - 1, as the LCMScheduler's origin grid."""
    ratio = num_train_timesteps // num_ddim_timesteps
    return torch.from_numpy((np.arange(1, num_ddim_timesteps + 1) * ratio).round().astype(np.int64) - 1)


def make_student(teacher: nn.Module, time_cond_proj_dim: int) -> nn.Module:
    """The teacher's UNet2DConditionModel with a guidance embedding (``time_cond_proj_dim``) added, every shared
    weight copied from the teacher and the new projection zero: before distillation it predicts what the teacher
    does, at any guidance."""
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher, UNet2DConditionModel):
        raise TypeError(f"consistency distillation needs a UNet2DConditionModel teacher, got {type(teacher).__name__}")
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = int(time_cond_proj_dim)
    student = UNet2DConditionModel(**config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise RuntimeError(f"student and teacher differ beyond the guidance embedding: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def _lr_at(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _x0(eps: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, clip: float | None = None,
        straight_through: bool = False) -> torch.Tensor:
    """x0 from an epsilon prediction; ``clip``: clamped to [-clip, clip] as the samplers do in pixel space (near
    t = 999 the 1/sqrt(alpha-bar) factor is in the thousands); ``straight_through``: the clamp's gradient is taken
    as 1 (the student's value is exactly what the LCMScheduler computes, and an out-of-range x0 still learns)."""
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    if clip is None:
        return x0
    c = x0.clamp(-clip, clip)
    return x0 + (c - x0).detach() if straight_through else c


def distill_lcm(
    teacher: nn.Module,
    student: nn.Module,
    target: nn.Module,
    images: torch.Tensor,
    conds: torch.Tensor,
    null_cond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    cfg: DistillConfig,
    work_dir: str | Path,
    desc: str = "distill LCM",
) -> TrainState:
    """Latent consistency distillation of ``student`` (EMA copy: ``target``) from the frozen epsilon-prediction
    ``teacher`` on ``images`` (N, C, H, W in [-1, 1]) with one caption embedding per image in ``conds``
    (N, L, D) and the empty caption's ``null_cond`` (L, D). See the module docstring; resumes from
    ``work_dir/checkpoint.safetensors``. Returns the state (per-step losses, seconds)."""
    from .models.adapters.unet_cond import guidance_scale_embedding  # lazy: models.embedded_specs imports this module

    cfg.validate()
    work_dir = Path(work_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    teacher.eval().requires_grad_(False)
    target.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    remove_stale_temporaries(work_dir / CHECKPOINT)
    state = _load_checkpoint(work_dir, student, target, opt) or TrainState()
    abar_all = alphas_cumprod.float()
    grid = ddim_grid(len(abar_all), cfg.num_ddim_timesteps)
    skip = len(abar_all) // cfg.num_ddim_timesteps
    dim = int(cfg.time_cond_proj_dim)
    n, b = len(images), cfg.batch_size
    student.train()
    target.eval()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step")
    t_start = time.time() - state.seconds
    while state.step < cfg.steps:
        g = _step_generator(cfg.seed, state.step)
        idx = torch.randint(0, n, (b,), generator=g)
        k = torch.randint(0, cfg.num_ddim_timesteps, (b,), generator=g)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(b, generator=g) < cfg.cond_dropout
        cond = conds[idx].clone()
        if drop.any():
            cond[drop] = null_cond.to(cond.dtype)
        t_start_ = grid[k]
        t_prev = (t_start_ - skip).clamp(min=0)
        a_s, a_p = abar_all[t_start_].view(-1, 1, 1, 1), abar_all[t_prev].view(-1, 1, 1, 1)
        cs_s, co_s = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t_start_))
        cs_p, co_p = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t_prev))
        w_emb = guidance_scale_embedding(w, dim)
        wv = w.view(-1, 1, 1, 1)
        x_t = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise

        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, state.step)
        eps_s = student(x_t, t_start_, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        pred = cs_s * x_t + co_s * _x0(eps_s, x_t, a_s, cfg.clip_x0, straight_through=True)
        with torch.no_grad():
            uncond = null_cond.to(cond.dtype).expand_as(cond)
            eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t_start_, t_start_]),
                                   encoder_hidden_states=torch.cat([cond, uncond])).sample.chunk(2)
            x0_c, x0_u = _x0(eps_c, x_t, a_s), _x0(eps_u, x_t, a_s)
            x0_g = x0_c + wv * (x0_c - x0_u)
            if cfg.clip_x0 is not None:  # as DDIMScheduler(clip_sample=True): clamp x0, re-derive eps from it
                x0_g = x0_g.clamp(-cfg.clip_x0, cfg.clip_x0)
                eps_g = (x_t - a_s.sqrt() * x0_g) / (1 - a_s).sqrt()
            else:
                eps_g = eps_c + wv * (eps_c - eps_u)
            x_prev = a_p.sqrt() * x0_g + (1 - a_p).sqrt() * eps_g  # one skipping-step DDIM step
            eps_tg = target(x_prev, t_prev, encoder_hidden_states=cond, timestep_cond=w_emb).sample
            tgt = cs_p * x_prev + co_p * _x0(eps_tg, x_prev, a_p, cfg.clip_x0)
        # pseudo-Huber per pixel, weighted by min(1, sqrt(SNR(t_start))): the error measured in epsilon units, so
        # the 1/sqrt(alpha-bar) amplification near t = 999 does not swamp the gradient of every other timestep
        weight = (a_s / (1 - a_s)).sqrt().clamp(max=1.0)
        loss = (weight * (((pred.float() - tgt.float()) ** 2 + cfg.huber_c**2).sqrt() - cfg.huber_c)).mean()
        step_and_record(loss, student, target, opt, state, cfg.grad_clip, cfg.ema_decay, t_start, bar, work_dir,
                        cfg.checkpoint_every, cfg.steps, desc, log_every=10)
    bar.close()
    student.eval()
    target.eval()
    return state


def distill_from_teacher(teacher: nn.Module, images: torch.Tensor, conds: torch.Tensor, null_cond: torch.Tensor,
                         alphas_cumprod: torch.Tensor, cfg: DistillConfig, work_dir: str | Path,
                         desc: str = "distill LCM") -> tuple[nn.Module, TrainState]:
    """Build the student (seeded by ``cfg.seed``) and its EMA target from ``teacher``, distill, and return the EMA
    target (the consistency model that is saved and sampled) with the training state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        student = make_student(teacher, cfg.time_cond_proj_dim)
    target = copy.deepcopy(student)
    state = distill_lcm(teacher, student, target, images, conds, null_cond, alphas_cumprod, cfg, work_dir, desc=desc)
    return target, state


def lcm_scheduler(ddpm_scheduler, cfg: DistillConfig):
    """The LCMScheduler of a student distilled from a teacher with ``ddpm_scheduler``'s noise schedule (its
    ``original_inference_steps`` = the solver grid, the boundary scalings of :func:`boundary_scalings`)."""
    from diffusers import LCMScheduler

    c = ddpm_scheduler.config
    return LCMScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                        beta_schedule=c.beta_schedule, original_inference_steps=cfg.num_ddim_timesteps,
                        clip_sample=cfg.clip_x0 is not None, clip_sample_range=cfg.clip_x0 or 1.0,
                        set_alpha_to_one=True, timestep_scaling=TIMESTEP_SCALING,
                        prediction_type="epsilon")
