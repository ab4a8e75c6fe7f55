"""Where to steer: h first, a later block only where h does not move the attribute, judged on held-out seeds.

The method steers h, the bottleneck (``mid_block``). A text model may also hear its words *after* h: cross-attention
in the up-blocks, or a pooled caption added to the time embedding of every ResNet (the embedded text model does
both). An attribute whose word acts mostly downstream then barely moves when only h is steered.
:func:`steer_by_block` tries ``blocks`` in order on **selection seeds**. For each attribute it keeps the first block
where the attribute's mean rises monotonically with the strength and the paired rho reaches ``min_rho``; if no
block gets there, it keeps the block with the highest paired rho. It then measures the kept block on **evaluation
seeds** that took no part in the choice. Each block is steered along its own per-step prompt-pair axis
(:func:`attribute_axes_by_step`), so strength 1 adds what the words do at that block.

>>> res = steer_by_block(model, lat_p, nouns, ["size", "facing"], SteerConfig(), prompt_config)
>>> res.selection   # every block tried on the selection seeds, and the kept one
>>> res.effects     # the kept blocks on the evaluation seeds (steering_effect rows, with their block)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..models import DiffusionModel
from .causal import STEER_AXES, steer_attributes
from .prompt_runs import PromptH, SampleConfig
from .readouts import attribute_prompt_h

EVALUATION_SEED_OFFSET = 1000  # the evaluation seeds start this far from the selection seeds (independent noise)


@dataclass
class SteerConfig:
    """How :func:`steer_by_block` steers and judges (defaults: notebook 06's full profile)."""

    blocks: list[str] = field(default_factory=lambda: ["mid_block", "up_blocks.0"])  # tried in this order: h first
    strengths: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])  # multiples of the axis
    n_seeds: int = 8  # paired seeds per neutral prompt, on each of the selection and evaluation sets
    seed: int = 1  # first selection seed; evaluation seeds start at seed + EVALUATION_SEED_OFFSET
    steps: int = 10
    guidance_scale: float = 1.0  # CFG of the steered runs (the axis is added in both passes)
    axes: str = "per-step"  # "per-step" (each step's own axis) or "mean" (one axis averaged over the steps)
    min_rho: float = 0.7  # paired rho a block must reach (means rising with strength) on the selection seeds

    def validate(self) -> "SteerConfig":
        self.blocks = [str(b) for b in self.blocks]
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks must be a non-empty list without repeats, got {self.blocks!r}")
        self.strengths = sorted({float(s) for s in self.strengths})
        if 0.0 not in self.strengths or len(self.strengths) < 3:
            raise ValueError(f"strengths must include 0 (the unsteered twin) and at least two others, got "
                             f"{self.strengths}")
        if self.axes not in STEER_AXES:
            raise ValueError(f"axes {self.axes!r} is not one of {list(STEER_AXES)}")
        if not -1.0 <= self.min_rho <= 1.0:
            raise ValueError(f"min_rho must be a rank correlation in [-1, 1], got {self.min_rho}")
        for name in ("n_seeds", "steps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        return self

    def sample_config(self, block: str, evaluation: bool) -> SampleConfig:
        """The sampling of the steered runs at ``block``, on the selection or the evaluation seeds."""
        seed = self.seed + (EVALUATION_SEED_OFFSET if evaluation else 0)
        return SampleConfig(block=block, n_seeds=self.n_seeds, seed=seed, steps=self.steps,
                            guidance_scale=self.guidance_scale)


@dataclass
class SteeringResult:
    """What :func:`steer_by_block` measured."""

    strips: dict[str, dict[float, torch.Tensor]]  # attribute -> strength -> evaluation images (kept block)
    effects: pd.DataFrame  # steering_effect rows of the kept blocks on the evaluation seeds, with ``block``
    selection: pd.DataFrame  # one row per (attribute, block tried) on the selection seeds, ``kept`` marks the choice

    def blocks(self) -> dict[str, str]:
        """{attribute: the block it was steered at on the evaluation seeds}."""
        kept = self.selection[self.selection["kept"]]
        return dict(zip(kept["attribute"], kept["block"]))


def _passes(row: pd.Series, min_rho: float) -> bool:
    return bool(row["monotonic"] == 1 and np.isfinite(row["rho_paired"]) and row["rho_paired"] >= min_rho)


def steer_by_block(model: DiffusionModel, lat: PromptH, nouns: Sequence[str], attributes: Sequence[str],
                   config: SteerConfig | None = None, prompt_config: SampleConfig | None = None,
                   progress: bool = True) -> SteeringResult:
    """Steer each attribute at the first of ``config.blocks`` that moves it (module docstring).

    ``lat`` is the attribute prompts' h (:func:`attribute_prompt_h`) at one of the blocks. The other blocks' prompt
    h are sampled with ``prompt_config`` (its ``block`` replaced), only when an attribute reaches them.
    """
    cfg = (config or SteerConfig()).validate()
    lat_block = (lat.config or {}).get("block")
    if lat_block is None:
        raise ValueError("the prompt h carry no block in their config; sample them with attribute_prompt_h")
    lats = {model.resolve_block(lat_block): lat}
    fields = SampleConfig.__dataclass_fields__
    base = prompt_config or SampleConfig(**{k: v for k, v in lat.config.items() if k in fields})

    def lat_at(block: str) -> PromptH:
        key = model.resolve_block(block)
        if key not in lats:
            lats[key] = attribute_prompt_h(model, nouns, attributes, replace(base, block=block), progress=progress)
        return lats[key]

    # strength 0 adds nothing at any block: each seed set's unsteered images are sampled once and reused
    unsteered: dict[bool, torch.Tensor | None] = {False: None, True: None}

    def run(a: str, block: str, evaluation: bool):
        imgs, eff = steer_attributes(model, lat_at(block), nouns, [a], cfg.strengths,
                                     cfg.sample_config(block, evaluation), axes=cfg.axes, progress=progress,
                                     unsteered=unsteered[evaluation])
        unsteered[evaluation] = imgs[a][0.0]
        return imgs[a], eff

    tried, strips, effects = [], {}, []
    for a in attributes:
        rows = []
        for block in cfg.blocks:
            _, eff = run(a, block, evaluation=False)
            row = eff.iloc[0][["attribute", "monotonic", "rho_value_strength", "rho_paired"]].copy()
            row["block"] = block
            rows.append(row)
            if _passes(row, cfg.min_rho):
                break
        sel = pd.DataFrame(rows).reset_index(drop=True)
        sel["passed"] = [_passes(r, cfg.min_rho) for _, r in sel.iterrows()]
        best = int(sel["passed"].to_numpy().argmax()) if sel["passed"].any() else \
            int(sel["rho_paired"].fillna(-np.inf).to_numpy().argmax())
        sel["kept"] = np.arange(len(sel)) == best
        tried.append(sel)
        block = sel["block"].iloc[best]
        strips[a], eff = run(a, block, evaluation=True)
        effects.append(eff.assign(block=block))
    selection = pd.concat(tried, ignore_index=True)[["attribute", "block", "monotonic", "rho_value_strength",
                                                      "rho_paired", "passed", "kept"]]
    return SteeringResult(strips, pd.concat(effects, ignore_index=True), selection)
