"""revelio-nb: look inside diffusion models (Revelio k-SAEs, probes, Decoding Diffusion directions).

The public API is listed in ``__all__``: the names a notebook or a user script needs, each living in one module
(the table in README.md's "Package layout" says which module holds what). They are imported on first use, so
``import revelio_nb`` stays cheap (no torch / diffusers until a name is touched)::

    import revelio_nb as rv
    model = rv.load_model("embedded:animals-unet")
    store = rv.extract_features(rv.ExtractionConfig(model="embedded:animals-unet", blocks=["mid_block"]))

Sub-modules and sub-packages (``rv.sae``, ``rv.directions``, ``rv.browse``, ...) are reachable the same way.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

__version__ = "0.1.0"

# public name -> the module that owns it
_PUBLIC: dict[str, str] = {
    # data and models
    "ImageDataset": "data", "load_dataset": "data", "DatasetError": "data",
    "DiffusionModel": "models", "load_model": "models", "ModelLoadError": "models", "EMBEDDED_MODELS": "models",
    "DenoiserTrainConfig": "training",
    "sample": "sampling", "denoise_loop": "sampling",
    # features
    "list_blocks": "capture", "FeatureCapture": "capture",
    "ExtractionConfig": "features", "extract_features": "features", "FeatureStore": "features",
    # k-SAEs and what their latents encode
    "SaeConfig": "sae", "TrainConfig": "sae", "SparseAutoencoder": "sae", "train_sae": "sae", "evaluate_sae": "sae",
    "HookpointRun": "hookpoint_saes", "train_hookpoints": "hookpoint_saes",
    "latent_stats": "latents", "LatentStats": "latent_store",
    "TaxonomyConfig": "taxonomy", "latent_taxonomy": "taxonomy", "sae_taxonomy": "taxonomy",
    "HookpointIndex": "run_index",
    "browse": "browse",
    # probes and baselines
    "LinearProbeConfig": "probes", "fit_linear_probe": "probes", "DiffCConfig": "probes", "train_diffc": "probes",
    "probe_data": "probes",
    "VisionEncoder": "encoders", "load_encoder": "encoders",
    # Decoding Diffusion
    "BiasStudyConfig": "directions", "bias_study": "directions", "SampleConfig": "directions",
    "prompt_h": "directions", "fit_word_map": "directions", "SteeringHook": "directions", "steer": "directions",
    # runs and results
    "cache_dir": "paths", "results_dir": "paths",
}
_SUBMODULES = ("artifacts", "attributes", "browse", "captions", "capture", "cell_timings", "data", "dataset_errors",
               "directions", "distill", "distributed", "encoders", "features", "hookpoint_saes", "image_arrays",
               "image_folders", "latent_store", "latents", "models", "optional", "paths", "plots", "pooling", "probes",
               "regime", "report", "run_index", "run_markers", "run_plan", "run_progress", "runner", "sae", "sampling",
               "taxonomy", "training")

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        value = module if name == _PUBLIC[name] else getattr(module, name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'revelio_nb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_SUBMODULES))


if _os.environ.get("REVELIO_PROGRESS") == "text":  # set by the runner for its headless kernels: text progress bars
    from .run_progress import use_text_progress as _use_text_progress

    _use_text_progress()
