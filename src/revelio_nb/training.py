"""CPU training of the embedded diffusion models (DDPM epsilon objective).

Deterministic and resumable: every step's batch, timesteps and noise come from a generator seeded by
(seed, step), so a run interrupted and resumed from its last checkpoint ends with the same weights as an
uninterrupted one.

A checkpoint is ONE file, ``checkpoint.safetensors``: model, EMA and optimizer tensors, the per-step losses, and
the step counter in its metadata, written to a temporary file and renamed (its one commit point). A process
killed at any moment leaves the previous checkpoint or the new one, never newer weights under an older step.
The two-file layout of earlier versions (weights, then ``checkpoint.json``) is resumed only when both agree
(the optimizer's own step counters inside the weights equal the JSON step), else discarded with a warning.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .paths import atomic_path, remove_stale_temporaries


@dataclass
class DenoiserTrainConfig:
    """How an embedded model is trained. Saved beside its weights (``embedded.json``)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # class/text conditioning dropped to the null condition (enables CFG)
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    seed: int = 0
    num_threads: int = 0  # 0 = leave torch's default


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class TrainingError(RuntimeError):
    pass


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _lr_at(cfg: DenoiserTrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "revelio-train-checkpoint/2"
LEGACY_STATE = "checkpoint.json"  # the step counter of the two-file layout (before CHECKPOINT_FORMAT)


def _save_checkpoint(folder: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, state: TrainState):
    """Write the whole training state as one safetensors file; the rename at the end is the commit point."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"opt.{i}.{name}"] = st[name].contiguous()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tensors["state.losses"] = torch.tensor(state.losses, dtype=torch.float64)  # exact: the floats of loss.item()
    meta = {"format": CHECKPOINT_FORMAT, "step": str(state.step), "seconds": repr(float(state.seconds))}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / CHECKPOINT) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    (folder / LEGACY_STATE).unlink(missing_ok=True)  # after the commit: a kill before it leaves a consistent pair


def _restore(tensors: dict[str, torch.Tensor], model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"opt.{i}.step"].reshape(()),
                "exp_avg": tensors[f"opt.{i}.exp_avg"],
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"],
            }


def _optimizer_steps(tensors: dict[str, torch.Tensor]) -> set[int]:
    """The step counters Adam keeps per parameter inside the weights file (one value when the file is whole)."""
    return {int(v.reshape(-1)[0].item()) for k, v in tensors.items() if k.startswith("opt.") and k.endswith(".step")}


def step_and_record(loss: torch.Tensor, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                    state: TrainState, grad_clip: float, ema_decay: float, t_start: float, bar, work_dir: Path,
                    checkpoint_every: int, steps: int, desc: str, log_every: int = 20) -> None:
    """The tail of one training step, shared by every trainer here (embedded models, consistency distillation):
    a finite-loss check, backward, gradient clipping, the optimizer step, the EMA update at ``ema_decay``, the
    step's bookkeeping and progress, and the checkpoint (the commit point) every ``checkpoint_every`` steps."""
    if not torch.isfinite(loss):
        raise TrainingError(f"{desc}: loss became {loss.item()} at step {state.step}; last checkpoint kept in {work_dir}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - ema_decay)
    state.step += 1
    state.losses.append(loss.item())
    state.seconds = time.time() - t_start
    bar.update(1)
    if state.step % log_every == 0:
        bar.set_postfix(loss=f"{np.mean(state.losses[-log_every:]):.4f}")
    if state.step % checkpoint_every == 0 or state.step == steps:
        _save_checkpoint(work_dir, model, ema, opt, state)


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], TrainState] | None:
    """The tensors and state of the checkpoint in ``folder``, or None when there is none that can be trusted.

    An unreadable file, or a legacy two-file checkpoint whose weights and step counter disagree (a kill between
    its two writes), is reported with a warning and ignored (training starts over).
    """
    folder = Path(folder)
    ck = folder / CHECKPOINT
    if not ck.is_file():
        return None
    try:
        with safe_open(str(ck), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(ck))
    except (SafetensorError, OSError, ValueError) as e:
        warnings.warn(f"training checkpoint {ck} is unreadable ({e}); training starts over")
        return None
    if meta.get("format") == CHECKPOINT_FORMAT:
        losses = tensors.pop("state.losses", torch.zeros(0)).tolist()
        state = TrainState(step=int(meta["step"]), losses=losses, seconds=float(meta["seconds"]))
        problem = None if len(losses) == state.step else f"{len(losses)} losses for step {state.step}"
    else:  # legacy: weights in the safetensors file, step counter in checkpoint.json, written one after the other
        try:
            raw = json.loads((folder / LEGACY_STATE).read_text())
            state = TrainState(step=int(raw["step"]), losses=[float(x) for x in raw["losses"]],
                               seconds=float(raw.get("seconds", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            state, problem = None, f"its step counter {folder / LEGACY_STATE} is missing or unreadable ({e})"
        else:
            steps = _optimizer_steps(tensors)
            problem = None if steps == {state.step} and len(state.losses) == state.step else (
                f"its weights are at optimizer step(s) {sorted(steps)} but {LEGACY_STATE} says step {state.step} "
                "(a kill between the two writes of the old two-file layout)")
    if problem is not None:
        warnings.warn(f"training checkpoint {ck} cannot be trusted: {problem}; training starts over")
        return None
    return tensors, state


def _load_checkpoint(folder: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> TrainState | None:
    found = read_checkpoint(folder)
    if found is None:
        return None
    tensors, state = found
    _restore(tensors, model, ema, opt)
    return state


def train_denoiser(
    model: nn.Module,
    ema: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    conds: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    cfg: DenoiserTrainConfig,
    work_dir: str | Path,
    desc: str = "train",
) -> TrainState:
    """Train ``model`` to predict the noise added to ``images`` (N, C, H, W in [-1, 1]).

    ``forward(model, x_t, t, cond)`` returns the predicted noise; ``conds`` holds one condition per image
    (class ids or token embeddings) and ``null_cond`` the unconditional one, used with prob ``cond_dropout``.
    Resumes from ``work_dir/checkpoint.safetensors`` when present (see the module docstring).
    """
    work_dir = Path(work_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    remove_stale_temporaries(work_dir / CHECKPOINT)  # half-written checkpoints of a killed run (never committed)
    state = _load_checkpoint(work_dir, model, ema, opt) or TrainState()
    n = len(images)
    num_t = len(alphas_cumprod)
    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step")
    t_start = time.time() - state.seconds
    while state.step < cfg.steps:
        g = _step_generator(cfg.seed, state.step)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        t = torch.randint(0, num_t, (cfg.batch_size,), generator=g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = None
        if conds is not None:
            cond = conds[idx].clone()
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
            if drop.any():
                cond[drop] = null_cond.to(cond.dtype)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, state.step)
        loss = (forward(model, x_t, t, cond) - noise).pow(2).mean()
        decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))
        step_and_record(loss, model, ema, opt, state, cfg.grad_clip, decay, t_start, bar, work_dir,
                        cfg.checkpoint_every, cfg.steps, desc, log_every=20)
    bar.close()
    model.eval()
    ema.eval()
    return state
