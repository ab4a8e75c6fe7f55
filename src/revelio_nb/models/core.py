"""The one model object the rest of the package sees: a denoiser with what is needed to feed it.

What differs between families (how to call the denoiser, its noise convention, which element of a block's output
is the image stream, how tokens go back on the grid, how prompts are encoded) lives in the model's *adapter*
(:mod:`revelio_nb.models.adapters`); :class:`DiffusionModel` delegates to it, so callers never branch on the family.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


@dataclass
class DiffusionModel:
    """A denoiser, its scheduler, and the optional VAE, text encoders and tokenizers of its pipeline."""

    model_id: str
    kind: str  # the adapter family: "unet" | "unet_cond" | "dit" | "pixart" | "sd3" | "flux" | "sana"
    denoiser: nn.Module
    scheduler: Any
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: nn.Module | None = None
    tokenizer_3: Any = None
    weights_hash: str = ""  # the model's identity (:attr:`fingerprint`); computed when not given
    class_names: list[str] | None = None
    folder: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    pipeline_class: str = ""  # model_index.json's _class_name, when there is one
    adapter: Any = None
    weights_digest: str = ""  # sha256 of every weight (denoiser, VAE, text encoders); computed when not given
    _noise: Any = field(default=None, init=False, repr=False)
    _null_cond: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from .adapters import adapter_for_family

        if self.adapter is None or getattr(self.adapter, "model", self) is not self:  # new, or dataclasses.replace
            cls = adapter_for_family(self.kind) if self.adapter is None else type(self.adapter)
            self.adapter = cls(self)
        if not self.weights_digest:
            self.weights_digest = weights_digest(*self.modules())
        if not self.weights_hash:
            self.weights_hash = self.compute_fingerprint()

    # -- identity
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.denoiser, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3)
                if m is not None]

    def tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def fingerprint(self) -> str:
        """Everything that changes features: the weights of the denoiser, VAE and every text encoder, each
        tokenizer's vocabulary, the scheduler (class and config: betas, shift, prediction type) and the dtype.
        The key of every cache that depends on the model (feature stores, SAEs, prompt h runs); the same value as
        :attr:`weights_hash`, the name the feature-store manifests use."""
        return self.weights_hash

    def compute_fingerprint(self) -> str:
        # the scheduler config's own fields only ("_use_default_values" is a list built from a set: its order
        # varies between processes; "_diffusers_version" does not change the numbers)
        sched = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        blob = json.dumps({
            "weights": self.weights_digest,
            "scheduler": [type(self.scheduler).__name__, sched],
            "tokenizers": [tokenizer_digest(t) for t in self.tokenizers()],
            "dtype": str(self.dtype),
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- geometry
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def vae_factor(self) -> int:
        if self.vae is None:
            return 1
        cfg = self.vae.config
        chans = getattr(cfg, "encoder_block_out_channels", None) or cfg.block_out_channels  # AutoencoderDC / KL
        return 2 ** (len(chans) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.latent_channels)

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) input the sampler and the noise live in."""
        return self.adapter.latent_channels()

    @property
    def native_image_size(self) -> int:
        return self.adapter.native_image_size()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise.num_train_timesteps)

    def size_multiple(self) -> int:
        """Image sides must be a multiple of this."""
        return self.adapter.size_multiple()

    def check_image_size(self, size: int) -> int:
        return self.adapter.check_image_size(size)

    def latent_shape(self, n: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
        """(n, C, h, w) of the denoiser input for images of side ``size`` (or (height, width))."""
        hh, ww = (size, size) if isinstance(size, (int, np.integer)) else size
        return (int(n), self.latent_channels, int(hh) // self.vae_factor, int(ww) // self.vae_factor)

    def check_timestep(self, t: int) -> int:
        if not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.num_train_timesteps:
            raise ValueError(
                f"timestep {t!r} is outside {self.model_id}'s scheduler range: integers 0..{self.num_train_timesteps - 1}"
            )
        return int(t)

    @property
    def main_blocks(self) -> list[str]:
        """The top-level blocks worth probing, in execution order."""
        return self.adapter.main_blocks()

    @property
    def h_block(self) -> str:
        """The block Decoding Diffusion calls h: ``mid_block`` for UNets, a middle transformer block for DiTs."""
        return self.adapter.h_block()

    def resolve_block(self, block: str) -> str:
        """``"mid_block"`` on a model without one (a transformer) means its h block; other names are kept."""
        if block == "mid_block" and not hasattr(self.denoiser, "mid_block"):
            return self.h_block
        return block

    # -- noising
    @property
    def noise(self):
        """The noise schedule (:mod:`revelio_nb.models.noise`): t on the 0..N-1 training scale -> noise level."""
        if self._noise is None:
            self._noise = self.adapter.make_noise()
        return self._noise

    @property
    def noise_scheduler(self):
        """DDPM-style models: a DDPMScheduler with the model's own betas (kept for callers of the old API)."""
        return getattr(self.noise, "scheduler", None)

    @property
    def prediction_type(self) -> str:
        return self.noise.prediction_type

    def seq_len(self, latent_hw: tuple[int, int]) -> int:
        return self.adapter.seq_len(latent_hw)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x0 noised to user timestep t with the model's own convention (DDPM alpha-bar or flow sigma)."""
        return self.noise.add_noise(x0, noise, t, seq_len=self.seq_len(tuple(x0.shape[-2:])))

    def model_timestep(self, t: int, latent_hw: tuple[int, int]) -> float:
        return self.noise.model_timestep(self.check_timestep(t), self.seq_len(latent_hw))

    def noise_record(self, timesteps: list[int], size: int) -> list[dict[str, Any]]:
        """The noise mapping of some user timesteps at an image size: (t, alpha-bar or sigma, model timestep,
        prediction type); written into feature-store manifests."""
        hw = self.latent_shape(1, size)[-2:]
        return [self.noise.record(self.check_timestep(t), self.seq_len(hw)) for t in timesteps]

    VAE_PIXELS_PER_PASS = 512 * 512  # VAE activations at full resolution are ~0.5 GB per 512 px image: pass few

    def _vae_slices(self, n: int, pixels: int) -> list[slice]:
        per = max(1, self.VAE_PIXELS_PER_PASS // max(1, pixels))
        return [slice(i, min(i + per, n)) for i in range(0, n, per)]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> the denoiser's input space (VAE latents, scaled and shifted).
        The VAE runs on a few images at a time (its full-resolution activations dominate memory)."""
        if self.vae is None:
            return images.to(self.device, self.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        out = []
        for s in self._vae_slices(len(images), images.shape[-2] * images.shape[-1]):
            enc = self.vae.encode(images[s].to(self.device, self.vae.dtype))
            latents = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent  # AutoencoderKL / DC
            out.append(((latents - shift) * self.vae.config.scaling_factor).to(self.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, x0: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x0.clamp(-1, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        pixels = x0.shape[-2] * x0.shape[-1] * self.vae_factor ** 2
        out = []
        for s in self._vae_slices(len(x0), pixels):
            z = x0[s].to(self.vae.dtype) / self.vae.config.scaling_factor + shift
            out.append(self.vae.decode(z).sample.clamp(-1, 1))
        return torch.cat(out)

    # -- conditioning
    @property
    def takes_prompts(self) -> bool:
        return self.adapter.takes_prompts

    @property
    def num_classes(self) -> int | None:
        return self.adapter.num_classes()

    @property
    def null_class(self) -> int | None:
        return self.adapter.null_class()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if not self.takes_prompts:
            raise ValueError(f"{self.model_id} ({self.kind}) is not text-conditioned; prompts cannot be used")
        return self.adapter.encode_prompts(list(prompts))

    def conditioning(
        self, batch_size: int, prompts: list[str] | str | None = None, class_labels: list[int] | int | None = None,
        guidance: float | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for :meth:`denoise` (tensors with a batch dimension only). With neither prompts nor
        class labels: neutral conditioning (the empty prompt through the model's own encoders, the null class,
        nothing otherwise). ``guidance``: the guidance embedded into the model (LCM ``timestep_cond`` from
        w = guidance - 1, FLUX-dev ``guidance``); None = the family's default."""
        if prompts is not None and class_labels is not None:
            raise ValueError("pass prompts or class_labels, not both")
        if self.takes_prompts:
            if class_labels is not None:
                raise ValueError(f"{self.model_id} is text-conditioned: pass prompts, not class_labels")
            if prompts is None:
                if self._null_cond is None:
                    self._null_cond = self.encode_prompts([""])
                cond = repeat_cond(self._null_cond, batch_size)
            else:
                prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
                if len(prompts) != batch_size:
                    raise ValueError(f"{len(prompts)} prompts for a batch of {batch_size}")
                cond = self.encode_prompts(prompts)
            return {**cond, **self.adapter.guidance_cond(batch_size, guidance)}
        if prompts is not None:
            raise ValueError(f"{self.model_id} ({self.kind}) takes no text prompts; it is not text-conditioned"
                             + (" (it takes class_labels)" if self.num_classes is not None else ""))
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(f"{self.model_id} is unconditional: it takes no class labels")
            return {}
        if class_labels is None:
            labels = torch.full((batch_size,), self.null_class, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).expand(batch_size).clone()
            bad = labels[(labels < 0) | (labels > self.num_classes)]
            if len(bad):
                raise ValueError(f"class label {int(bad[0])} outside 0..{self.num_classes - 1} (null class: {self.null_class})")
        return {"class_labels": labels.to(self.device)}

    # -- the denoiser call
    def denoise(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: dict[str, Any] | None = None) -> torch.Tensor:
        """The model's raw prediction (epsilon, v or flow velocity: see :attr:`prediction_type`; learned-sigma
        halves dropped) for x_t at user timestep ``t`` (0..N-1 training scale; mapped to the model's own timestep)."""
        if torch.is_tensor(t) and t.ndim > 0:
            t = t.reshape(-1)
            if bool((t != t[0]).any()):
                if self.noise.convention != "ddpm":
                    raise ValueError("per-sample timesteps are only supported on DDPM-style models")
                return self.predict(x_t, t, cond)
            t = t[0]
        model_t = self.model_timestep(int(t), tuple(x_t.shape[-2:]))
        return self.predict(x_t, model_t, cond)

    def predict(self, x_t: torch.Tensor, model_t: float | torch.Tensor, cond: dict[str, Any] | None = None) -> torch.Tensor:
        """The denoiser at the model's own timestep (what its scheduler's ``timesteps`` hold)."""
        cond = cond if cond is not None else self.conditioning(x_t.shape[0])
        t = torch.as_tensor(model_t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.adapter.predict(x_t, t, cond)

    def to(self, device=None, dtype=None) -> "DiffusionModel":
        before = self.dtype
        for m in self.modules():
            m.to(device=device, dtype=dtype if m is self.denoiser else None)
        if self.dtype != before:  # another dtype, other numbers: another identity
            self.weights_digest = weights_digest(*self.modules())
            self.weights_hash = self.compute_fingerprint()
        self._null_cond = None
        if hasattr(self.adapter, "reset"):
            self.adapter.reset()
        return self


def repeat_cond(cond: dict[str, Any], n: int) -> dict[str, Any]:
    out = {}
    for k, v in cond.items():
        out[k] = repeat_cond(v, n) if isinstance(v, dict) else v.expand(n, *v.shape[1:])
    return out


_repeat_cond = repeat_cond


def weights_digest(*modules: nn.Module | None) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes) of the given modules.

    Hashes the tensors' own memory (no ``.tobytes()`` copy), so it costs no extra RAM on a multi-GB model."""
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for name, t in sorted(m.state_dict().items()):
            t = t.detach()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                if t.device.type != "cpu":
                    t = t.cpu()
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


weights_hash = weights_digest  # the old name (module-level function)


def tokenizer_digest(tok: Any) -> str:
    """Class, vocabulary and maximum length of a tokenizer."""
    try:
        vocab = sorted(tok.get_vocab().items())
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: identify it by class only
        vocab = []
    blob = json.dumps([type(tok).__name__, getattr(tok, "model_max_length", None), vocab], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe(model: DiffusionModel) -> dict[str, Any]:
    """One table row about a loaded model."""
    spec = model.info.get("spec", {})
    return {
        "model": model.model_id,
        "kind": model.kind,
        "class": type(model.denoiser).__name__,
        "noise": f"{model.noise.convention}/{model.prediction_type}",
        "h_block": model.h_block,
        "params_M": round(sum(p.numel() for p in model.denoiser.parameters()) / 1e6, 3),
        "image_size": model.native_image_size,
        "dataset": model.info.get("dataset"),
        "conditioning": spec.get("conditioning"),
        "train_steps": spec.get("train", {}).get("steps"),
        "train_seconds": model.info.get("train_seconds"),
        "final_loss": model.info.get("final_loss"),
        "weights_hash": model.weights_hash,
        "folder": str(model.folder) if model.folder else None,
    }
