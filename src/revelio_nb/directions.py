"""Decoding Diffusion: natural-language directions in h-space (the UNet bottleneck), with no training.

``METHODS.md`` section 2, in five parts, all working on any text-conditioned :class:`~revelio_nb.models.DiffusionModel`
(the embedded ``animals-unet-text`` or an SD-family pipeline loaded by hub id or folder):

1. **Prompt latents** (:func:`prompt_latents`): each prompt is sampled with S paired seeds (every prompt starts
   from the same S noises, so differences between prompts are not noise), h = the output of ``mid_block`` is
   captured at every denoising step of the conditional branch, averaged over seeds (and steps, or chosen steps),
   in pooled (C,) and flattened (C*h*w) forms; a reference mean is subtracted.
2. **Directions** (:func:`concept_direction`, :func:`attribute_axis`): differences of prompt latents that differ
   by one word, and attribute axes from word pairs averaged over nouns.
3. **Caption mapping** (:func:`caption_features`, :func:`fit_word_map`): real images with captions are noised to
   t, h is captured, and caption words are tied to h by a difference of means and by ridge regression. Any
   direction (a prompt difference, a PCA axis, an SAE decoder row: any (n, d) array) is then *named* by the words
   whose directions align with it most (:meth:`WordMap.name`).
4. **Bias** (:func:`bias_scores`): neutral prompts ("a drawing of a cat") projected on each attribute axis;
   ranking, clustering (:func:`cluster_prompts`), and the same scores on the text encoder's own embeddings
   (:func:`text_encoder_latents`) as the baseline; :func:`compare_with_ground_truth` gives Spearman rho against
   the attribute rates of the training captions. :func:`caption_axis_bias` reads the bias along caption-map word
   axes; with every seed's h kept (``keep_seeds``), :func:`bootstrap_rho` / :func:`rho_by_seed_set` give rho on
   independent seed sets with bootstrap intervals over the (paired) seeds, and :func:`caption_retrieval` checks
   that h of real images noised to t retrieves its own class's prompt latent (the method's image-conditioning
   check). :mod:`revelio_nb.bias_study` runs the whole study.
5. **Causal check** (:func:`steer`, :func:`steer_attributes`, :func:`steering_effect`): add ``strength *
   direction`` to h during sampling (one direction, or one per timestep) and measure the attribute on the generated
   images with the same functions that wrote the captions.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import artifacts
from .captions import ATTRIBUTES, attribute_prompt, neutral_prompt
from .hooks import validate_blocks
from .models import DiffusionModel
from .paths import atomic_path, atomic_write_json

FORMS = ("pooled", "flat")
SCORE_METHODS = ("axis", "pair")
CENTRES = ("class", "global")
CONDITIONS = ("neutral", "caption")
H_CONDITIONS = ("prompt", "neutral")
DEFAULT_STOPWORDS = frozenset({"a", "an", "the", "of", "drawing", "photo", "facing", "with", "and", "in", "on"})


# ============================================================================ sampling with capture / steering


@dataclass
class SampleConfig:
    """How prompts are sampled when their h is captured (or steered)."""

    block: str = "mid_block"
    n_seeds: int = 8  # S paired seeds per prompt (the same S starting noises for every prompt)
    seed: int = 0
    steps: int = 10  # DDIM steps
    guidance_scale: float = 1.0  # > 1: classifier-free guidance (h is taken from the conditional branch)
    capture_steps: list[int] | None = None  # denoising step indices averaged into a prompt latent; None = all
    h_condition: str = "prompt"  # "prompt": h of the conditional pass (the paper's); "neutral": h of a neutral-prompt
    # pass on the same x_t (the drawing's content without the prompt's direct cross-attention input; free under CFG)
    batch_size: int = 64  # images per denoiser call (CFG doubles it)
    image_size: int | None = None  # None: the model's native size

    def validate(self) -> "SampleConfig":
        for name in ("n_seeds", "steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise ValueError(f"image_size must be None (the model's native size) or positive, got {self.image_size!r}")
        if self.capture_steps is not None:
            self.capture_steps = sorted({int(s) for s in self.capture_steps})
            bad = [s for s in self.capture_steps if not 0 <= s < self.steps]
            if bad or not self.capture_steps:
                raise ValueError(f"capture_steps {bad or self.capture_steps} outside 0..{self.steps - 1} (steps={self.steps})")
        if self.h_condition not in H_CONDITIONS:
            raise ValueError(f"h_condition {self.h_condition!r} is not one of {list(H_CONDITIONS)}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        return self


def _block_module(model: DiffusionModel, block: str) -> torch.nn.Module:
    validate_blocks(model.denoiser, [block])
    return dict(model.denoiser.named_modules())[block]


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


class SteeringHook:
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
        self.module = _block_module(model, block)
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

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._t = None


@contextmanager
def steering(model: DiffusionModel, direction: Any, strength: float = 1.0, block: str = "mid_block") -> Iterator[SteeringHook]:
    with SteeringHook(model, direction, strength, block) as hook:
        yield hook


def _scheduler(model: DiffusionModel, steps: int, size: int | None = None):
    """The model family's sampler (:class:`revelio_nb.sampling.Sampler`) for ``steps`` steps; ``.timesteps``."""
    from .sampling import Sampler

    hw = model.latent_shape(1, size or model.native_image_size)[-2:]
    return Sampler(model, steps, latent_hw=hw)


def step_index(model: DiffusionModel, steps: int, t: int) -> int:
    """The sampler step (0 = pure noise) whose noise level is closest to that of user timestep ``t``, e.g. to read
    h of sampled prompts at the timestep of the caption map (``SampleConfig(capture_steps=[step_index(m, steps, t_map)])``)."""
    sampler = _scheduler(model, steps)
    ts = np.asarray([float(v) for v in sampler.timesteps])
    hw = model.latent_shape(1, model.native_image_size)[-2:]
    return int(np.argmin(np.abs(ts - float(model.model_timestep(t, hw)))))


def step_timesteps(model: DiffusionModel, steps: int) -> list[int]:
    """The timestep of every DDIM step (index 0 = pure noise) of a ``steps``-step run."""
    return [int(t) for t in _scheduler(model, steps).timesteps]


def _start_noise(model: DiffusionModel, n_seeds: int, seed: int, size: int) -> torch.Tensor:
    """The same starting noise :func:`revelio_nb.sampling.sample` draws for ``n=n_seeds, seed=seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.latent_shape(n_seeds, size), generator=g)


def _cat_cond(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in a.items():
        out[k] = _cat_cond(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k].expand(len(b[k]), *v.shape[1:])])
    return out


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: Sequence[str],
    config: SampleConfig | None = None,
    *,
    on_h: Callable[[int, int, dict[str, torch.Tensor]], None] | None = None,
    steer: SteeringHook | None = None,
    steer_steps: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "sample",
) -> torch.Tensor:
    """Sample every prompt with the same ``n_seeds`` starting noises, with the model family's sampler
    (:func:`revelio_nb.sampling.denoise_loop`: DDIM eta=0 with optional CFG, flow Euler, or LCM).

    Returns images in [-1, 1], (len(prompts) * n_seeds, C, H, W), prompt-major. For one prompt this equals
    ``sampling.sample(model, n_seeds, prompts=p, seed=seed, steps=steps, guidance_scale=g)``.
    ``on_h(prompt_index, step, hs)`` receives, at every step, ``hs = {"prompt": h}`` (the image stream of
    ``config.block`` in the conditional pass, as a map (n_seeds, C, h, w); ``"mid_block"`` on a transformer means its
    h block) plus ``hs["neutral"]`` (the same block in the neutral-prompt pass on the same x_t) whenever that pass
    runs: under CFG, or when ``h_condition`` asks for it (then it is an extra pass that does not change the images,
    run only at ``capture_steps`` when they are given). ``steer`` (a registered :class:`SteeringHook`) is switched on
    only at ``steer_steps`` if given; under CFG it is added in both passes. Models that take guidance as an input
    (LCM, FLUX-dev) get ``guidance_scale`` there and run no CFG batch; an LCM's re-noising is seeded and paired
    across prompts like the starting noise.
    """
    from .hooks import image_stream_map
    from .sampling import denoise_loop

    cfg = (config or SampleConfig()).validate()
    if not getattr(model, "takes_prompts", False):
        raise ValueError(f"{model.model_id} ({model.kind}) is not text-conditioned; Decoding Diffusion needs prompts")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    size = model.check_image_size(cfg.image_size or model.native_image_size)
    x0 = _start_noise(model, cfg.n_seeds, cfg.seed, size)
    guided = cfg.guidance_scale != 1.0 and model.adapter.uses_cfg()
    extra_neutral = not guided and on_h is not None and cfg.h_condition != "prompt"
    neutral_at = None if guided or cfg.capture_steps is None else set(cfg.capture_steps)

    def two_pass(step: int) -> bool:
        return guided or (extra_neutral and (neutral_at is None or step in neutral_at))
    per_chunk = max(1, cfg.batch_size // cfg.n_seeds)
    block = model.resolve_block(cfg.block)
    module = _block_module(model, block) if on_h is not None else None
    out = []
    chunks = [prompts[i : i + per_chunk] for i in range(0, len(prompts), per_chunk)]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    for ci, chunk in enumerate(chunks):
        first = ci * per_chunk
        n = len(chunk) * cfg.n_seeds
        cond = model.conditioning(n, prompts=[p for p in chunk for _ in range(cfg.n_seeds)], guidance=cfg.guidance_scale)
        cond2 = _cat_cond(cond, model.conditioning(n, guidance=cfg.guidance_scale)) if guided or extra_neutral else None
        x = x0.repeat(len(chunk), 1, 1, 1).to(model.device, model.dtype)
        hw = tuple(x.shape[-2:])
        g = torch.Generator().manual_seed(cfg.seed)
        torch.randn(x0.shape, generator=g)  # re-noising (LCM) continues the start-noise stream, as in sample()

        def noise_fn(shape, g=g, k=len(chunk)):
            return torch.randn((cfg.n_seeds, *shape[1:]), generator=g).repeat(k, *([1] * (len(shape) - 1)))
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if module is not None:
            def grab(mod, args, output, n=n, hw=hw):
                h = image_stream_map(model, block, mod, output, hw).detach()
                captured["prompt"] = h[:n]
                if len(h) > n:
                    captured["neutral"] = h[n:]
            handle = module.register_forward_hook(grab)

        def predict(i: int, t, x_t: torch.Tensor, cond=cond, cond2=cond2, first=first, chunk=chunk) -> torch.Tensor:
            if steer is not None:
                steer.active = steer_steps is None or i in steer_steps
            both = two_pass(i)
            eps = model.predict(torch.cat([x_t, x_t]) if both else x_t, t, cond2 if both else cond)
            if both:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg.guidance_scale * (eps_c - eps_u) if guided else eps_c
            if on_h is not None:
                hs = {k: v.float().cpu() for k, v in captured.items()}
                captured.clear()
                for j in range(len(chunk)):
                    on_h(first + j, i, {k: v[j * cfg.n_seeds : (j + 1) * cfg.n_seeds] for k, v in hs.items()})
            return eps
        try:
            x = denoise_loop(model, x, cfg.steps, predict, generator=g, noise_fn=noise_fn)
        finally:
            if handle is not None:
                handle.remove()
            if steer is not None:
                steer.active = True
        out.append(model.decode_latents(x).float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


# ============================================================================ 1. prompt latents


@dataclass
class PromptLatents:
    """One h vector per prompt (averaged over seeds and steps), pooled and flattened, with the reference mean.

    ``pooled``/``flat`` are *uncentred*; :meth:`get` subtracts the reference. ``pooled_steps`` keeps the
    per-step seed means (P, steps, C) for step-wise analyses.
    """

    prompts: list[str]
    pooled: np.ndarray  # (P, C)
    flat: np.ndarray | None  # (P, C*h*w) or None (e.g. text-encoder embeddings)
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # form -> (d,) mean subtracted by get()
    pooled_steps: np.ndarray | None = None  # (P, steps, C)
    shape: tuple[int, ...] | None = None  # (C, h, w) of the block output
    flat_steps: np.ndarray | None = None  # (P, len(capture_steps), C*h*w): flat h of each capture step, when > 1
    capture_steps: list[int] | None = None  # the steps averaged into ``flat``
    images: np.ndarray | None = None  # uint8 (P, S, H, W, C) when kept (see :meth:`images_of`)
    flat_seeds: np.ndarray | None = None  # float16 (P, S, len(capture_steps), C*h*w): each seed's flat h at each
    # capture step, when kept (``prompt_latents(keep_seeds=True)``): for bootstrap intervals over seeds
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        self._index = {p: i for i, p in enumerate(self.prompts)}
        if not self.reference:
            self.set_reference()

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._index

    def forms(self) -> list[str]:
        return [f for f in FORMS if self.raw(f) is not None]

    def raw(self, form: str = "pooled") -> np.ndarray | None:
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; valid: {list(FORMS)}")
        return self.pooled if form == "pooled" else self.flat

    def set_reference(self, reference: "PromptLatents | Sequence[str] | None" = None) -> "PromptLatents":
        """Subtract the mean of ``reference`` (another PromptLatents, or a subset of these prompts; default: all)."""
        for form in FORMS:
            arr = self.raw(form)
            if arr is None:
                continue
            if reference is None:
                self.reference[form] = arr.mean(0)
            elif isinstance(reference, PromptLatents):
                self.reference[form] = reference.raw(form).mean(0)
            else:
                self.reference[form] = arr[self.indices(list(reference))].mean(0)
        return self

    def at_step(self, step: int) -> "PromptLatents":
        """These prompts' latents from one capture step alone (flat and pooled h of that step, same reference
        rule: the mean over these prompts)."""
        if not self.capture_steps or step not in self.capture_steps:
            raise ValueError(f"step {step} was not captured; capture_steps: {self.capture_steps}")
        k = self.capture_steps.index(step)
        flat = self.flat if len(self.capture_steps) == 1 else self.flat_steps[:, k]
        pooled = self.pooled_steps[:, step] if self.pooled_steps is not None else self.pooled
        seeds = self.flat_seeds[:, :, k : k + 1] if self.flat_seeds is not None else None
        return PromptLatents(self.prompts, pooled, flat, shape=self.shape, images=self.images,
                             source=f"{self.source} @ step {step}", config=self.config, capture_steps=[step],
                             flat_seeds=seeds)

    @property
    def n_seeds(self) -> int | None:
        """Seeds per prompt behind these latents (None when unknown, e.g. text-encoder embeddings)."""
        if self.flat_seeds is not None:
            return int(self.flat_seeds.shape[1])
        n = self.config.get("n_seeds") if self.config else None
        return None if n is None else int(n)

    def images_of(self, prompts: str | Sequence[str]) -> np.ndarray:
        """The kept images of some prompts, all seeds, stacked: uint8 (sum of seeds, H, W, C)."""
        if self.images is None:
            raise ValueError("these prompt latents kept no images: compute them with keep_images=True")
        idx = self.indices([prompts] if isinstance(prompts, str) else list(prompts))
        return self.images[idx].reshape(-1, *self.images.shape[2:])

    def indices(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"prompts not in these latents: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return np.array([self._index[p] for p in prompts], dtype=np.int64)

    def get(self, prompts: str | Sequence[str] | None = None, form: str = "pooled") -> np.ndarray:
        """Centred latents (reference subtracted) of some prompts (all by default); one prompt -> (d,)."""
        arr = self.raw(form)
        if arr is None:
            raise ValueError(f"these latents ({self.source}) have no {form!r} form; available: {self.forms()}")
        if prompts is None:
            return arr - self.reference[form]
        single = isinstance(prompts, str)
        idx = self.indices([prompts] if single else list(prompts))
        out = arr[idx] - self.reference[form]
        return out[0] if single else out


def _save_run(folder: Path, prompts: list[str], arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "latents.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    atomic_write_json(folder / "latents.json", {"prompts": prompts, **meta})


def _load_run(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    from safetensors.numpy import load_file

    if not ((folder / "latents.json").is_file() and (folder / "latents.safetensors").is_file()):
        return None
    return load_file(str(folder / "latents.safetensors")), json.loads((folder / "latents.json").read_text())


def _latents_from_run(arrays: dict[str, np.ndarray], meta: dict[str, Any], condition: str, capture_steps,
                      config: dict[str, Any]) -> PromptLatents:
    steps = arrays[f"{condition}.pooled_steps"]
    idx = list(range(steps.shape[1])) if capture_steps is None else list(capture_steps)
    flat_steps = arrays.get(f"{condition}.flat_steps")
    return PromptLatents(meta["prompts"], steps[:, idx].mean(1).astype(np.float32), arrays[f"{condition}.flat"],
                         pooled_steps=steps, shape=tuple(meta["shape"]), images=arrays.get("images"),
                         source=f"{meta['source']} (h: {condition} pass)", config=config,
                         flat_steps=flat_steps, capture_steps=list(meta["capture_steps"]),
                         flat_seeds=arrays.get(f"{condition}.flat_seeds"))


def prompt_latents(
    model: DiffusionModel,
    prompts: Sequence[str],
    config: SampleConfig | None = None,
    *,
    keep_images: bool = False,
    keep_seeds: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> PromptLatents:
    """h of every prompt: sampled with ``n_seeds`` paired seeds, captured at each step, averaged over seeds and
    (``capture_steps`` of) steps. ``config.h_condition`` picks the pass h is read from ("prompt" or "neutral",
    see :class:`SampleConfig`). Cached by (model identity, prompts, sampling config) under ``cache_dir("directions")``;
    a run that had both passes (CFG) serves both conditions. The reference mean defaults to the mean over these
    prompts (change it with :meth:`PromptLatents.set_reference`).
    """
    cfg = (config or SampleConfig()).validate()
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError("no prompts given")
    folder = artifacts.prompt_latents_dir(model, prompts, cfg, keep_images, keep_seeds)
    if cache and (hit := _load_run(folder)) is not None and f"{cfg.h_condition}.flat" in hit[0]:
        return _latents_from_run(*hit, cfg.h_condition, cfg.capture_steps, asdict(cfg))
    n_p, steps = len(prompts), cfg.steps
    keep = sorted(cfg.capture_steps) if cfg.capture_steps is not None else list(range(steps))
    acc: dict[str, np.ndarray] = {}
    shape: list[tuple[int, ...]] = []

    def on_h(p: int, i: int, hs: dict[str, torch.Tensor]) -> None:
        for cond, h in hs.items():
            if f"{cond}.flat" not in acc:
                shape[:] = [tuple(h.shape[1:])]
                # NaN marks steps without this pass (the extra neutral pass runs only at capture_steps)
                acc[f"{cond}.pooled_steps"] = np.full((n_p, steps, h.shape[1]), np.nan, np.float32)
                acc[f"{cond}.flat"] = np.zeros((n_p, int(np.prod(h.shape[1:]))), np.float64)
                if len(keep) > 1:
                    acc[f"{cond}.flat_steps"] = np.zeros((n_p, len(keep), int(np.prod(h.shape[1:]))), np.float32)
                if keep_seeds:
                    acc[f"{cond}.flat_seeds"] = np.zeros((n_p, len(h), len(keep), int(np.prod(h.shape[1:]))),
                                                         np.float16)
            hm = h.mean(0)  # mean over seeds
            acc[f"{cond}.pooled_steps"][p, i] = hm.flatten(1).mean(1).numpy() if hm.ndim > 1 else hm.numpy()
            if i in keep:
                acc[f"{cond}.flat"][p] += hm.reshape(-1).double().numpy() / len(keep)
                if len(keep) > 1:
                    acc[f"{cond}.flat_steps"][p, keep.index(i)] = hm.reshape(-1).numpy()
                if keep_seeds:
                    acc[f"{cond}.flat_seeds"][p, :, keep.index(i)] = h.reshape(len(h), -1).numpy()

    images = generate(model, prompts, cfg, on_h=on_h, progress=progress, desc="prompt latents")
    arrays = {k: v if v.dtype == np.float16 else v.astype(np.float32) for k, v in acc.items()}
    if keep_images:
        from .sampling import to_uint8

        u8 = to_uint8(images)
        arrays["images"] = u8.reshape(n_p, cfg.n_seeds, *u8.shape[1:])
    meta = {"shape": shape[0], "source": model.model_id, "capture_steps": sorted(keep)}
    if cache:
        _save_run(folder, prompts, arrays, meta)
    return _latents_from_run(arrays, {"prompts": prompts, **meta}, cfg.h_condition, cfg.capture_steps, asdict(cfg))


@torch.no_grad()
def text_encoder_latents(model: DiffusionModel, prompts: Sequence[str], batch_size: int = 128) -> PromptLatents:
    """Baseline: the model's own text encoder, mean-pooled over non-padding tokens (one vector per prompt)."""
    if model.text_encoder is None or model.tokenizer is None:
        raise ValueError(f"{model.model_id} has no text encoder to compute a baseline with")
    prompts = list(dict.fromkeys(prompts))
    max_len = int(model.info.get("text_max_length") or min(getattr(model.tokenizer, "model_max_length", 77) or 77, 77))
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = model.tokenizer(prompts[i : i + batch_size], padding="max_length", max_length=max_len, truncation=True,
                              return_tensors="pt")
        dev = next(model.text_encoder.parameters()).device
        hidden = model.text_encoder(tok.input_ids.to(dev))[0].float()
        mask = tok.attention_mask.to(dev).unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
    return PromptLatents(prompts, np.concatenate(out).astype(np.float32), None, source=f"text encoder of {model.model_id}")


# ============================================================================ 2. directions


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def concept_direction(lat: PromptLatents, with_word: str | Sequence[str], without: str | Sequence[str],
                      form: str = "pooled", normalise: bool = True) -> np.ndarray:
    """h(with) - h(without), averaged over prompt pairs (e.g. "a drawing of a large cat" - "a drawing of a cat")."""
    a = np.atleast_2d(lat.get([with_word] if isinstance(with_word, str) else list(with_word), form))
    b = np.atleast_2d(lat.get([without] if isinstance(without, str) else list(without), form))
    if len(a) != len(b):
        raise ValueError(f"{len(a)} prompts with the word but {len(b)} without: pass pairs")
    d = (a - b).mean(0)
    return _unit(d) if normalise else d


def attribute_prompts(nouns: Sequence[str], attributes: Sequence[str] | None = None,
                      template: str | None = None) -> dict[str, Any]:
    """Every prompt the bias analysis needs: neutral and one-word prompts per noun (see :func:`captions.attribute_prompt`)."""
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    neutral = {n: neutral_prompt(n, **kw) for n in nouns}
    pairs = {(n, a, w): attribute_prompt(n, a, w, **kw) for n in nouns for a in attributes for w in ATTRIBUTES[a].words}
    return {"neutral": neutral, "pairs": pairs, "all": list(neutral.values()) + list(pairs.values())}


def attribute_axis(lat: PromptLatents, nouns: Sequence[str], attribute: str, form: str = "pooled",
                   normalise: bool = True, template: str | None = None) -> np.ndarray:
    """Axis of an attribute from its word pair, averaged over nouns: mean_n [h(high, n) - h(low, n)]."""
    a = ATTRIBUTES[attribute]
    kw = {} if template is None else {"template": template}
    high = [attribute_prompt(n, attribute, a.high, **kw) for n in nouns]
    low = [attribute_prompt(n, attribute, a.low, **kw) for n in nouns]
    return concept_direction(lat, high, low, form, normalise)


def attribute_axes_by_step(lat: PromptLatents, nouns: Sequence[str], attribute: str, timesteps: Sequence[int],
                           form: str = "flat", normalise: bool = False,
                           template: str | None = None) -> dict[int, np.ndarray]:
    """The attribute axis of each captured sampling step, keyed by that step's timestep ({t: axis}), for
    steering with the direction h actually takes at each step (:class:`SteeringHook` takes the mapping).

    ``timesteps`` lists the timestep of every step of the run behind ``lat`` (:func:`step_timesteps`).
    """
    if not lat.capture_steps:
        raise ValueError(f"these latents ({lat.source}) have no capture steps")
    if len(timesteps) <= max(lat.capture_steps):
        raise ValueError(f"{len(timesteps)} timesteps given, but step {max(lat.capture_steps)} was captured")
    return {int(timesteps[s]): attribute_axis(lat.at_step(s), nouns, attribute, form, normalise, template)
            for s in lat.capture_steps}


def word_axis(word_map: "WordMap", attribute: str, method: str = "mean_diff") -> np.ndarray:
    """An attribute axis from the caption map: word vector of the high word minus that of the low word (unit);
    ``method``: "mean_diff", "ridge" or "whitened" (see :func:`fit_word_map`)."""
    a = ATTRIBUTES[attribute]
    return _unit(word_map.word(a.high, method) - word_map.word(a.low, method))


def bias_scores(lat: PromptLatents, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                form: str = "pooled", method: str = "axis", centre: str = "global",
                axes: dict[str, np.ndarray] | None = None, template: str | None = None) -> pd.DataFrame:
    """How much each neutral prompt leans to the high word of each attribute.

    ``method="axis"`` (the paper's): projection of the neutral latent on the unit attribute axis, by default
    the prompt-pair axis averaged over nouns (:func:`attribute_axis`), or ``axes[attribute]`` when given (e.g.
    :func:`word_axis` from the caption map). ``centre``: "global" (the paper's) subtracts the reference mean of
    the latents; "class" subtracts the mean of the noun's own prompts (neutral + its attribute prompts present),
    so a noun's identity offset, which has nothing to do with the attribute, cannot leak into the projection.
    ``method="pair"``: where the neutral latent of a noun falls between its own low and high prompts,
    <h_n - h_low, h_high - h_low> / |h_high - h_low|^2 (0 = like the low prompt, 1 = like the high).
    One row per (noun, attribute) with ``score``; ranks within an attribute in ``rank`` (1 = most "high").
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(SCORE_METHODS)}")
    if centre not in CENTRES:
        raise ValueError(f"unknown centre {centre!r}; valid: {list(CENTRES)}")
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    refs = {}
    if method == "axis" and centre == "class":
        for noun in nouns:
            own = [neutral_prompt(noun, **kw)] + [attribute_prompt(noun, a, w, **kw) for a in attributes
                                                  for w in ATTRIBUTES[a].words]
            present = [p for p in own if p in lat]
            if present:  # (a noun with no prompt at all fails below with the missing neutral prompt)
                refs[noun] = lat.get(present, form).mean(0)
    rows = []
    for attr in attributes:
        a = ATTRIBUTES[attr]
        axis = None
        if method == "axis":
            axis = _unit(axes[attr]) if axes is not None else attribute_axis(lat, nouns, attr, form, template=template)
        for noun in nouns:
            h = lat.get(neutral_prompt(noun, **kw), form)
            if method == "axis":
                score = float((h - refs[noun]) @ axis) if centre == "class" else float(h @ axis)
            else:
                hi = lat.get(attribute_prompt(noun, attr, a.high, **kw), form)
                lo = lat.get(attribute_prompt(noun, attr, a.low, **kw), form)
                d = hi - lo
                score = float((h - lo) @ d / max(float(d @ d), 1e-12))
            rows.append({"class": noun, "attribute": attr, "high": a.high, "low": a.low, "score": score})
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min").astype(int)
    return df


def _neutral_indices(lat: PromptLatents, nouns: Sequence[str], template: str | None) -> np.ndarray:
    kw = {} if template is None else {"template": template}
    return lat.indices([neutral_prompt(n, **kw) for n in nouns])


def _step_axes(lat: PromptLatents, word_maps: dict[int, "WordMap"], attributes: list[str], method: str) -> list:
    if not word_maps:
        raise ValueError("no word maps given: pass {capture step: WordMap}")
    missing = [s for s in word_maps if not lat.capture_steps or s not in lat.capture_steps]
    if missing:
        raise ValueError(f"steps {missing} were not captured; capture_steps: {lat.capture_steps}")
    return [np.stack([word_axis(wm, a, method) for a in attributes]) for wm in word_maps.values()]


def _pool(h: np.ndarray, lat: PromptLatents, form: str) -> np.ndarray:
    """Flat h (..., C*h*w) -> the requested form (pooled: mean over space)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {list(FORMS)}")
    if form == "flat":
        return h
    if lat.shape is None:
        raise ValueError("pooled projections of flat h need the block's output shape (lat.shape)")
    return h.reshape(*h.shape[:-1], lat.shape[0], -1).mean(-1)


def mirror_axis(axis: np.ndarray, shape: Sequence[int], parity: int) -> np.ndarray:
    """The part of a flattened spatial axis ((C*h*w,), block output ``shape`` (C, h, w)) with the given mirror
    parity: (a + parity * mirrored a) / 2, mirrored = flipped left-right. An attribute that survives mirroring
    the image (size, shape, texture: parity +1) has a mirror-symmetric axis, one that flips sign (facing: -1) an
    antisymmetric one; the other part is estimation noise (or something else the words co-occur with), since h of a
    mirrored image is close to the mirrored h (convolutions, up to their kernels' own asymmetry)."""
    if parity not in (1, -1):
        raise ValueError(f"mirror parity must be +1 or -1, got {parity!r}")
    a = np.asarray(axis, dtype=np.float64)
    if len(shape) != 3 or a.size != int(np.prod(shape)):
        raise ValueError(f"an axis of {a.size} values is not a flattened (C, h, w) map of shape {tuple(shape)}")
    m = a.reshape(shape)
    return ((m + parity * m[..., ::-1]) / 2).reshape(a.shape)


def caption_axis_projections(lat: PromptLatents, word_maps: dict[int, "WordMap"], nouns: Sequence[str],
                             attributes: Sequence[str] | None = None, form: str = "flat", method: str = "mean_diff",
                             template: str | None = None, per_seed: bool = False, mirror: bool = False) -> np.ndarray:
    """Neutral prompts' h projected on each step's caption-map word axes (high word - low word, :func:`word_axis`).

    Returns (nouns, steps, attributes) from the seed-mean h, or with ``per_seed`` (needs ``flat_seeds``, i.e.
    ``prompt_latents(keep_seeds=True)``) every seed's projection, (nouns, seeds, steps, attributes); projection is
    linear, so the mean over seeds of the latter is the former. Steps are in ``word_maps`` order. With ``mirror``
    (flat form) each axis keeps only its part of the attribute's mirror parity (:func:`mirror_axis`,
    :attr:`revelio_nb.captions.Attribute.mirror`).
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    axes = _step_axes(lat, word_maps, attributes, method)
    if mirror and form == "flat":
        if lat.shape is None or len(lat.shape) != 3:
            raise ValueError(f"mirror needs spatial latents (C, h, w); these have shape {lat.shape}")
        axes = [np.stack([mirror_axis(ax[j], lat.shape, ATTRIBUTES[a].mirror) for j, a in enumerate(attributes)])
                for ax in axes]
    idx = _neutral_indices(lat, nouns, template)
    out = []
    for step, ax in zip(word_maps, axes):
        k = lat.capture_steps.index(step)
        if per_seed:
            if lat.flat_seeds is None:
                raise ValueError(f"these latents ({lat.source}) kept no per-seed h: compute them with keep_seeds=True")
            h = _pool(lat.flat_seeds[idx, :, k].astype(np.float32), lat, form)  # (N, S, d)
        else:
            h = lat.at_step(step).get(form=form)[idx]  # (N, d)
        out.append(h.astype(np.float64) @ ax.T.astype(np.float64))
    return np.stack(out, axis=-2)


def combine_steps(projections: np.ndarray) -> np.ndarray:
    """(..., nouns, steps, attributes) projections -> (..., nouns, attributes) scores: standardised across nouns
    for each (step, attribute), then averaged over the steps (so each step weighs the same whatever its scale)."""
    p = np.asarray(projections, dtype=np.float64)
    sd = p.std(-3, keepdims=True)
    return ((p - p.mean(-3, keepdims=True)) / np.where(sd > 0, sd, 1.0)).mean(-2)


def scores_frame(scores: np.ndarray, nouns: Sequence[str], attributes: Sequence[str]) -> pd.DataFrame:
    """A (nouns, attributes) score matrix in the layout of :func:`bias_scores` (class, attribute, high, low,
    score, rank)."""
    rows = [{"class": n, "attribute": a, "high": ATTRIBUTES[a].high, "low": ATTRIBUTES[a].low,
             "score": float(scores[i, j])} for j, a in enumerate(attributes) for i, n in enumerate(nouns)]
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min").astype(int)
    return df


def caption_axis_bias(lat: PromptLatents, word_maps: dict[int, "WordMap"], nouns: Sequence[str],
                      attributes: Sequence[str] | None = None, form: str = "flat", method: str = "mean_diff",
                      template: str | None = None, seeds: np.ndarray | None = None, mirror: bool = False
                      ) -> pd.DataFrame:
    """Bias read along the sampling trajectory with axes named by caption words (METHODS.md §2 steps 3-4).

    ``word_maps`` maps a capture step of ``lat`` to a :class:`WordMap` fitted on real captioned images noised to
    that step's timestep (:func:`step_index` gives the step of a timestep). At each step the neutral prompts'
    h is projected on the attribute's word axis (high word - low word, :func:`word_axis`); the scores are
    standardised across nouns per (step, attribute) and averaged over the steps (:func:`combine_steps`). Same
    layout as :func:`bias_scores` (one row per noun and attribute, ``score``, ``rank``). ``seeds`` (indices
    into the seeds, needs ``keep_seeds``) reads the score from a subset of the seeds only; ``method`` and
    ``mirror`` choose the axes (:func:`caption_axis_projections`).
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    if seeds is None:
        proj = caption_axis_projections(lat, word_maps, nouns, attributes, form, method, template, mirror=mirror)
    else:
        proj = caption_axis_projections(lat, word_maps, nouns, attributes, form, method, template, per_seed=True,
                                        mirror=mirror)[:, np.asarray(seeds)].mean(1)
    return scores_frame(combine_steps(proj), nouns, attributes)


def _rank_corr(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman rho of each row of ``scores`` (..., N) with ``truth`` (N,) (average ranks for ties)."""
    from scipy.stats import rankdata

    rs = rankdata(scores, axis=-1)
    rt = rankdata(truth)
    rs = rs - rs.mean(-1, keepdims=True)
    rt = rt - rt.mean()
    den = np.sqrt((rs ** 2).sum(-1) * (rt ** 2).sum())
    return np.where(den > 0, (rs * rt).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_rho(projections: np.ndarray, truth: np.ndarray, n_boot: int = 1000, ci: float = 0.9,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Spearman rho of the combined score against the truth, with a bootstrap interval over seeds.

    ``projections`` (nouns, seeds, steps, attributes) from :func:`caption_axis_projections` (``per_seed``);
    ``truth`` (nouns, attributes) (NaN = unknown: that noun is left out of that attribute's rho). The seeds
    are resampled with replacement ``n_boot`` times, the same seed indices for every noun (the seeds are paired:
    every prompt starts from the same noises), and the percentile interval of the resampled rho is returned.
    Returns {"rho", "ci_low", "ci_high", "boot_sd"} as (attributes,) arrays.
    """
    proj = np.asarray(projections, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if proj.ndim != 4:
        raise ValueError(f"projections must be (nouns, seeds, steps, attributes), got shape {proj.shape}")
    n, s, _, a = proj.shape
    if truth.shape != (n, a):
        raise ValueError(f"truth must be (nouns, attributes) = {(n, a)}, got {truth.shape}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot <= 0:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    point = combine_steps(proj.mean(1))  # (N, A)
    rng = np.random.default_rng(seed)
    boots = []
    chunk = max(1, 2_000_000 // max(1, n * s * proj.shape[2] * a))
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, s, (min(chunk, n_boot - start), s))
        boots.append(combine_steps(np.moveaxis(proj[:, idx].mean(2), 0, 1)))  # (b, N, K, A) -> (b, N, A)
    boot = np.concatenate(boots)
    out = {k: np.full(a, np.nan) for k in ("rho", "ci_low", "ci_high", "boot_sd")}
    q = (1 - ci) / 2
    for j in range(a):
        ok = np.isfinite(truth[:, j])
        if ok.sum() < 3 or np.ptp(truth[ok, j]) == 0:
            continue
        out["rho"][j] = float(_rank_corr(point[ok, j], truth[ok, j]))
        r = _rank_corr(boot[:, ok, j], truth[ok, j])
        r = r[np.isfinite(r)]
        if len(r):
            out["ci_low"][j], out["ci_high"][j] = np.quantile(r, [q, 1 - q])
            out["boot_sd"][j] = r.std(ddof=1) if len(r) > 1 else 0.0
    return out


def truth_matrix(truth: pd.DataFrame, nouns: Sequence[str], attributes: Sequence[str],
                 truth_column: str = "rate") -> np.ndarray:
    """Ground truth (class, attribute, ``truth_column`` rows) as a (nouns, attributes) array (NaN where missing)."""
    t = truth.pivot_table(index="class", columns="attribute", values=truth_column, aggfunc="first")
    return t.reindex(index=list(nouns), columns=list(attributes)).to_numpy(dtype=np.float64)


def rho_by_seed_set(projections: dict[str, np.ndarray], nouns: Sequence[str], truth: pd.DataFrame,
                    attributes: Sequence[str], truth_column: str = "rate", n_boot: int = 1000, ci: float = 0.9,
                    seed: int = 0, pooled: str | None = "all seed sets") -> pd.DataFrame:
    """rho against the truth for each independent seed set, each with its bootstrap interval over seeds.

    ``projections`` maps a seed-set label to its (nouns, seeds, steps, attributes) projections. With ``pooled``
    (a label) one more row per attribute reads all seed sets at once (their seeds concatenated). One row per
    (seed_set, attribute): rho, ci_low, ci_high, boot_sd, n_seeds, ci (the level).
    """
    if not projections:
        raise ValueError("no seed sets given")
    attributes = list(attributes)
    tm = truth_matrix(truth, nouns, attributes, truth_column)
    sets = dict(projections)
    if pooled and len(sets) > 1:
        sets[pooled] = np.concatenate(list(projections.values()), axis=1)
    rows = []
    for label, proj in sets.items():
        r = bootstrap_rho(proj, tm, n_boot=n_boot, ci=ci, seed=seed)
        for j, a in enumerate(attributes):
            rows.append({"seed_set": str(label), "attribute": a, "rho": r["rho"][j], "ci_low": r["ci_low"][j],
                         "ci_high": r["ci_high"][j], "boot_sd": r["boot_sd"][j], "n_seeds": int(proj.shape[1]),
                         "ci": ci})
    return pd.DataFrame(rows)


def score_table(scores: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """Scores as a class x attribute matrix (rows/columns in first-seen order)."""
    return scores.pivot(index="class", columns="attribute", values=column).loc[
        list(dict.fromkeys(scores["class"])), list(dict.fromkeys(scores["attribute"]))]


def compare_with_ground_truth(scores: pd.DataFrame, truth: pd.DataFrame, truth_column: str = "rate",
                              label: str = "") -> pd.DataFrame:
    """Spearman rho across classes between each attribute's bias score and its ground-truth rate.

    ``truth`` has columns class, attribute and ``truth_column`` (e.g. :func:`revelio_nb.captions.ground_truth`).
    Rows with a missing truth are dropped; rho is NaN when fewer than 3 classes remain or a side is constant.
    """
    from scipy.stats import spearmanr

    merged = scores.merge(truth[["class", "attribute", truth_column]], on=["class", "attribute"], how="inner")
    if merged.empty:
        raise ValueError("no (class, attribute) pair is shared by the scores and the ground truth: check class names")
    rows = []
    for attr, g in merged.groupby("attribute", sort=False):
        g = g.dropna(subset=["score", truth_column])
        ok = len(g) >= 3 and g["score"].nunique() > 1 and g[truth_column].nunique() > 1
        rho, p = spearmanr(g["score"], g[truth_column]) if ok else (np.nan, np.nan)
        rows.append({"attribute": attr, "rho": float(rho), "p_value": float(p), "n_classes": len(g),
                     "truth_range": float(g[truth_column].max() - g[truth_column].min()) if len(g) else np.nan,
                     **({"scores": label} if label else {})})
    return pd.DataFrame(rows)


def stepwise_rho(lat: PromptLatents, nouns: Sequence[str], truth: pd.DataFrame,
                 attributes: Sequence[str] | None = None, centre: str = "global") -> pd.DataFrame:
    """Spearman rho vs ground truth of the bias score computed from each denoising step's pooled h alone.

    Shows *when* during sampling h carries each attribute (e.g. the silhouette's size early, texture late).
    One row per (step, attribute); a step where every prompt has the same h (the first step of the neutral
    pass: same x_T, same condition) gives NaN.
    """
    if lat.pooled_steps is None:
        raise ValueError(f"these latents ({lat.source}) keep no per-step h (pooled_steps); use prompt_latents()")
    rows = []
    for step in range(lat.pooled_steps.shape[1]):
        one = PromptLatents(lat.prompts, lat.pooled_steps[:, step], None, shape=lat.shape)
        scores = bias_scores(one, nouns, attributes, form="pooled", centre=centre)
        rows.append(compare_with_ground_truth(scores, truth).assign(step=step))
    return pd.concat(rows, ignore_index=True)


def plot_stepwise_rho(df: pd.DataFrame, title: str = ""):
    """rho against denoising step (0 = pure noise), one line per attribute."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for attr, g in df.groupby("attribute", sort=False):
        ax.plot(g["step"], g["rho"], marker="o", ms=3, label=attr)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("Spearman rho vs truth")
    ax.legend(fontsize=7, ncol=len(df["attribute"].unique()), loc="lower left")
    ax.set_title(title or "bias score of each step's h alone vs ground truth", fontsize=9)
    fig.tight_layout()
    return fig


def cluster_prompts(lat: PromptLatents, prompts: Sequence[str] | None = None, form: str = "pooled",
                    metric: str = "cosine", method: str = "average") -> dict[str, Any]:
    """Hierarchical clustering of prompt latents (scipy linkage); returns {"linkage", "labels", "order"}."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    prompts = list(lat.prompts if prompts is None else prompts)
    if len(prompts) < 2:
        raise ValueError("clustering needs at least two prompts")
    x = lat.get(prompts, form).astype(np.float64)
    z = linkage(x, method=method, metric=metric)
    return {"linkage": z, "labels": prompts, "order": [prompts[i] for i in leaves_list(z)]}


# ============================================================================ 3. caption mapping


@dataclass
class CaptionMapConfig:
    """How real images with captions are turned into h for the word map."""

    block: str = "mid_block"
    t: int = 100
    condition: str = "neutral"  # "neutral": empty prompt (h shows the image); "caption": the image's caption
    n_noise: int = 1  # seeded noise draws averaged per image
    seed: int = 0
    batch_size: int = 64
    image_size: int | None = None

    def validate(self) -> "CaptionMapConfig":
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition {self.condition!r} is not one of {list(CONDITIONS)}")
        if self.n_noise <= 0 or self.batch_size <= 0:
            raise ValueError("n_noise and batch_size must be positive integers")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise ValueError(f"image_size must be None (the model's native size) or positive, got {self.image_size!r}")
        return self


@torch.no_grad()
def caption_features(model: DiffusionModel, images: torch.Tensor, captions: Sequence[str] | None = None,
                     config: CaptionMapConfig | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Pooled and flattened h of real images (float (N, C, H, W) in [-1, 1]) noised to ``t``.

    Noise is seeded per image (``seed``, image position, draw), so a subset gives the same rows.
    """
    from .hooks import FeatureCapture

    cfg = (config or CaptionMapConfig()).validate()
    t = model.check_timestep(cfg.t)
    n = len(images)
    if cfg.condition == "caption" and (captions is None or len(captions) != n):
        raise ValueError(f"condition='caption' needs one caption per image ({n} images, "
                         f"{None if captions is None else len(captions)} captions)")
    size = model.check_image_size(cfg.image_size or model.native_image_size)
    pooled, flat = [], []
    with FeatureCapture(model, [cfg.block], early_exit=True) as cap:
        for s in tqdm(range(0, n, cfg.batch_size), desc="caption h", disable=not progress, leave=False):
            x = images[s : s + cfg.batch_size]
            if x.shape[-1] != size:
                from .data import resize_square

                x = resize_square(x, size)
            x0 = model.encode_images(x)
            cond = model.conditioning(len(x0), prompts=list(captions[s : s + len(x0)]) if cfg.condition == "caption" else None)
            acc = 0.0
            for k in range(cfg.n_noise):
                noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                    cfg.seed * 1_000_003 + (s + j) * 101 + k)) for j in range(len(x0))]).to(x0.device, x0.dtype)
                acc = acc + cap.run(model.add_noise(x0, noise, t), t, cond)[cfg.block].float().cpu()
            h = acc / cfg.n_noise
            pooled.append(h.flatten(2).mean(-1).numpy() if h.ndim == 4 else h.numpy())
            flat.append(h.reshape(len(h), -1).numpy())
    return {"pooled": np.concatenate(pooled), "flat": np.concatenate(flat)}


def caption_words(caption: str, stopwords: frozenset[str] = DEFAULT_STOPWORDS) -> list[str]:
    return [w for w in "".join(ch.lower() if ch.isalnum() else " " for ch in caption).split() if w not in stopwords]


def word_matrix(captions: Sequence[str], vocabulary: Sequence[str] | None = None, min_count: int = 5,
                stopwords: frozenset[str] = DEFAULT_STOPWORDS) -> tuple[np.ndarray, list[str]]:
    """Binary word-presence matrix (N, V) and its vocabulary (words seen >= ``min_count`` times, sorted)."""
    tokens = [set(caption_words(c, stopwords)) for c in captions]
    if vocabulary is None:
        counts: dict[str, int] = {}
        for ws in tokens:
            for w in ws:
                counts[w] = counts.get(w, 0) + 1
        vocabulary = sorted(w for w, c in counts.items() if c >= min_count)
    vocabulary = list(vocabulary)
    col = {w: j for j, w in enumerate(vocabulary)}
    x = np.zeros((len(captions), len(vocabulary)), np.float32)
    for i, ws in enumerate(tokens):
        for w in ws:
            if w in col:
                x[i, col[w]] = 1.0
    return x, vocabulary


WORD_METHODS = ("ridge", "mean_diff", "whitened")


@dataclass
class WordMap:
    """Word directions in h-space: ``mean_diff``, ``ridge`` (and ``whitened`` when fitted with ``shrinkage``) are
    (V, d), rows in ``vocabulary`` order."""

    vocabulary: list[str]
    mean_diff: np.ndarray
    ridge: np.ndarray
    counts: np.ndarray
    mean: np.ndarray  # mean h of the fitted images
    alpha: float = 1.0
    whitened: np.ndarray | None = None  # (cov + lambda I)^-1 mean_diff rows: discriminative word directions
    shrinkage: float | None = None  # lambda / (mean variance per dimension of h)

    def vectors(self, method: str = "ridge") -> np.ndarray:
        if method not in WORD_METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {list(WORD_METHODS)}")
        if method == "whitened":
            if self.whitened is None:
                raise ValueError("this word map has no whitened vectors: fit it with fit_word_map(..., shrinkage=...)")
            return self.whitened
        return self.ridge if method == "ridge" else self.mean_diff

    def word(self, word: str, method: str = "ridge") -> np.ndarray:
        if word not in self.vocabulary:
            raise KeyError(f"word {word!r} not in the word map; vocabulary: {self.vocabulary}")
        return self.vectors(method)[self.vocabulary.index(word)]

    def alignment(self, directions: np.ndarray, method: str = "ridge") -> np.ndarray:
        """Cosine between each direction (n, d) and each word vector: (n, V)."""
        d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        w = self.vectors(method)
        if d.shape[1] != w.shape[1]:
            raise ValueError(f"directions have {d.shape[1]} dims but the word map has {w.shape[1]} (same block/form?)")
        return _unit(d) @ _unit(w).T

    def name(self, directions: np.ndarray, k: int = 5, method: str = "ridge", names: Sequence[str] | None = None,
             signed: bool = True) -> pd.DataFrame:
        """Top-``k`` aligned words of each direction: one row per (direction, rank) with word and cosine score.

        With ``signed``, the k most negative words are listed too (``side`` = "+" / "-"): a direction and its
        opposite are named together (e.g. "large" on one side, "small" on the other).
        """
        cos = self.alignment(directions, method)
        names = [f"dir{i}" for i in range(len(cos))] if names is None else list(names)
        if len(names) != len(cos):
            raise ValueError(f"{len(names)} names for {len(cos)} directions")
        k = min(k, len(self.vocabulary))
        rows = []
        for i, row in enumerate(cos):
            order = np.argsort(-row)
            sides = [("+", order[:k])] + ([("-", order[::-1][:k])] if signed else [])
            for side, idx in sides:
                for r, j in enumerate(idx):
                    rows.append({"direction": names[i], "side": side, "rank": r + 1, "word": self.vocabulary[j],
                                 "score": float(row[j])})
        return pd.DataFrame(rows)

    def labels(self, directions: np.ndarray, k: int = 3, method: str = "ridge") -> list[str]:
        """One short label per direction: its top-k positive words, e.g. "large+elephant+wide"."""
        cos = self.alignment(directions, method)
        return ["+".join(self.vocabulary[j] for j in np.argsort(-row)[:k]) for row in cos]


def fit_word_map(h: np.ndarray, captions: Sequence[str] | None = None, *, words: np.ndarray | None = None,
                 vocabulary: Sequence[str] | None = None, alpha: float = 1.0, min_count: int = 5,
                 stopwords: frozenset[str] = DEFAULT_STOPWORDS, shrinkage: float | None = None) -> WordMap:
    """Associate caption words with h (N, d): difference of means (with vs without the word) and ridge
    regression from word indicators to centred h, ``B = (X^T X + alpha I)^-1 X^T (h - mean)`` (X centred).

    With ``shrinkage`` (> 0) also the *whitened* word directions ``(S + lambda I)^-1 mean_diff`` (S = covariance
    of h over the images, lambda = ``shrinkage`` x its mean variance per dimension): the shrinkage-LDA direction of
    each word, which down-weights the directions h varies most along for other reasons (class identity, overall
    ink), so an attribute axis built from them (:func:`word_axis` with ``method="whitened"``) reads the attribute
    rather than what merely co-occurs with its words. Large ``shrinkage`` tends to the plain mean difference.

    Pass ``captions`` or a ready ``words`` matrix with its ``vocabulary``.
    """
    if shrinkage is not None and not shrinkage > 0:
        raise ValueError(f"shrinkage must be > 0 (or None), got {shrinkage!r}")
    h = np.asarray(h, dtype=np.float64)
    if words is None:
        if captions is None:
            raise ValueError("pass captions or a words matrix")
        if len(captions) != len(h):
            raise ValueError(f"{len(captions)} captions for {len(h)} feature rows")
        words, vocabulary = word_matrix(captions, vocabulary, min_count, stopwords)
    elif vocabulary is None or len(vocabulary) != words.shape[1]:
        raise ValueError("a words matrix needs its vocabulary (one name per column)")
    x = np.asarray(words, dtype=np.float64)
    if x.shape[1] == 0:
        raise ValueError(f"no word occurs {min_count}+ times in the captions")
    counts = x.sum(0)
    mean = h.mean(0)
    present = x > 0
    md = np.zeros((x.shape[1], h.shape[1]))
    for j in range(x.shape[1]):
        p = present[:, j]
        if 0 < p.sum() < len(p):
            md[j] = h[p].mean(0) - h[~p].mean(0)
    xc = x - x.mean(0)
    hc = h - mean
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    ridge = np.linalg.solve(gram, xc.T @ hc)
    whitened = None
    if shrinkage is not None:
        _, sv, vt = np.linalg.svd(hc, full_matrices=False)
        ev = sv ** 2 / len(hc)  # covariance eigenvalues along the rows of vt
        lam = float(shrinkage) * max(float(ev.sum()) / h.shape[1], 1e-12)
        c = md @ vt.T  # (V, rank): coordinates in the span of the data
        whitened = (c / (ev + lam)) @ vt + (md - c @ vt) / lam
    return WordMap(list(vocabulary), md.astype(np.float32), ridge.astype(np.float32), counts, mean.astype(np.float32),
                   float(alpha), None if whitened is None else whitened.astype(np.float32),
                   None if shrinkage is None else float(shrinkage))


def caption_retrieval(lat: PromptLatents, image_h: dict[int, np.ndarray], labels: np.ndarray,
                      nouns: Sequence[str], steps: dict[int, int], form: str = "flat", k: Sequence[int] = (1, 5),
                      template: str | None = None) -> pd.DataFrame:
    """Image-conditioning check of the prompt latents: does h of a real captioned image, noised to t, sit
    closest to its own class's prompt latent among the other classes'?

    ``image_h`` maps a timestep t to h of real images noised to t ((M, d), same block, pass and ``form`` as
    ``lat``; e.g. a feature store with neutral conditioning), ``labels`` gives each image's class as an index into
    ``nouns``, ``steps`` maps t to the capture step of ``lat`` read for it (:func:`step_index`). Both sides are
    centred on their own mean (images on the images', prompt latents on the classes'), so a constant offset
    between real and generated h does not decide; similarity = cosine. One row per t: top-k accuracy for each k
    (share of images whose own class ranks within the k most similar prompt latents) beside chance (k / classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    nouns = list(nouns)
    if labels.size and (labels.min() < 0 or labels.max() >= len(nouns)):
        raise ValueError(f"labels must index the {len(nouns)} nouns, got values {labels.min()}..{labels.max()}")
    missing = [t for t in image_h if t not in steps]
    if missing:
        raise ValueError(f"timesteps {missing} have no capture step in steps={steps}")
    idx = _neutral_indices(lat, nouns, template)
    rows = []
    for t, h in image_h.items():
        h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
        if len(h) != len(labels):
            raise ValueError(f"{len(h)} image rows at t={t} for {len(labels)} labels")
        protos = lat.at_step(steps[t]).raw(form)[idx].astype(np.float64)
        if protos.shape[1] != h.shape[1]:
            raise ValueError(f"image h has {h.shape[1]} dims at t={t}, the prompt latents ({form}) {protos.shape[1]}")
        sim = _unit(h - h.mean(0)) @ _unit(protos - protos.mean(0)).T  # (M, classes)
        own = sim[np.arange(len(h)), labels][:, None]
        above = (sim > own + 1e-12).sum(1)  # classes clearly more similar than the own one
        tied = (np.abs(sim - own) <= 1e-12).sum(1)  # the own class and any class exactly as similar
        row = {"t": int(t), "step": int(steps[t]), "n_images": len(h), "n_classes": len(nouns)}
        for kk in k:  # ties broken at random: the chance that the own class lands within the top k
            row[f"top{kk}"] = float(np.clip((kk - above) / tied, 0.0, 1.0).mean())
            row[f"chance_top{kk}"] = min(1.0, kk / len(nouns))
        rows.append(row)
    return pd.DataFrame(rows)


def name_sae_latents(h: np.ndarray, word_map: "WordMap", config: Any, key: str = "", n_latents: int = 8, k: int = 3,
                     method: str = "ridge") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Train (or load from the cache) a k-SAE on h (N, d) with ``config`` (:class:`revelio_nb.sae.TrainConfig`)
    and name its ``n_latents`` most frequent latents' decoder rows with the word map (:meth:`WordMap.name`).

    The SAE is cached by the rows and the config (:func:`revelio_nb.artifacts.array_sae_dir`; ``key`` only labels
    the folder). Returns (named rows, :func:`revelio_nb.sae.evaluate_sae` metrics).
    """
    from . import sae

    folder = artifacts.array_sae_dir(h, config, label=key)
    ksae = sae.train_sae(np.asarray(h, np.float32), config, folder)
    ev = sae.evaluate_sae(ksae, np.asarray(h, np.float32))
    top = np.argsort(-ev["firing_frequency"])[:n_latents]
    named = word_map.name(ksae.W_dec.detach().cpu().numpy()[top], k=k, method=method,
                          names=[f"latent {i} ({ev['firing_frequency'][i]:.0%})" for i in top])
    return named, ev


def pca_directions(h: np.ndarray, n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` principal axes (n, d) of row vectors and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    p = PCA(n_components=min(n, *np.shape(h)), random_state=seed).fit(np.asarray(h, dtype=np.float64))
    return p.components_, p.explained_variance_ratio_


# ============================================================================ 5. causal check


def steer(model: DiffusionModel, prompts: str | Sequence[str], direction: Any, strengths: Sequence[float],
          config: SampleConfig | None = None, steer_steps: Sequence[int] | None = None,
          progress: bool = True) -> dict[float, torch.Tensor]:
    """Images for each strength: the prompts sampled (paired seeds) with ``strength * direction`` added to h.

    Returns {strength: images in [-1, 1] (len(prompts) * n_seeds, C, H, W)}; strength 0 is the unsteered baseline.
    """
    cfg = (config or SampleConfig()).validate()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = {}
    with SteeringHook(model, direction, 0.0, cfg.block) as hook:
        for s in tqdm(list(strengths), desc="steer", disable=not progress, leave=False):
            hook.strength = float(s)
            out[float(s)] = generate(model, prompts, cfg, steer=hook, steer_steps=steer_steps, progress=False)
    return out


STEER_AXES = ("per-step", "mean")


def steer_attributes(model: DiffusionModel, lat: PromptLatents, nouns: Sequence[str], attributes: Sequence[str],
                     strengths: Sequence[float], config: SampleConfig | None = None, axes: str = "per-step",
                     template: str | None = None, progress: bool = True
                     ) -> tuple[dict[str, dict[float, torch.Tensor]], pd.DataFrame]:
    """The causal check for several attributes: every noun's neutral prompt sampled (``config``, paired seeds) with
    ``strength *`` the attribute's prompt-pair axis added to h, and the attribute measured on the images.

    The axis is the flattened, unnormalised mean difference of h between the high- and low-word prompts of
    ``lat`` (:func:`attribute_axis`): with ``axes="per-step"`` one per sampling step of ``lat``'s run, added at
    the matching timestep (:func:`attribute_axes_by_step`; strength 1 adds what the words do to h at each step);
    with ``axes="mean"`` one axis averaged over the steps, added at every step. Returns ({attribute: {strength:
    images}}, :func:`steering_effect` rows of every attribute).
    """
    if axes not in STEER_AXES:
        raise ValueError(f"axes {axes!r} is not one of {list(STEER_AXES)}")
    cfg = (config or SampleConfig()).validate()
    kw = {} if template is None else {"template": template}
    prompts = [neutral_prompt(n, **kw) for n in nouns]
    strips, effects = {}, []
    for a in attributes:
        if axes == "per-step":
            steps = int((lat.config or {}).get("steps") or len(lat.capture_steps or []))
            direction = attribute_axes_by_step(lat, nouns, a, step_timesteps(model, steps), template=template)
        else:
            direction = attribute_axis(lat, nouns, a, form="flat", normalise=False, template=template)
        strips[a] = steer(model, prompts, direction, strengths, cfg, progress=progress)
        effects.append(steering_effect(strips[a], a))
    return strips, pd.concat(effects, ignore_index=True)


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


# ============================================================================ figures


def plot_prompt_samples(model: DiffusionModel, nouns: Sequence[str], guidance_scales: Sequence[float] = (1.0, 3.0),
                        steps: int = 10, seed: int = 0, n_seeds: int = 4, template: str | None = None):
    """Each noun's neutral prompt drawn ``n_seeds`` times (paired seeds) at each guidance scale: one row per
    noun, one block of columns per scale."""
    import matplotlib.pyplot as plt

    from .sampling import to_uint8

    kw = {} if template is None else {"template": template}
    prompts = [neutral_prompt(n, **kw) for n in nouns]
    rows = {g: to_uint8(generate(model, prompts, SampleConfig(n_seeds=n_seeds, steps=steps, seed=seed,
                                                             guidance_scale=g), progress=False))
            for g in guidance_scales}
    ncol = len(rows) * n_seeds
    fig, axes = plt.subplots(len(prompts), ncol, figsize=(0.6 * ncol + 0.8, 0.6 * len(prompts) + 0.4), squeeze=False)
    for b, (g, imgs) in enumerate(rows.items()):
        for p in range(len(prompts)):
            for j in range(n_seeds):
                ax = axes[p, b * n_seeds + j]
                im = imgs[p * n_seeds + j]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if p == 0 and j == 0:
                    ax.set_title(f"CFG {g:g}", fontsize=7, loc="left")
        for p, noun in enumerate(nouns):
            axes[p, 0].set_ylabel(noun, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"'{neutral_prompt('<class>', **kw)}', {n_seeds} paired seeds, DDIM {steps} steps", fontsize=8)
    fig.tight_layout(pad=0.2)
    return fig


def plot_bias_heatmaps(panels: dict[str, pd.DataFrame], center: dict[str, float] | None = None, cmap: str = "vlag",
                       annot: bool = True, title: str = ""):
    """Class x attribute heatmaps side by side (e.g. ground truth, diffusion bias, text-encoder bias).

    Each panel is standardised per attribute column for colour (z-scores) and annotated with its raw values.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.8), squeeze=False)
    for ax, (name, table) in zip(axes[0], panels.items()):
        t = table.astype(float)
        z = (t - t.mean()) / t.std(ddof=0).replace(0, 1)
        sns.heatmap(z, ax=ax, cmap=cmap, center=0, vmin=-2.2, vmax=2.2, annot=t.round(2) if annot else False,
                    fmt="", cbar=False, annot_kws={"fontsize": 6})
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_word_bars(named: pd.DataFrame, ncols: int = 3, title: str = ""):
    """Word-alignment bars from :meth:`WordMap.name` (one panel per direction, + words right, - words left)."""
    import matplotlib.pyplot as plt

    dirs = list(dict.fromkeys(named["direction"]))
    ncols = min(ncols, len(dirs))
    nrows = (len(dirs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat[len(dirs):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, dirs):
        g = named[named["direction"] == d].sort_values("score")
        colors = ["tab:blue" if s < 0 else "tab:red" for s in g["score"]]
        ax.barh(np.arange(len(g)), g["score"], color=colors)
        ax.set_yticks(np.arange(len(g)))
        ax.set_yticklabels(g["word"], fontsize=7)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(str(d), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("cosine", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_steering_strips(strips: dict[str, dict[float, Any]], n_show: int = 4, cell: float = 0.75,
                         row_names: Sequence[str] | None = None):
    """Images along directions: one block of ``n_show`` rows per named direction (rows = the first ``n_show``
    images of each strength batch, e.g. one seed of several prompts, labelled by ``row_names``), columns =
    strengths."""
    import matplotlib.pyplot as plt

    from .sampling import to_uint8

    rows = [(name, k) for name in strips for k in range(n_show)]
    strengths = {name: sorted(v) for name, v in strips.items()}
    ncols = max(len(s) for s in strengths.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols + 1.6, cell * len(rows) + 0.3), squeeze=False)
    for r, (name, k) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c >= len(strengths[name]):
                continue
            s = strengths[name][c]
            imgs = strips[name][s]
            imgs = to_uint8(imgs) if torch.is_tensor(imgs) else np.asarray(imgs)
            if k < len(imgs):
                im = imgs[k]
                ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
            if k == 0:
                ax.set_title(f"{s:+g}", fontsize=7)
        label = (f"{name}\n" if k == 0 else "") + (str(row_names[k]) if row_names is not None and k < len(row_names) else "")
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    return fig


def plot_dendrogram(clusters: dict[str, Any], title: str = "", label_fn: Callable[[str], str] | None = None):
    """Dendrogram of :func:`cluster_prompts`."""
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    labels = [label_fn(p) if label_fn else p for p in clusters["labels"]]
    fig, ax = plt.subplots(figsize=(6, 0.22 * len(labels) + 1))
    dendrogram(clusters["linkage"], labels=labels, orientation="left", ax=ax, color_threshold=None)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_steering_effect(effects: pd.DataFrame, title: str = ""):
    """Measured attribute (mean +- sem) against steering strength, one panel per attribute."""
    import matplotlib.pyplot as plt

    attrs = list(dict.fromkeys(effects["attribute"]))
    fig, axes = plt.subplots(1, len(attrs), figsize=(2.8 * len(attrs), 2.5), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        g = effects[effects["attribute"] == a]
        for key, gg in g.groupby("direction", sort=False) if "direction" in g else [(a, g)]:
            ax.errorbar(gg["strength"], gg["mean"], yerr=gg["sem"], marker="o", ms=3, capsize=2, label=str(key))
        ax.set_xlabel("strength", fontsize=8)
        ax.set_ylabel(a, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{a}: {ATTRIBUTES[a].low} -> {ATTRIBUTES[a].high}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ============================================================================ helpers for reports


def generated_attribute_scores(lat: PromptLatents, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                               thresholds: dict[str, tuple[float, float]] | None = None,
                               template: str | None = None) -> pd.DataFrame:
    """What the model actually draws for each noun's neutral prompt (needs ``keep_images``), in the
    (class, attribute, score) layout of :func:`bias_scores`.

    ``score`` is the mean measured value; with the captions' ``thresholds`` (low, high) it is instead the caption
    rule applied to the generated images: n_high / (n_high + n_low), directly comparable to the ground-truth rate.
    """
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    rows = []
    for noun in nouns:
        imgs = lat.images_of(neutral_prompt(noun, **kw))
        for a in attributes:
            v = ATTRIBUTES[a].measure(imgs)
            if thresholds is not None:
                lo, hi = thresholds[a]
                nh, nl = int((v > hi).sum()), int((v < lo).sum())
                score = nh / (nh + nl) if nh + nl else float("nan")
            else:
                score = float(v.mean())
            rows.append({"class": noun, "attribute": a, "high": ATTRIBUTES[a].high, "low": ATTRIBUTES[a].low,
                         "score": score})
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("attribute")["score"].rank(ascending=False, method="min")
    return df


def prompt_following(lat: PromptLatents, nouns: Sequence[str], attributes: Sequence[str] | None = None,
                     template: str | None = None) -> pd.DataFrame:
    """Does the model draw what the attribute words say? The attribute measured on the images generated from
    the high-word, neutral and low-word prompts of every noun (needs ``keep_images``), with the standardised
    difference d = (mean_high - mean_low) / pooled std. An attribute the model does not follow (d near 0) gives
    a prompt-pair axis made of noise."""
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    kw = {} if template is None else {"template": template}
    rows = []
    for attr in attributes:
        a = ATTRIBUTES[attr]
        vals = {}
        groups = {"high": [attribute_prompt(n, attr, a.high, **kw) for n in nouns],
                  "neutral": [neutral_prompt(n, **kw) for n in nouns],
                  "low": [attribute_prompt(n, attr, a.low, **kw) for n in nouns]}
        for key, prompts in groups.items():
            vals[key] = a.measure(lat.images_of(prompts))
        sd = np.sqrt((vals["high"].var(ddof=1) + vals["low"].var(ddof=1)) / 2)
        rows.append({"attribute": attr, "high": a.high, "low": a.low, "mean_high": float(vals["high"].mean()),
                     "mean_neutral": float(vals["neutral"].mean()), "mean_low": float(vals["low"].mean()),
                     "d": float((vals["high"].mean() - vals["low"].mean()) / sd) if sd > 0 else float("nan")})
    return pd.DataFrame(rows)
