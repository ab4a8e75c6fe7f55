"""One loader for every diffusion model the toolkit studies.

``load_model(source)`` takes

* ``"embedded:<name>"``: a small model the project trains itself on CPU (see :data:`EMBEDDED_MODELS`);
  trained on first use, then cached as a diffusers-style folder (config beside safetensors weights);
* ``"random:<name>"``: an embedded architecture with seeded random weights (the random-init control);
* a local folder: a diffusers pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/``,
  optional ``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``scheduler/``) or a single model folder;
* a Hugging Face hub id (e.g. ``"runwayml/stable-diffusion-v1-5"``, ``"facebook/DiT-XL-2-256"``), fetched
  to a local snapshot (diffusers sub-folders only) and then loaded through the very same folder path.

and returns a :class:`DiffusionModel`. What differs between model families lives in one adapter per family
(:mod:`revelio_nb.models.adapters`): pixel UNet, SD 1.x/2.x/XL and LCM UNets, DiT, PixArt, SD3, FLUX.1, Sana.
Never ``trust_remote_code``, never pickle.

Layout: :mod:`.core` (the model object), :mod:`.sources` (``load_model``: which loader a source goes to),
:mod:`.loading` (folders, hub, allow-lists), :mod:`.noise` (noise conventions), :mod:`.adapters` (families),
:mod:`.embedded_specs` (embedded models' recipes: the registry, cache keys, the networks they build),
:mod:`.embedded` (training them), :mod:`.random_init` (the random-init control).
"""

from __future__ import annotations

from .adapters import ADAPTERS, supported
from .core import DiffusionModel, describe, repeat_cond, tokenizer_digest, weights_digest, weights_hash
from .embedded import _embed_texts, _resolve, _training_forward, ensure_embedded, save_model_card
from .embedded_specs import (
    EMBEDDED_MODELS,
    TEXT_MAX_LENGTH,
    UNET_SMALL,
    EmbeddedSpec,
    build_denoiser,
    embedded_folder,
    embedded_names,
    embedded_scheduler,
)
from .errors import ModelLoadError
from .loading import (
    SCHEDULER_CLASSES,
    TEXT_ENCODER_CLASSES,
    VAE_CLASSES,
    hub_patterns,
    load_from_folder,
    load_minilm,
    load_scheduler,
    minilm_path,
)
from .noise import DDPMNoise, FlowNoise
from .random_init import random_init_model
from .sources import load_model

_repeat_cond = repeat_cond

__all__ = [
    "ADAPTERS", "DDPMNoise", "DiffusionModel", "EMBEDDED_MODELS", "EmbeddedSpec", "FlowNoise", "ModelLoadError",
    "SCHEDULER_CLASSES", "TEXT_ENCODER_CLASSES", "TEXT_MAX_LENGTH", "UNET_SMALL", "VAE_CLASSES",
    "build_denoiser", "describe", "embedded_folder", "embedded_names", "embedded_scheduler", "ensure_embedded",
    "hub_patterns", "load_from_folder", "load_minilm", "load_model", "load_scheduler", "minilm_path",
    "random_init_model", "save_model_card", "supported", "tokenizer_digest", "weights_digest", "weights_hash",
    "_embed_texts", "_resolve", "_training_forward",
]
