"""Prompt h: prompts sampled with paired seeds through the package's one sampler, h captured at every step.

:class:`SampleConfig` says how prompts are sampled; :func:`generate` samples them with
:func:`revelio_nb.sampling.denoise_loop` and hands h of ``config.block`` (conditional and / or neutral pass) to a
callback; :func:`prompt_h` averages it into a :class:`PromptH` (one h vector per prompt, in both forms of
:mod:`revelio_nb.pooling`'s ``H_FORMS``: ``MEAN`` over space and ``FLAT``) and
caches the run (:func:`revelio_nb.artifacts.prompt_h_dir`); :func:`text_encoder_embeddings` is the text-encoder
baseline in the same container. "h" is the output of the bottleneck block (``mid_block``), not an SAE latent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import artifacts
from ..capture import validate_blocks
from ..models import DiffusionModel
from ..paths import atomic_path, atomic_write_json
from ..pooling import H_FORMS, MEAN, check_pooling

if TYPE_CHECKING:
    from .causal import SteeringHook, SteeringHooks


H_CONDITIONS = ("prompt", "neutral")


@dataclass
class SampleConfig:
    """How prompts are sampled when their h is captured (or steered)."""

    block: str = "mid_block"
    n_seeds: int = 8  # S paired seeds per prompt (the same S starting noises for every prompt)
    seed: int = 0
    steps: int = 10  # DDIM steps
    guidance_scale: float = 1.0  # > 1: classifier-free guidance (h is taken from the conditional branch)
    capture_steps: list[int] | None = None  # denoising step indices averaged into a prompt h; None = all
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


def block_module(model: DiffusionModel, block: str) -> torch.nn.Module:
    validate_blocks(model.denoiser, [block])
    return dict(model.denoiser.named_modules())[block]


def _scheduler(model: DiffusionModel, steps: int, size: int | None = None):
    """The model family's sampler (:class:`revelio_nb.sampling.Sampler`) for ``steps`` steps; ``.timesteps``."""
    from ..sampling import Sampler

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
    steer: SteeringHook | SteeringHooks | None = None,
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
    run only at ``capture_steps`` when they are given). ``steer`` (a registered :class:`SteeringHook` or
    :class:`SteeringHooks`) is switched on only at ``steer_steps`` if given; under CFG it is added in both passes.
    Models that take guidance as an input (LCM, FLUX-dev) get ``guidance_scale`` there and run no CFG batch; an
    LCM's re-noising is seeded and paired across prompts like the starting noise.
    """
    from ..capture import image_stream_map
    from ..sampling import denoise_loop

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
    module = block_module(model, block) if on_h is not None else None
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


@dataclass
class PromptH:
    """One h vector per prompt (averaged over seeds and steps), pooled and flattened, with the reference mean.

    ``pooled`` (the ``MEAN`` form) and ``flat`` (the ``FLAT`` form) are *uncentred*; :meth:`get` subtracts the
    reference. ``pooled_steps`` keeps the per-step seed means (P, steps, C) for step-wise analyses.
    """

    prompts: list[str]
    pooled: np.ndarray  # (P, C)
    flat: np.ndarray | None  # (P, C*h*w) or None (e.g. text-encoder embeddings)
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # form (MEAN, FLAT) -> (d,) mean subtracted by get()
    pooled_steps: np.ndarray | None = None  # (P, steps, C)
    shape: tuple[int, ...] | None = None  # (C, h, w) of the block output
    flat_steps: np.ndarray | None = None  # (P, len(capture_steps), C*h*w): flat h of each capture step, when > 1
    capture_steps: list[int] | None = None  # the steps averaged into ``flat``
    images: np.ndarray | None = None  # uint8 (P, S, H, W, C) when kept (see :meth:`images_of`)
    flat_seeds: np.ndarray | None = None  # float16 (P, S, len(capture_steps), C*h*w): each seed's flat h at each
    # capture step, when kept (``prompt_h(keep_seeds=True)``): for bootstrap intervals over seeds
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
        return [f for f in H_FORMS if self.raw(f) is not None]

    def raw(self, form: str = MEAN) -> np.ndarray | None:
        check_pooling(form, H_FORMS, "form")
        return self.pooled if form == MEAN else self.flat

    def set_reference(self, reference: "PromptH | Sequence[str] | None" = None) -> "PromptH":
        """Subtract the mean of ``reference`` (another PromptH, or a subset of these prompts; default: all)."""
        for form in H_FORMS:
            arr = self.raw(form)
            if arr is None:
                continue
            if reference is None:
                self.reference[form] = arr.mean(0)
            elif isinstance(reference, PromptH):
                self.reference[form] = reference.raw(form).mean(0)
            else:
                self.reference[form] = arr[self.indices(list(reference))].mean(0)
        return self

    def at_step(self, step: int) -> "PromptH":
        """These prompts' h from one capture step alone (flat and pooled h of that step, same reference
        rule: the mean over these prompts)."""
        if not self.capture_steps or step not in self.capture_steps:
            raise ValueError(f"step {step} was not captured; capture_steps: {self.capture_steps}")
        k = self.capture_steps.index(step)
        flat = self.flat if len(self.capture_steps) == 1 else self.flat_steps[:, k]
        pooled = self.pooled_steps[:, step] if self.pooled_steps is not None else self.pooled
        seeds = self.flat_seeds[:, :, k : k + 1] if self.flat_seeds is not None else None
        return PromptH(self.prompts, pooled, flat, shape=self.shape, images=self.images,
                             source=f"{self.source} @ step {step}", config=self.config, capture_steps=[step],
                             flat_seeds=seeds)

    @property
    def n_seeds(self) -> int | None:
        """Seeds per prompt behind these prompt h (None when unknown, e.g. text-encoder embeddings)."""
        if self.flat_seeds is not None:
            return int(self.flat_seeds.shape[1])
        n = self.config.get("n_seeds") if self.config else None
        return None if n is None else int(n)

    def images_of(self, prompts: str | Sequence[str]) -> np.ndarray:
        """The kept images of some prompts, all seeds, stacked: uint8 (sum of seeds, H, W, C)."""
        if self.images is None:
            raise ValueError("these prompt h kept no images: compute them with keep_images=True")
        idx = self.indices([prompts] if isinstance(prompts, str) else list(prompts))
        return self.images[idx].reshape(-1, *self.images.shape[2:])

    def indices(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"prompts not in these prompt h: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return np.array([self._index[p] for p in prompts], dtype=np.int64)

    def get(self, prompts: str | Sequence[str] | None = None, form: str = MEAN) -> np.ndarray:
        """Centred h (reference subtracted) of some prompts (all by default); one prompt -> (d,)."""
        arr = self.raw(form)
        if arr is None:
            raise ValueError(f"these prompt h ({self.source}) have no {form!r} form; available: {self.forms()}")
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


def _h_from_run(arrays: dict[str, np.ndarray], meta: dict[str, Any], condition: str, capture_steps,
                      config: dict[str, Any]) -> PromptH:
    steps = arrays[f"{condition}.pooled_steps"]
    idx = list(range(steps.shape[1])) if capture_steps is None else list(capture_steps)
    flat_steps = arrays.get(f"{condition}.flat_steps")
    return PromptH(meta["prompts"], steps[:, idx].mean(1).astype(np.float32), arrays[f"{condition}.flat"],
                         pooled_steps=steps, shape=tuple(meta["shape"]), images=arrays.get("images"),
                         source=f"{meta['source']} (h: {condition} pass)", config=config,
                         flat_steps=flat_steps, capture_steps=list(meta["capture_steps"]),
                         flat_seeds=arrays.get(f"{condition}.flat_seeds"))


def prompt_h(
    model: DiffusionModel,
    prompts: Sequence[str],
    config: SampleConfig | None = None,
    *,
    keep_images: bool = False,
    keep_seeds: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> PromptH:
    """h of every prompt: sampled with ``n_seeds`` paired seeds, captured at each step, averaged over seeds and
    (``capture_steps`` of) steps. ``config.h_condition`` picks the pass h is read from ("prompt" or "neutral",
    see :class:`SampleConfig`). Cached by (model identity, prompts, sampling config) under ``cache_dir("directions")``;
    a run that had both passes (CFG) serves both conditions. The reference mean defaults to the mean over these
    prompts (change it with :meth:`PromptH.set_reference`).
    """
    cfg = (config or SampleConfig()).validate()
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError("no prompts given")
    folder = artifacts.prompt_h_dir(model, prompts, cfg, keep_images, keep_seeds)
    if cache and (hit := _load_run(folder)) is not None and f"{cfg.h_condition}.flat" in hit[0]:
        return _h_from_run(*hit, cfg.h_condition, cfg.capture_steps, asdict(cfg))
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

    images = generate(model, prompts, cfg, on_h=on_h, progress=progress, desc="prompt h")
    arrays = {k: v if v.dtype == np.float16 else v.astype(np.float32) for k, v in acc.items()}
    if keep_images:
        from ..sampling import to_uint8

        u8 = to_uint8(images)
        arrays["images"] = u8.reshape(n_p, cfg.n_seeds, *u8.shape[1:])
    meta = {"shape": shape[0], "source": model.model_id, "capture_steps": sorted(keep)}
    if cache:
        _save_run(folder, prompts, arrays, meta)
    return _h_from_run(arrays, {"prompts": prompts, **meta}, cfg.h_condition, cfg.capture_steps, asdict(cfg))


@torch.no_grad()
def text_encoder_embeddings(model: DiffusionModel, prompts: Sequence[str], batch_size: int = 128) -> PromptH:
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
    return PromptH(prompts, np.concatenate(out).astype(np.float32), None, source=f"text encoder of {model.model_id}")
