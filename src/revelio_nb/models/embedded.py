"""Embedded models' training orchestration: the cached folder of a recipe (:mod:`.embedded_specs`), trained first.

``ensure_embedded(name)`` returns the cached diffusers-style folder of an embedded model, training it first if it is
not there yet. Two processes asking for the same model at once do not clash: training one folder happens under a
file lock, and the second process waits and then loads what the first wrote. Training always runs with gradients
enabled, also when called inside ``torch.no_grad()`` (e.g. from an extraction that needs the model first).
A recipe with a teacher is consistency-distilled from it (:mod:`revelio_nb.distill`) instead of trained. Beside the
weights: ``embedded.json`` (recipe, class names, loss), ``loss_curve.png`` and ``samples.png``
(:func:`save_model_card`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..paths import atomic_write_json
from ..sampling import sample, to_uint8
from ..training import train_denoiser
from .embedded_specs import TEXT_MAX_LENGTH, EmbeddedSpec, build_denoiser, embedded_folder, embedded_scheduler
from .errors import ModelLoadError
from .loading import load_from_folder, load_minilm


def _resolve(func_path: str):
    import importlib

    mod, name = func_path.split(":")
    return getattr(importlib.import_module(mod), name)


def ensure_embedded(name: str, train_steps: int | None = None, progress: bool = True) -> Path:
    """The cached folder of an embedded model, training it first if it is not there yet (resumable).

    Training one folder holds a file lock (``<folder>.lock``): a second process asking for the same model waits,
    then finds the finished folder. Gradients are enabled for the training, also when the caller is in ``no_grad``.
    """
    from filelock import FileLock

    spec, folder = embedded_folder(name, train_steps)
    if (folder / "model_index.json").is_file():
        return folder
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if (folder / "model_index.json").is_file():  # another process trained it while we waited
            return folder
        with torch.enable_grad(), torch.inference_mode(False):
            _train_embedded(name, spec, folder, progress, train_steps)
    return folder


def _train_embedded(name: str, spec: EmbeddedSpec, folder: Path, progress: bool,
                    train_steps: int | None = None) -> None:
    from ..data import load_dataset

    if spec.distill is not None:
        return _distill_embedded(name, spec, folder, progress, train_steps)
    work = folder.with_name(folder.name + ".partial")
    torch.manual_seed(spec.train.seed)
    ds = load_dataset(spec.dataset, classes=spec.classes)
    train_idx = ds.split("train")
    images = ds.tensor(train_idx, size=spec.image_size)
    denoiser = build_denoiser(spec, len(ds.class_names), images.shape[1])
    ema = copy.deepcopy(denoiser)
    scheduler = embedded_scheduler(spec)
    conds, null_cond, text_encoder, tok = None, None, None, None
    if spec.conditioning == "class":
        conds = torch.from_numpy(ds.labels[train_idx])
        null_cond = torch.tensor(len(ds.class_names))  # UNet: last embedding row; DiT: its own null id
    elif spec.conditioning == "text":
        if not spec.captions:
            raise ModelLoadError(f"embedded model {name!r} is text-conditioned but its spec names no captions function")
        captions = list(_resolve(spec.captions)(ds))
        text_encoder, tok = load_minilm()
        conds = _embed_texts([captions[i] for i in train_idx], text_encoder, tok)
        null_cond = _embed_texts([""], text_encoder, tok)[0]
    forward = _training_forward(spec)
    state = train_denoiser(denoiser, ema, forward, images, conds, null_cond, scheduler.alphas_cumprod,
                           spec.train, work, desc=f"train {name}")
    _write_embedded_folder(work, name, spec, ema, scheduler, ds, state)
    with torch.no_grad():
        save_model_card(work, steps=min(25, max(5, spec.train.steps // 10)))  # tiny smoke budgets: a cheap card
    (work / "checkpoint.safetensors").unlink(missing_ok=True)
    os.replace(work, folder)


def _distill_embedded(name: str, spec: EmbeddedSpec, folder: Path, progress: bool, train_steps: int | None) -> None:
    """Consistency-distil the embedded teacher (trained first if needed) into an LCM folder: a normal diffusers
    UNet2DConditionModel with ``time_cond_proj_dim`` + LCMScheduler, so the hub-LCM path loads and samples it."""
    from ..data import load_dataset
    from ..distill import distill_from_teacher, lcm_scheduler

    if spec.conditioning != "text" or not spec.teacher:
        raise ModelLoadError(f"embedded model {name!r}: consistency distillation needs a text-conditioned teacher")
    teacher_folder = ensure_embedded(spec.teacher, train_steps=train_steps, progress=progress)
    teacher = load_from_folder(teacher_folder, model_id=f"embedded:{spec.teacher}")
    work = folder.with_name(folder.name + ".partial")
    ds = load_dataset(spec.dataset, classes=spec.classes)
    train_idx = ds.split("train")
    images = ds.tensor(train_idx, size=spec.image_size)
    captions = list(_resolve(spec.captions)(ds))
    text_encoder, tok = load_minilm()
    conds = _embed_texts([captions[i] for i in train_idx], text_encoder, tok)
    null_cond = _embed_texts([""], text_encoder, tok)[0]
    ddpm = embedded_scheduler(spec)
    student, state = distill_from_teacher(teacher.denoiser.float(), images, conds, null_cond, ddpm.alphas_cumprod,
                                          spec.distill, work, desc=f"distill {name}")
    _write_embedded_folder(work, name, spec, student, lcm_scheduler(ddpm, spec.distill), ds, state)
    with torch.no_grad():
        save_model_card(work, steps=4)
    (work / "checkpoint.safetensors").unlink(missing_ok=True)
    os.replace(work, folder)


def save_model_card(folder: Path, n_samples: int = 64, steps: int = 50, seed: int = 0) -> None:
    """``loss_curve.png`` and ``samples.png`` (neutral DDIM samples) beside an embedded model's weights."""
    import matplotlib.pyplot as plt

    from ..plots import image_grid, loss_curve

    info = json.loads((folder / "embedded.json").read_text())
    fig = loss_curve(np.load(folder / "losses.npy"), title=f"{info['name']}: training loss")
    fig.savefig(folder / "loss_curve.png", dpi=110)
    plt.close(fig)
    model = load_from_folder(folder, model_id=f"embedded:{info['name']}")
    images = to_uint8(sample(model, n_samples, steps=steps, seed=seed))
    fig = image_grid(images, ncols=16, cell=0.6, suptitle=f"{info['name']}: {n_samples} samples ({steps} {model.adapter.sampler.upper()} steps)")
    fig.savefig(folder / "samples.png", dpi=110)
    plt.close(fig)


@torch.no_grad()
def _embed_texts(texts: list[str], encoder, tokenizer, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i : i + batch], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                        return_tensors="pt")
        out.append(encoder(ids.input_ids)[0])
    return torch.cat(out)


def _training_forward(spec: EmbeddedSpec):
    if spec.arch == "dit":
        def fwd(m, x, t, cond):
            labels = cond if cond is not None else torch.zeros(x.shape[0], dtype=torch.long)  # uncond: the one class
            return m(x, timestep=t, class_labels=labels).sample[:, : x.shape[1]]
    elif spec.conditioning == "text":
        def fwd(m, x, t, cond):
            return m(x, t, encoder_hidden_states=cond).sample
    elif spec.conditioning == "class":
        def fwd(m, x, t, cond):
            return m(x, t, class_labels=cond).sample
    else:
        def fwd(m, x, t, cond):
            return m(x, t).sample
    return fwd


def _write_embedded_folder(work: Path, name: str, spec: EmbeddedSpec, ema: nn.Module, scheduler, ds, state) -> None:
    sub = "transformer" if spec.arch == "dit" else "unet"
    ema.save_pretrained(work / sub, safe_serialization=True)
    scheduler.save_pretrained(work / "scheduler")
    info = {
        "name": name,
        "spec": asdict(spec),
        "class_names": ds.class_names,
        "dataset": ds.name,
        "train_images": int(len(ds.split("train"))),
        "train_seconds": round(state.seconds, 1),
        "final_loss": float(np.mean(state.losses[-100:])) if state.losses else None,
        "text_encoder": "minilm" if spec.conditioning == "text" else None,
        "text_max_length": TEXT_MAX_LENGTH if spec.conditioning == "text" else None,
    }
    if spec.distill is not None:
        info.update(teacher=f"embedded:{spec.teacher}", sampler="lcm", default_guidance=spec.lcm_guidance)
    atomic_write_json(work / "embedded.json", info)
    np.save(work / "losses.npy", np.asarray(state.losses, dtype=np.float32))
    components = {sub: ["diffusers", type(ema).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
    atomic_write_json(work / "model_index.json", {"_class_name": "RevelioEmbeddedPipeline", **components})

