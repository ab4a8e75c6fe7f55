"""k-SAE evaluation: :func:`evaluate_sae` streams a source once for FVU, L0, dead fraction and per-latent firing
frequency; :func:`eval_tables` / :func:`save_eval` turn the result into tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SaeError
from .model import SparseAutoencoder
from .source import as_source


@torch.no_grad()
def evaluate_sae(model: SparseAutoencoder, source, batch_size: int = 8192, progress: bool = False) -> dict[str, Any]:
    """FVU, L0, dead fraction (never fires) and per-latent firing frequency over every token of ``source``.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over all of ``source``.
    """
    source = as_source(source)
    if source.d_in != model.d_in:
        raise SaeError(f"features have width {source.d_in} but the SAE has d_in {model.d_in}")
    counts = torch.zeros(model.num_latents, dtype=torch.long, device=model.device)
    sse = sum_x2 = 0.0
    sum_x = torch.zeros(model.d_in, dtype=torch.float64)
    l0 = 0
    n = source.n_tokens
    for s in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        x = torch.from_numpy(source.gather(np.arange(s, min(n, s + batch_size)))).to(model.device)
        acts, idx = model.encode(x)
        x_hat = model.decode(acts, idx)
        sse += (x - x_hat).double().pow(2).sum().item()
        xd = x.double().cpu()
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum().item()
        fired = acts > 0
        l0 += int(fired.sum())
        counts += torch.bincount(idx[fired], minlength=model.num_latents)
    total_var = sum_x2 - (sum_x.pow(2).sum().item() / n)
    freq = (counts.double() / n).cpu().numpy()
    return {"fvu": sse / total_var, "l0": l0 / n, "dead_fraction": float((counts == 0).double().mean()),
            "n_tokens": n, "num_latents": model.num_latents, "k": model.k, "firing_frequency": freq}


def eval_tables(result: dict[str, Any]):
    """(metrics DataFrame with one row, per-latent firing DataFrame) from :func:`evaluate_sae`'s dict."""
    import pandas as pd

    metrics = pd.DataFrame([{k: v for k, v in result.items() if k != "firing_frequency"}])
    freq = np.asarray(result["firing_frequency"])
    firing = pd.DataFrame({"latent": np.arange(len(freq)), "firing_frequency": freq, "dead": freq == 0})
    return metrics, firing


def save_eval(result: dict[str, Any], tables_dir: str | os.PathLike, name: str = "sae_eval") -> tuple[Path, Path]:
    """Write ``<name>_metrics.csv`` and ``<name>_firing.csv`` to ``tables_dir``."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    metrics, firing = eval_tables(result)
    paths = tables_dir / f"{name}_metrics.csv", tables_dir / f"{name}_firing.csv"
    metrics.to_csv(paths[0], index=False)
    firing.to_csv(paths[1], index=False)
    return paths
