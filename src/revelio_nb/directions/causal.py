"""The causal check: add a direction to h while sampling and measure the attribute on the images.

:class:`SteeringHook` (and the :func:`steering` context) adds ``strength * direction`` to a block's image stream
(one vector, or one per timestep); :class:`SteeringHooks` switches several such hooks together (a **site** of
several blocks, each with its own direction); :func:`steer` samples prompts at several strengths;
:func:`steer_attributes` steers every class's neutral prompt along each attribute's prompt-pair axis and
:func:`steering_effect` measures the attribute on the images with the functions that wrote the captions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..captions import ATTRIBUTES, neutral_prompt
from ..capture import HookHandles
from ..models import DiffusionModel
from ..pooling import FLAT
from .axes import attribute_axes_by_step, attribute_axis
from .prompt_runs import PromptH, SampleConfig, block_module, generate, step_timesteps


def _as_direction(direction: Any, out: torch.Tensor) -> torch.Tensor:
    """A direction shaped to add onto a block's image stream: (C,) broadcast over space (or tokens), (C, h, w) or
    (C*h*w,) spatial (for tokens (B, N, D): the grid layout (D, h, w) flattened, put in token order)."""
    d = torch.as_tensor(np.asarray(direction) if not torch.is_tensor(direction) else direction)
    d = d.to(device=out.device, dtype=out.dtype)
    if out.ndim == 4:
        c, h, w = out.shape[1:]
        if d.numel() == c:
            return d.reshape(1, c, 1, 1)
        if d.numel() == c * h * w:
            return d.reshape(1, c, h, w)
    elif out.ndim == 3:  # transformer tokens (B, N, D), row-major over the grid
        n, dim = out.shape[1:]
        if d.numel() == dim:
            return d.reshape(1, 1, -1)
        if d.numel() == n * dim:
            return d.reshape(dim, n).transpose(0, 1).reshape(1, n, dim)
    raise ValueError(
        f"direction with {d.numel()} values does not fit a block output of shape {tuple(out.shape[1:])}: pass "
        f"{out.shape[1] if out.ndim == 4 else out.shape[-1]} (pooled) or {int(np.prod(out.shape[1:]))} (flattened) values"
    )


class SteeringHook(HookHandles):
    """Adds ``strength * direction`` to a block's **image stream** while registered (and while ``active``); the
    text stream of joint (SD3 / FLUX) blocks is left untouched.

    ``direction`` is one vector ((C,), (C, h, w) or (C*h*w,)) or a {timestep: vector} mapping: then the vector of
    the timestep nearest to the denoiser's current one is added (h-space directions change along the trajectory;
    :func:`attribute_axes_by_step` gives one per sampling step).

    >>> with SteeringHook(model, direction, strength=2.0):
    ...     images = sample(model, 8, prompts="a drawing of a cat")
    """

    def __init__(self, model: DiffusionModel, direction: Any, strength: float = 1.0, block: str = "mid_block"):
        block = model.resolve_block(block) if hasattr(model, "resolve_block") else block
        self.module = block_module(model, block)
        self.model = model
        self.denoiser = model.denoiser
        if isinstance(direction, dict):
            if not direction:
                raise ValueError("an empty {timestep: direction} mapping")
            direction = {int(t): v for t, v in direction.items()}
        self.direction = direction
        self.strength = float(strength)
        self.block = block
        self.active = True
        self._t: int | None = None
        self._handles: list = []

    @property
    def per_timestep(self) -> bool:
        """Whether the direction depends on the timestep ({timestep: direction}; the nearest timestep's is added)."""
        return isinstance(self.direction, dict)

    def _record_t(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            t = torch.as_tensor(t)
            self._t = int(t.reshape(-1)[0]) if t.numel() else None

    def current(self) -> Any:
        """The direction added now (for per-timestep directions, the one of the nearest timestep)."""
        if not self.per_timestep:
            return self.direction
        if self._t is None:
            raise RuntimeError(f"per-timestep steering of {self.block!r}: the denoiser ran without a timestep argument")
        keys = np.array(sorted(self.direction))
        return self.direction[int(keys[np.argmin(np.abs(keys - self._t))])]

    def _hook(self, module, args, output):
        if not self.active or self.strength == 0.0:
            return None
        adapter = self.model.adapter
        stream = adapter.image_stream(self.block, module, output)
        if stream is None:
            raise TypeError(f"cannot steer block {self.block!r}: it returns {type(output).__name__}")
        new = stream + self.strength * _as_direction(self.current(), stream)
        return adapter.with_image_stream(self.block, module, output, new)

    def __enter__(self) -> "SteeringHook":
        if self.per_timestep:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._record_t, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(self._hook))
        return self

    def remove(self) -> None:
        super().remove()
        self._t = None


class SteeringHooks:
    """Several :class:`SteeringHook` that act as one: one ``strength`` and one ``active`` switch for all of them
    (e.g. ``up_blocks.0`` and ``up_blocks.1`` steered together, each along its own direction)."""

    def __init__(self, hooks: Sequence[SteeringHook]):
        self.hooks = list(hooks)
        if not self.hooks:
            raise ValueError("no steering hooks given")
        blocks = [h.block for h in self.hooks]
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"a block is steered twice: {blocks}")

    @property
    def blocks(self) -> list[str]:
        return [h.block for h in self.hooks]

    @property
    def strength(self) -> float:
        return self.hooks[0].strength

    @strength.setter
    def strength(self, value: float) -> None:
        for h in self.hooks:
            h.strength = float(value)

    @property
    def active(self) -> bool:
        return self.hooks[0].active

    @active.setter
    def active(self, value: bool) -> None:
        for h in self.hooks:
            h.active = bool(value)

    def __enter__(self) -> "SteeringHooks":
        try:
            for h in self.hooks:
                h.__enter__()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def block_directions(direction: Any, block: str) -> dict[str, Any]:
    """{block: direction} to steer: a non-empty dict keyed by block **names** (str) steers those blocks together;
    anything else (a vector, or a {timestep (int): vector} mapping) steers ``block`` alone."""
    if isinstance(direction, dict) and direction and all(isinstance(k, str) for k in direction):
        return dict(direction)
    return {block: direction}


@contextmanager
def steering(model: DiffusionModel, direction: Any, strength: float = 1.0, block: str = "mid_block") -> Iterator[SteeringHook]:
    with SteeringHook(model, direction, strength, block) as hook:
        yield hook


def steer(model: DiffusionModel, prompts: str | Sequence[str], direction: Any, strengths: Sequence[float],
          config: SampleConfig | None = None, steer_steps: Sequence[int] | None = None,
          progress: bool = True, sampled: dict[float, torch.Tensor] | None = None) -> dict[float, torch.Tensor]:
    """Images for each strength: the prompts sampled (paired seeds) with ``strength * direction`` added to h.

    ``direction`` is added at ``config.block``; a {block name: direction} dict instead adds each direction at its
    block, all at the same strength (:func:`block_directions`). Returns {strength: images in [-1, 1]
    (len(prompts) * n_seeds, C, H, W)}; strength 0 is the unsteered baseline.
    ``sampled``: {strength: images} already sampled with the same prompts, direction and config, reused instead of
    sampled again (each strength is sampled on its own, so its images depend on nothing else; strength 0 adds
    nothing, so its images hold for any direction or block).
    """
    cfg = (config or SampleConfig()).validate()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampled = {float(s): x for s, x in (sampled or {}).items()}
    for s, x in sampled.items():
        if len(x) != len(prompts) * cfg.n_seeds:
            raise ValueError(f"sampled[{s:g}] holds {len(x)} images; {len(prompts)} prompts x {cfg.n_seeds} seeds "
                             f"= {len(prompts) * cfg.n_seeds} expected")
    out = {}
    hooks = [SteeringHook(model, d, 0.0, b) for b, d in block_directions(direction, cfg.block).items()]
    with SteeringHooks(hooks) as hook:
        for s in tqdm(list(strengths), desc="steer", disable=not progress, leave=False):
            if float(s) in sampled:
                out[float(s)] = sampled[float(s)]
                continue
            hook.strength = float(s)
            out[float(s)] = generate(model, prompts, cfg, steer=hook, steer_steps=steer_steps, progress=False)
    return out


STEER_AXES = ("per-step", "mean")


def steer_attributes(model: DiffusionModel, lat: PromptH | dict[str, PromptH], nouns: Sequence[str],
                     attributes: Sequence[str], strengths: Sequence[float], config: SampleConfig | None = None,
                     axes: str = "per-step", template: str | None = None, progress: bool = True,
                     unsteered: torch.Tensor | None = None,
                     sampled: dict[str, dict[float, torch.Tensor]] | None = None
                     ) -> tuple[dict[str, dict[float, torch.Tensor]], pd.DataFrame]:
    """The causal check for several attributes: every noun's neutral prompt sampled (``config``, paired seeds) with
    ``strength *`` the attribute's prompt-pair axis added to h, and the attribute measured on the images.

    The axis is the flattened, unnormalised mean difference of h between the high- and low-word prompts of
    ``lat`` (:func:`attribute_axis`): with ``axes="per-step"`` one per sampling step of ``lat``'s run, added at
    the matching timestep (:func:`attribute_axes_by_step`; strength 1 adds what the words do to h at each step);
    with ``axes="mean"`` one axis averaged over the steps, added at every step. ``lat`` is the attribute prompts' h
    at ``config.block``, or a {block: prompt h at that block} dict: a site of several blocks steered together,
    each along its own axis, at the same strength (``config.block`` is then not used). The unsteered images
    (strength 0) are sampled once for all attributes, or taken from ``unsteered``; ``sampled`` ({attribute:
    {strength: images}}, from the same ``lat``, nouns and config) are reused too (:func:`steer`). Returns
    ({attribute: {strength: images}}, :func:`steering_effect` rows of every attribute).
    """
    if axes not in STEER_AXES:
        raise ValueError(f"axes {axes!r} is not one of {list(STEER_AXES)}")
    cfg = (config or SampleConfig()).validate()
    site = dict(lat) if isinstance(lat, dict) else {cfg.block: lat}
    if not site:
        raise ValueError("no prompt h given: pass the attribute prompts' h, or a {block: prompt h} dict")
    for block, h in site.items():
        lat_block = (h.config or {}).get("block")
        if lat_block is not None and model.resolve_block(lat_block) != model.resolve_block(block):
            raise ValueError(f"the prompt h were captured at {lat_block!r} but the axis would be added at {block!r}: "
                             f"an axis must be added where it was measured (sample the prompts at {block!r}, or "
                             f"steer {lat_block!r})")
    kw = {} if template is None else {"template": template}
    prompts = [neutral_prompt(n, **kw) for n in nouns]
    strips, effects = {}, []
    for a in attributes:
        direction = {block: _attribute_direction(model, h, nouns, a, axes, template) for block, h in site.items()}
        known = {**(sampled or {}).get(a, {}), **({} if unsteered is None else {0.0: unsteered})}
        strips[a] = steer(model, prompts, direction, strengths, cfg, progress=progress, sampled=known)
        unsteered = strips[a].get(0.0, unsteered)
        effects.append(steering_effect(strips[a], a))
    return strips, pd.concat(effects, ignore_index=True)


def _attribute_direction(model: DiffusionModel, lat: PromptH, nouns: Sequence[str], attribute: str, axes: str,
                         template: str | None) -> Any:
    """One attribute's steering direction from prompt h: {timestep: axis} per step, or the step-mean axis."""
    if axes == "per-step":
        steps = int((lat.config or {}).get("steps") or len(lat.capture_steps or []))
        return attribute_axes_by_step(lat, nouns, attribute, step_timesteps(model, steps), template=template)
    return attribute_axis(lat, nouns, attribute, form=FLAT, normalise=False, template=template)


def steering_effect(images: dict[float, Any], attribute: str, prompts: Sequence[str] | None = None,
                    n_seeds: int | None = None) -> pd.DataFrame:
    """Measure ``attribute`` on steered images: mean, sem and the share of images whose value went up versus
    the same seed at strength 0 (paired). One row per strength, plus the monotonicity of the means
    (``monotonic``: +1 increasing, -1 decreasing, 0 neither), Spearman rho of value vs strength over all images
    (``rho_value_strength``: class and seed differences count as noise) and, when strength 0 is among them, rho
    of each image's change from its unsteered twin (same prompt and seed) vs strength (``rho_paired``)."""
    from scipy.stats import spearmanr

    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {list(ATTRIBUTES)}")
    strengths = sorted(images)
    vals = {s: ATTRIBUTES[attribute].measure(images[s]) for s in strengths}
    base = vals.get(0.0)
    rows = []
    for s in strengths:
        v = vals[s]
        rows.append({"attribute": attribute, "strength": s, "mean": float(v.mean()),
                     "sem": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0,
                     "frac_up_vs_0": float((v > base).mean()) if base is not None else np.nan, "n": len(v)})
    df = pd.DataFrame(rows)
    diffs = np.diff(df["mean"].to_numpy())
    df["monotonic"] = 1 if (diffs > 0).all() else (-1 if (diffs < 0).all() else 0)
    allv = np.concatenate([vals[s] for s in strengths])
    alls = np.concatenate([[s] * len(vals[s]) for s in strengths])
    varied = len(strengths) > 1 and np.ptp(allv) > 0
    df["rho_value_strength"] = float(spearmanr(alls, allv)[0]) if varied else np.nan
    if base is not None and len(strengths) > 1 and all(len(vals[s]) == len(base) for s in strengths):
        change = np.concatenate([vals[s] - base for s in strengths])  # each image against its own unsteered twin
        df["rho_paired"] = float(spearmanr(alls, change)[0]) if np.ptp(change) > 0 else np.nan
    return df
