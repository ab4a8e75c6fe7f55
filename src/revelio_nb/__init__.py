"""revelio-nb: look inside diffusion models (Revelio k-SAEs, probes, Decoding Diffusion directions).

Modules, one idea each:
    data        image datasets with fixed seeded stratified splits
    models      one loader for hub ids, local folders and embedded models trained by the project
    training    the CPU training routine of the embedded diffusion models
    hooks       list, capture and early-exit on any block of a UNet or DiT
    features    seeded noising + extraction into a memory-mapped, resumable feature store
    runner      papermill runner for the numbered notebooks
"""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("REVELIO_PROGRESS") == "text":  # set by the runner for its headless kernels: text progress bars
    from .runner import use_text_progress as _use_text_progress

    _use_text_progress()
