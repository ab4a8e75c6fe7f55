"""DDIM vs the latent-consistency sampler in notebook 06's bias study (issue 17).

The bias study reads h at the sampling steps that match the caption maps' timesteps (``t_maps``) and the retrieval
check's (``retrieval_ts``). A DDIM run of 10 steps has a step at t = 0; a 2-8 step LCM run does not (its last step
is at t ~ 100-260), so :func:`lcm_study_config` snaps every t to the nearest LCM step's own timestep: the caption
maps are then fitted at exactly the noise level the sampled h has. :func:`sampler_comparison` puts the studies
side by side: rho per seed set, the worst set, all sets with its bootstrap interval, and the seed-to-seed spread.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd

from ..models import DiffusionModel
from .prompt_runs import step_index, step_timesteps
from .study import BiasStudy, BiasStudyConfig


def snap_timesteps(model: DiffusionModel, steps: int, timesteps: Sequence[int]) -> list[int]:
    """Each t replaced by the timestep of the sampler step nearest to it (duplicates dropped, order kept)."""
    grid = step_timesteps(model, steps)
    out: list[int] = []
    for t in timesteps:
        s = grid[step_index(model, steps, int(t))]
        if s not in out:
            out.append(int(s))
    return out


def lcm_study_config(cfg: BiasStudyConfig, model: DiffusionModel, steps: int = 4, guidance_scale: float | None = None,
                     label: str | None = None) -> BiasStudyConfig:
    """``cfg`` for ``model``'s LCM sampler: ``steps`` (2-8), its guidance embedding at ``guidance_scale`` (None:
    the model's default), t_maps and retrieval_ts snapped to the LCM steps, sampler label ``"LCM (<n> steps)"``."""
    if model.adapter.sampler != "lcm":
        raise ValueError(f"{model.model_id} samples with {model.adapter.sampler!r}, not 'lcm': pass a latent "
                         "consistency model, e.g. embedded:animals-unet-text-lcm")
    if not isinstance(steps, int) or not 1 <= steps <= 8:
        raise ValueError(f"LCM steps must be an integer in 1..8, got {steps!r}")
    g = model.adapter.default_guidance if guidance_scale is None else float(guidance_scale)
    return replace(cfg, steps=steps, guidance_scale=g, t_maps=snap_timesteps(model, steps, cfg.t_maps),
                   retrieval_ts=snap_timesteps(model, steps, cfg.retrieval_ts), sampler=f"LCM ({steps} steps)",
                   label=cfg.label if label is None else label)


def sampler_comparison(studies: Sequence[BiasStudy]) -> pd.DataFrame:
    """One row per (model, sampler, attribute): rho per seed set, the worst set, all sets with its bootstrap
    interval, the seed-to-seed spread (standard deviation of rho across the seed sets, mean width of the per-set
    bootstrap intervals) and the sampler's steps."""
    rows = []
    for st in studies:
        sets = st.seed_set_labels
        rr = st.rho.set_index(["seed_set", "attribute"])
        for a in st.config.attributes:
            rho = np.array([rr.loc[(s, a), "rho"] for s in sets], float)
            width = np.array([rr.loc[(s, a), "ci_high"] - rr.loc[(s, a), "ci_low"] for s in sets], float)
            row = {"model": st.label, "sampler": st.config.sampler, "steps": st.config.steps, "attribute": a}
            row.update({f"rho set {i + 1}": v for i, v in enumerate(rho)})
            row["rho worst seed set"] = float(rho.min())
            if ("all seed sets", a) in rr.index:
                for c in ("rho", "ci_low", "ci_high"):
                    row[f"{c} all seed sets"] = float(rr.loc[("all seed sets", a), c])
            row["rho spread (sd over sets)"] = float(rho.std(ddof=1)) if len(rho) > 1 else np.nan
            row["mean CI width per set"] = float(width.mean())
            rows.append(row)
    return pd.DataFrame(rows)


def replicate_studies(study: BiasStudy, dataset, retrained_model: str | None = None, lcm_model: str | None = None,
                      lcm_steps: int = 4, lcm_guidance: float | None = None,
                      train_steps: int | None = None) -> list[BiasStudy]:
    """``study`` and its replicates: the same study on the text model retrained from another training seed
    (``retrained_model``, labelled "training seed 1") and on the consistency-distilled model sampled with its LCM
    sampler (``lcm_model``, :func:`lcm_study_config`); either None to skip. The replicates skip the retrieval check
    (it reads the real images, the same for every model)."""
    from ..models import load_model
    from .study import bias_study

    studies = [study]
    base = replace(study.config, retrieval_max_images=0)
    if retrained_model:
        m1 = load_model(retrained_model, train_steps=train_steps)
        studies.append(bias_study(m1, dataset, replace(base, label="training seed 1")))
    if lcm_model:
        m_lcm = load_model(lcm_model, train_steps=train_steps)
        cfg = lcm_study_config(base, m_lcm, lcm_steps, lcm_guidance, label=f"{study.config.label}, LCM-distilled")
        studies.append(bias_study(m_lcm, dataset, cfg))
    return studies
