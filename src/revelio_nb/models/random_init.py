"""The random-init control: an embedded model's architecture with seeded random weights and no training."""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch

from .core import DiffusionModel
from .embedded_specs import EMBEDDED_MODELS, TEXT_MAX_LENGTH, build_denoiser, embedded_names, embedded_scheduler
from .errors import ModelLoadError
from .loading import load_minilm


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
    return DiffusionModel(model_id=f"random:{name}", kind=kind, denoiser=denoiser, scheduler=embedded_scheduler(spec),
                          text_encoder=text_encoder, tokenizer=tokenizer,
                          class_names=ds.class_names, info=info)

