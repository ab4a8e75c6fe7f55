"""The noise level of a user timestep, per noise convention.

Users name timesteps on the 0..N-1 training scale (``t=25`` as in the Revelio paper) for every family. A
:class:`DDPMNoise` maps t to the model's alpha-bar (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps); a :class:`FlowNoise`
maps t to the flow-matching sigma of the model's scheduler, shift included (x_t = (1 - sigma) x0 + sigma eps):
the unshifted sigma of training index t is (t + 1) / N, exactly the table ``FlowMatchEulerDiscreteScheduler``
builds at construction (index i <-> timestep N - i), then shifted statically (SD3, Sana: s sig / (1 + (s - 1) sig))
or by the image's token count (FLUX-dev style ``use_dynamic_shifting``: sig' = e^mu / (e^mu + 1/sig - 1), mu linear
in the token count). ``model_timestep`` is what the denoiser is called with (DDPM: t itself; flow: sigma * N).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from .errors import ModelLoadError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _config(scheduler: Any) -> dict[str, Any]:
    cfg = getattr(scheduler, "config", scheduler)
    return dict(cfg) if cfg is not None else {}


class DDPMNoise:
    """DDPM / DDIM / LCM schedules: alpha-bar from the scheduler's betas."""

    convention = "ddpm"

    def __init__(self, scheduler: Any):
        from diffusers import DDPMScheduler

        cfg = {k: v for k, v in _config(scheduler).items() if not k.startswith("_")}
        keep = set(inspect.signature(DDPMScheduler.__init__).parameters)
        self.scheduler = DDPMScheduler.from_config({k: v for k, v in cfg.items() if k in keep})
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float32)
        self.prediction_type = str(cfg.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelLoadError(f"prediction_type {self.prediction_type!r} of a DDPM-style scheduler is not one of "
                                 "['epsilon', 'v_prediction', 'sample']")

    def model_timestep(self, t: int, seq_len: int | None = None) -> float:
        return int(t)

    def record(self, t: int, seq_len: int | None = None) -> dict[str, Any]:
        return {"t": int(t), "convention": self.convention, "alpha_bar": float(self.alphas_cumprod[int(t)]),
                "model_timestep": int(t), "prediction_type": self.prediction_type}

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
                  seq_len: int | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x0.device)
        t = t.expand(x0.shape[0]) if t.ndim == 0 else t
        abar = self.alphas_cumprod.to(x0.device)[t.long()].view(-1, *([1] * (x0.ndim - 1)))
        return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def calculate_shift(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of FLUX-style resolution-dependent shifting (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


class FlowNoise:
    """Flow matching (SD3, FLUX, Sana): x_t = (1 - sigma) x0 + sigma eps; the model predicts eps - x0."""

    convention = "flow"
    prediction_type = "flow"

    def __init__(self, scheduler: Any):
        cfg = _config(scheduler)
        self.config = cfg
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("use_flow_sigmas"):  # DPM-Solver with flow sigmas (Sana's own scheduler)
            self.shift, self.dynamic = float(cfg.get("flow_shift") or 1.0), False
        else:
            self.shift = float(cfg.get("shift", 1.0))
            self.dynamic = bool(cfg.get("use_dynamic_shifting", False))
        if self.dynamic and cfg.get("time_shift_type", "exponential") != "exponential":
            raise ModelLoadError(f"time_shift_type {cfg.get('time_shift_type')!r} is not supported; only 'exponential'")
        self.base_seq_len = int(cfg.get("base_image_seq_len", 256))
        self.max_seq_len = int(cfg.get("max_image_seq_len", 4096))
        self.base_shift = float(cfg.get("base_shift", 0.5))
        self.max_shift = float(cfg.get("max_shift", 1.15))

    def mu(self, seq_len: int) -> float:
        return calculate_shift(int(seq_len), self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def sigma(self, t: int, seq_len: int | None = None) -> float:
        s = (int(t) + 1) / self.num_train_timesteps
        if self.dynamic:
            if seq_len is None:
                raise ValueError("this flow model shifts sigma by resolution: the image token count is needed")
            e = math.exp(self.mu(seq_len))
            return e / (e + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def model_timestep(self, t: int, seq_len: int | None = None) -> float:
        return self.sigma(t, seq_len) * self.num_train_timesteps

    def record(self, t: int, seq_len: int | None = None) -> dict[str, Any]:
        sig = self.sigma(t, seq_len)
        return {"t": int(t), "convention": self.convention, "sigma": sig, "model_timestep": sig * self.num_train_timesteps,
                "shift": "dynamic" if self.dynamic else self.shift, "prediction_type": self.prediction_type}

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
                  seq_len: int | None = None) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1)
        sig = torch.tensor([self.sigma(int(v), seq_len) for v in t], dtype=torch.float32, device=x0.device)
        sig = sig.expand(x0.shape[0]) if sig.numel() == 1 else sig
        sig = sig.view(-1, *([1] * (x0.ndim - 1)))
        return ((1 - sig) * x0.float() + sig * noise.float()).to(x0.dtype)


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")


def noise_for_scheduler(scheduler: Any):
    """The noise schedule a scheduler describes: flow matching or DDPM-style."""
    cfg = _config(scheduler)
    name = type(scheduler).__name__ if not isinstance(scheduler, dict) else cfg.get("_class_name", "")
    if name in FLOW_SCHEDULERS or cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        return FlowNoise(scheduler)
    return DDPMNoise(scheduler)
