"""Embedded models' recipes: the registry of the small diffusion models the project trains itself.

:class:`EmbeddedSpec` is one recipe (data, architecture, conditioning, training or distillation budget);
:data:`EMBEDDED_MODELS` names them. A recipe's :meth:`~EmbeddedSpec.identity` keys its cache folder
(:func:`embedded_folder`), and :func:`build_denoiser` / :func:`embedded_scheduler` build the untrained network and
noise scheduler it describes (used by training, :mod:`.embedded`, and by the random-init control,
:mod:`.random_init`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.nn as nn

from .. import artifacts
from ..distill import DistillConfig
from ..training import DenoiserTrainConfig
from .errors import ModelLoadError

TEXT_MAX_LENGTH = 16  # tokens of a text-conditioned model's captions (MiniLM embeddings)


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


def comparison_budget() -> DenoiserTrainConfig:
    """The one training budget of the comparison models (notebook 05) and their reference: 250 steps x batch 64,
    warm-up 25 (a fresh config per entry)."""
    return DenoiserTrainConfig(steps=250, batch_size=64, warmup_steps=25)


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
        train=comparison_budget(),
    ),
    "animals-dit": EmbeddedSpec(
        description="unconditional pixel DiTTransformer2DModel (patch 4 as DiT-*/4: 8x8 tokens, 6 blocks, width 96; "
        "~1.2M params like the UNet's 1.11M, ~0.4x its CPU step time) at the comparison budget",
        arch="dit",
        arch_kwargs=dict(num_layers=6, num_attention_heads=4, attention_head_dim=24, patch_size=4),
        train=comparison_budget(),
    ),
    "animals5-unet": EmbeddedSpec(
        description="the reference UNet trained on Animal-MNIST classes 0-4 only (bear, bird, cat, cow, dog); "
        "probed on classes 5-9 it has never seen",
        classes=[0, 1, 2, 3, 4],
        arch_kwargs=dict(UNET_SMALL),
        train=comparison_budget(),
    ),
    "animals-unet-class": EmbeddedSpec(
        description="class-conditional reference UNet (class embedding added to the time embedding; last id = "
        "null class, dropped 10 %); probed with the null class",
        conditioning="class",
        arch_kwargs=dict(UNET_SMALL),
        train=comparison_budget(),
    ),
    "digits-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits (8x8 padded to 16x16), all 10 classes",
        dataset="digits",
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=comparison_budget(),
    ),
    "digits5-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits 0-4 only (16x16); probed on digits 5-9",
        dataset="digits",
        classes=[0, 1, 2, 3, 4],
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=comparison_budget(),
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
    train=comparison_budget())
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
    """The ``load_model`` sources of the embedded models (``embedded:<name>``)."""
    return [f"embedded:{k}" for k in EMBEDDED_MODELS]


def embedded_folder(name: str, train_steps: int | None = None) -> tuple[EmbeddedSpec, Path]:
    """The recipe of embedded model ``name`` (``train_steps`` overriding its budget) and its cache folder
    ``<cache>/models/<name>-<key of its identity>`` (:func:`revelio_nb.artifacts.embedded_model_dir`)."""
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


# ------------------------------------------------------------------------------------------ what a recipe builds


def build_denoiser(spec: EmbeddedSpec, n_classes: int, in_channels: int) -> nn.Module:
    """The untrained denoiser of a recipe (weights from the current torch RNG)."""
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


def embedded_scheduler(spec: EmbeddedSpec):
    """The DDPM noise scheduler a recipe trains with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=spec.beta_schedule, clip_sample=True)

