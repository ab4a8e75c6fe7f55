"""Where a fresh `make reproduce` spends its training time: seconds per step of every embedded model's real training
step on this machine, and the minutes its full budget would take here.

    python benchmarks/train_bench.py [--models animals-unet animals-unet-text ...] [--steps 4] [--profile animals-unet]

Each model is built from its registry recipe with random weights and trained on random images of its own shape by
the project's trainer (:func:`revelio_nb.training.train_denoiser`: batch sampling, noising, forward, backward,
clipping, AdamW, EMA; the consistency-distilled entry by :func:`revelio_nb.distill.distill_from_teacher` with a
random teacher): one warm-up step, then ``--steps`` timed steps resumed from it. Speed does not depend on the weights
or the pixels. ``--profile NAME`` also prints the operators that take the time of NAME's step (torch profiler).

Ends with: RESULT train_minutes=<sum over models of budget x s/step / 60> s_per_step_<model>=... threads=...
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from revelio_nb.data import load_dataset
from revelio_nb.distill import distill_from_teacher
from revelio_nb.models import _training_forward
from revelio_nb.models.embedded_specs import EMBEDDED_MODELS, TEXT_MAX_LENGTH, build_denoiser
from revelio_nb.training import train_denoiser


def _inputs(spec, n: int = 256):
    """Random training tensors of the model's own shapes (images, conditions, null condition, classes)."""
    ds = load_dataset(spec.dataset, classes=spec.classes)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, ds.channels, spec.image_size, spec.image_size, generator=g) * 2 - 1
    conds = null = None
    if spec.conditioning == "class":
        conds, null = torch.randint(0, len(ds.class_names), (n,), generator=g), torch.tensor(len(ds.class_names))
    elif spec.conditioning == "text":
        conds = torch.randn(n, TEXT_MAX_LENGTH, spec.arch_kwargs["cross_attention_dim"], generator=g)
        null = torch.zeros(TEXT_MAX_LENGTH, spec.arch_kwargs["cross_attention_dim"])
    return images, conds, null, len(ds.class_names)


def seconds_per_step(name: str, steps: int, work: Path) -> tuple[float, int]:
    """(mean seconds per timed step, the entry's full step budget)."""
    from diffusers import DDPMScheduler

    spec = copy.deepcopy(EMBEDDED_MODELS[name])
    alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule=spec.beta_schedule).alphas_cumprod
    if spec.distill is not None:  # a consistency student: the distillation step with a random teacher
        teacher_spec = EMBEDDED_MODELS[spec.teacher]
        images, conds, null, n_classes = _inputs(teacher_spec)
        teacher = build_denoiser(teacher_spec, n_classes, images.shape[1]).eval()

        def run(n: int) -> float:
            cfg = replace(spec.distill, steps=n, checkpoint_every=10**9)
            return distill_from_teacher(teacher, images, conds, null, alphas, cfg, work, desc=name)[1].seconds

        budget = spec.distill.steps
    else:
        images, conds, null, n_classes = _inputs(spec)
        model = build_denoiser(spec, n_classes, images.shape[1])
        ema = copy.deepcopy(model)
        forward = _training_forward(spec)

        def run(n: int) -> float:
            cfg = replace(spec.train, steps=n, checkpoint_every=10**9)
            return train_denoiser(model, ema, forward, images, conds, null, alphas, cfg, work, desc=name).seconds

        budget = spec.train.steps
    run(1)  # warm-up step (allocator, oneDNN kernels); the second call resumes from its checkpoint
    start = time.perf_counter()
    run(1 + steps)
    return (time.perf_counter() - start) / steps, budget


def profile_step(name: str, work: Path, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    seconds_per_step(name, 1, work / "warm")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds_per_step(name, 2, work / "prof")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(EMBEDDED_MODELS), choices=list(EMBEDDED_MODELS),
                   metavar="NAME", help=f"embedded entries (default: all of {list(EMBEDDED_MODELS)})")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model after one warm-up step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", default=None, choices=list(EMBEDDED_MODELS), metavar="NAME",
                   help="also print the operators that take NAME's step time")
    a = p.parse_args()
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            s, budget = seconds_per_step(name, a.steps, Path(tmp) / name)
            rows.append((name, s, budget))
            print(f"{name:28s} {s:6.3f} s/step x {budget:5d} steps = {s * budget / 60:6.1f} min", flush=True)
        if a.profile:
            profile_step(a.profile, Path(tmp) / "profile")
    total = sum(s * b for _, s, b in rows) / 60
    per = " ".join(f"s_per_step_{n.replace('-', '_')}={s:.3f}" for n, s, _ in rows)
    print(f"RESULT train_minutes={total:.1f} {per} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
