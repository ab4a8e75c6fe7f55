"""Embedded models: small diffusion models the project trains itself on CPU (registry, training orchestration,
random-init controls).

``ensure_embedded(name)`` returns the cached diffusers-style folder of an embedded model, training it first if it is
not there yet. Two processes asking for the same model at once do not clash: training one folder happens under a
file lock, and the second process waits and then loads what the first wrote. Training always runs with gradients
enabled, also when called inside ``torch.no_grad()`` (e.g. from an extraction that needs the model first).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import artifacts
from ..distill import DistillConfig
from ..paths import atomic_write_json
from ..sampling import sample, to_uint8
from ..training import DenoiserTrainConfig, train_denoiser
from .core import DiffusionModel
from .errors import ModelLoadError
from .loading import load_from_folder, load_minilm

@dataclass
class EmbeddedSpec:
    """Recipe of an embedded model: data, architecture, conditioning and training budget."""

    dataset: str = "animal-mnist"
    classes: list[int] | None = None  # train on a subset of classes (pre-training-data experiments)
    arch: str = "unet"  # "unet" (UNet2DModel / UNet2DConditionModel) | "dit" (DiTTransformer2DModel)
    conditioning: str = "none"  # "none" | "class" | "text"
    image_size: int = 32
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    train: DenoiserTrainConfig = field(default_factory=DenoiserTrainConfig)
    beta_schedule: str = "squaredcos_cap_v2"
    captions: str | None = None  # "module:function" returning one caption per dataset image (text models)
    description: str = ""
    # consistency-distilled models (LCM): the embedded teacher they are distilled from, and the distillation recipe
    # (revelio_nb.distill); ``train`` is then unused. Left out of the identity when None (older cache keys hold).
    teacher: str | None = None
    distill: DistillConfig | None = None
    lcm_guidance: float | None = None  # default guidance scale of the distilled model's sampler (1 + w)

    def identity(self) -> dict[str, Any]:
        """Everything that changes the trained weights (the cache key): not the free-text description, not how
        often checkpoints are written, not the thread count (training is deterministic across both). A distilled
        model's identity holds its distillation recipe and its teacher's identity (``teacher_identity``, filled
        by :func:`embedded_folder`)."""
        d = asdict(self)
        d.pop("description")
        for k in ("checkpoint_every", "num_threads"):
            d["train"].pop(k)
        for k in ("teacher", "distill", "lcm_guidance"):
            if d[k] is None:
                d.pop(k)
        if d.get("distill"):
            for k in ("checkpoint_every", "num_threads"):
                d["distill"].pop(k)
            d.pop("train")
            d["teacher_identity"] = embedded_folder(self.teacher)[0].identity() if self.teacher else None
        return d


UNET_SMALL = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)

EMBEDDED_MODELS: dict[str, EmbeddedSpec] = {
    "animals-unet": EmbeddedSpec(
        description="unconditional pixel UNet2DModel trained on the Animal-MNIST train split (32x32)",
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=1200, batch_size=64),
    ),
    # --- comparison models: architecture / pre-training data / class conditioning (probes issue) ---
    # One budget for all of them (250 steps x batch 64, warm-up 25 = what train_steps=250 gives any other entry,
    # e.g. load_model("embedded:animals-unet-text", train_steps=250)), so every comparison is at equal budget;
    # `animals-unet-ref` is the main architecture at that budget, the reference of each comparison.
    "animals-unet-ref": EmbeddedSpec(
        description="animals-unet's architecture at the comparison budget (250 steps): reference of the comparisons",
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals-dit": EmbeddedSpec(
        description="unconditional pixel DiTTransformer2DModel (patch 4 as DiT-*/4: 8x8 tokens, 6 blocks, width 96; "
        "~1.2M params like the UNet's 1.11M, ~0.4x its CPU step time) at the comparison budget",
        arch="dit",
        arch_kwargs=dict(num_layers=6, num_attention_heads=4, attention_head_dim=24, patch_size=4),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals5-unet": EmbeddedSpec(
        description="the reference UNet trained on Animal-MNIST classes 0-4 only (bear, bird, cat, cow, dog); "
        "probed on classes 5-9 it has never seen",
        classes=[0, 1, 2, 3, 4],
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals-unet-class": EmbeddedSpec(
        description="class-conditional reference UNet (class embedding added to the time embedding; last id = "
        "null class, dropped 10 %); probed with the null class",
        conditioning="class",
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "digits-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits (8x8 padded to 16x16), all 10 classes",
        dataset="digits",
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "digits5-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits 0-4 only (16x16); probed on digits 5-9",
        dataset="digits",
        classes=[0, 1, 2, 3, 4],
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    # --- text-conditioned model (Decoding Diffusion issue) ---
    "animals-unet-text": EmbeddedSpec(
        description="text-conditioned pixel UNet2DConditionModel; cross-attention on frozen MiniLM token embeddings "
        "of captions with measured attributes (revelio_nb.captions v2: largest-component masks, tertiles, texture "
        "top 20 % / bottom 50 %, p_mention=0.8), trained on Animal-MNIST with a planted class-facing association "
        "(captions.PLANTED_FACING_RIGHT)",
        dataset="animal-mnist+facing",
        conditioning="text",
        captions="revelio_nb.captions:animal_captions",
        arch_kwargs=dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # cross-attention at 8x8 + mid
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=384,
            norm_num_groups=8,
            attention_head_dim=8,
            addition_embed_type="text",  # attention-pooled caption added to the time embedding: every ResNet
            addition_embed_type_num_heads=8,  # hears global words (size, shape, texture) at every resolution
        ),
        train=DenoiserTrainConfig(steps=900, batch_size=64),
    ),
}
# the conditioning comparison (notebook 05) needs the text model on the same images as the others, at their budget
EMBEDDED_MODELS["animals-unet-text-ref"] = replace(
    EMBEDDED_MODELS["animals-unet-text"], dataset="animal-mnist",
    description="the text-conditioned UNet on plain Animal-MNIST at the comparison budget (250 steps): the "
    "language-conditioning entry of the comparisons",
    train=DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25))
# notebook 06's retrained text model: the same recipe from another training seed (initial weights, batches, noise)
EMBEDDED_MODELS["animals-unet-text-seed1"] = replace(
    EMBEDDED_MODELS["animals-unet-text"], train=replace(EMBEDDED_MODELS["animals-unet-text"].train, seed=1),
    description="animals-unet-text retrained from training seed 1: does a bias finding survive retraining?")
# notebook 06's few-step sampler (issue 17): the text model consistency-distilled into an LCM (revelio_nb.distill)
EMBEDDED_MODELS["animals-unet-text-lcm"] = replace(
    EMBEDDED_MODELS["animals-unet-text"], teacher="animals-unet-text", distill=DistillConfig(), lcm_guidance=1.0,
    description="animals-unet-text consistency-distilled into a latent consistency model (guidance embedding "
    "w in [0, 3], skipping-step DDIM solver on 50 steps with the teacher's CFG, EMA target): LCMScheduler, 2-8 steps")


def embedded_names() -> list[str]:
    return [f"embedded:{k}" for k in EMBEDDED_MODELS]


# ------------------------------------------------------------------------------------------ the model

def build_denoiser(spec: EmbeddedSpec, n_classes: int, in_channels: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    kw = dict(spec.arch_kwargs)
    if spec.arch == "dit":
        return DiTTransformer2DModel(
            in_channels=in_channels, out_channels=in_channels, sample_size=spec.image_size,
            num_embeds_ada_norm=n_classes if spec.conditioning == "class" else 1, **kw,
        )
    if spec.arch != "unet":
        raise ModelLoadError(f"unknown arch {spec.arch!r}; valid: 'unet', 'dit'")
    if spec.conditioning == "text":
        return UNet2DConditionModel(sample_size=spec.image_size, in_channels=in_channels, out_channels=in_channels, **kw)
    if spec.conditioning == "class":
        kw["num_class_embeds"] = n_classes + 1  # last row = null class (classifier-free guidance, neutral probe)
    elif spec.conditioning != "none":
        raise ModelLoadError(f"unknown conditioning {spec.conditioning!r}; valid: 'none', 'class', 'text'")
    return UNet2DModel(sample_size=spec.image_size, in_channels=in_channels, out_channels=in_channels, **kw)


def _resolve(func_path: str):
    import importlib

    mod, name = func_path.split(":")
    return getattr(importlib.import_module(mod), name)


def embedded_folder(name: str, train_steps: int | None = None) -> tuple[EmbeddedSpec, Path]:
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}; valid: {embedded_names()}")
    spec = copy.deepcopy(EMBEDDED_MODELS[name])
    if train_steps is not None:
        if int(train_steps) <= 0:
            raise ModelLoadError(f"train_steps must be a positive integer, got {train_steps!r}")
        spec.train.steps = int(train_steps)
        spec.train.warmup_steps = min(spec.train.warmup_steps, max(1, spec.train.steps // 10))
        if spec.distill is not None:  # smoke budgets: the teacher gets train_steps, the distillation at most that
            spec.distill.steps = min(spec.distill.steps, int(train_steps))
            spec.distill.warmup_steps = min(spec.distill.warmup_steps, max(1, spec.distill.steps // 10))
    identity = spec.identity()
    if spec.distill is not None:
        identity["teacher_identity"] = embedded_folder(spec.teacher, train_steps)[0].identity()
    return spec, artifacts.embedded_model_dir(name, identity)



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
    scheduler = _embedded_scheduler(spec)
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
    ddpm = _embedded_scheduler(spec)
    student, state = distill_from_teacher(teacher.denoiser.float(), images, conds, null_cond, ddpm.alphas_cumprod,
                                          spec.distill, work, desc=f"distill {name}")
    _write_embedded_folder(work, name, spec, student, lcm_scheduler(ddpm, spec.distill), ds, state)
    with torch.no_grad():
        save_model_card(work, steps=4)
    (work / "checkpoint.safetensors").unlink(missing_ok=True)
    os.replace(work, folder)


def random_init_model(name: str = "animals-unet", seed: int = 0) -> DiffusionModel:
    """The architecture of embedded model ``name`` with seeded random weights and no training.

    Returned as a :class:`DiffusionModel` with ``model_id="random:<name>"`` (seed in ``info``), so
    ``extract_features(cfg, model=...)`` works on it exactly as on the trained model; its fingerprint keys
    the feature cache. ``load_model("random:<name>")`` returns it too.
    """
    from ..data import load_dataset

    if name.startswith("embedded:"):
        name = name.split(":", 1)[1]
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}; valid: {embedded_names()}")
    spec = copy.deepcopy(EMBEDDED_MODELS[name])
    ds = load_dataset(spec.dataset, classes=spec.classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        denoiser = build_denoiser(spec, len(ds.class_names), ds.channels).eval()
    denoiser.requires_grad_(False)
    kind = "dit" if spec.arch == "dit" else ("unet_cond" if spec.conditioning == "text" else "unet")
    text_encoder = tokenizer = None
    spec_d = asdict(spec)
    spec_d["train"]["steps"] = 0  # never trained (describe() and tables report 0 steps)
    info = {"name": name, "spec": spec_d, "random_init_seed": int(seed), "class_names": ds.class_names,
            "trained": False, "dataset": ds.name}
    if spec.conditioning == "text":
        text_encoder, tokenizer = load_minilm()
        info.update(text_encoder="minilm", text_max_length=TEXT_MAX_LENGTH)
    return DiffusionModel(model_id=f"random:{name}", kind=kind, denoiser=denoiser, scheduler=_embedded_scheduler(spec),
                          text_encoder=text_encoder, tokenizer=tokenizer,
                          class_names=ds.class_names, info=info)


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


def describe(model: DiffusionModel) -> dict[str, Any]:
    """One table row about a loaded model."""
    spec = model.info.get("spec", {})
    return {
        "model": model.model_id,
        "kind": model.kind,
        "class": type(model.denoiser).__name__,
        "noise": f"{model.noise.convention}/{model.prediction_type}",
        "h_block": model.h_block,
        "params_M": round(sum(p.numel() for p in model.denoiser.parameters()) / 1e6, 3),
        "image_size": model.native_image_size,
        "dataset": model.info.get("dataset"),
        "conditioning": spec.get("conditioning"),
        "train_steps": spec.get("train", {}).get("steps"),
        "train_seconds": model.info.get("train_seconds"),
        "final_loss": model.info.get("final_loss"),
        "weights_hash": model.weights_hash,
        "folder": str(model.folder) if model.folder else None,
    }


TEXT_MAX_LENGTH = 16


@torch.no_grad()
def _embed_texts(texts: list[str], encoder, tokenizer, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i : i + batch], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                        return_tensors="pt")
        out.append(encoder(ids.input_ids)[0])
    return torch.cat(out)


def _embedded_scheduler(spec: EmbeddedSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=spec.beta_schedule, clip_sample=True)


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

