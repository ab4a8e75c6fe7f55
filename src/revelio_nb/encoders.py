"""Vision encoders as feature sources for the same probes: the baselines Revelio compares diffusion features with.

Any ``transformers`` vision backbone of an allow-listed class (CLIP / SigLIP vision towers, DINOv2, ViT, ConvNeXt,
see :data:`ENCODER_CLASSES`), given by local folder or hub id, becomes a :class:`VisionEncoder`;
:func:`extract_encoder_features` writes its features into the **same feature-store format** as diffusion features
(manifest, one ``.npy`` per array, chunked resumable writes with checksums: the store writer of
:mod:`revelio_nb.features`), so :mod:`revelio_nb.probes` reads them unchanged. "Blocks" of an encoder:

* ``cls``: the image-level vector: the CLS token after the final norm (CLIP's ``pooler_output``, DINOv2's normed
  CLS, ViT's CLS token); for models without a CLS token their own pooled output (SigLIP's attention-pooling head,
  ConvNeXt's normed global average); for ``CLIPVisionModelWithProjection`` the projected ``image_embeds``;
* ``mean``: the mean of the final layer's patch tokens (CLS and register tokens excluded) / of ConvNeXt's last map;
* ``patch``: the final layer's patch tokens on their grid, a spatial map (C, h, w) for Diff-C;
* ``layers.N``: the output of layer N (0 = embeddings) as a (C, h, w) grid (ConvNeXt: stage N's map).

An encoder has no timestep: its arrays are stored at the pseudo-timestep :data:`NO_TIMESTEP` (-1, as the pixel
baselines' rows). Preprocessing follows the folder's ``preprocessor_config.json`` (resize, centre crop, rescale,
normalise), implemented with torch on whole batches; it matches transformers' PIL image processors up to one grey
level of rounding (a test checks it). Grayscale images are repeated to 3 channels (PIL's ``convert("RGB")``).
Weights are read from safetensors only, through the concrete allow-listed class: never ``trust_remote_code``, never
pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .data import ImageDataset, load_dataset
from .features.extract import PRECISIONS, resolve_device, stratified_subset
from .features.microbatch import MicroBatch
from .features.store import (STORE_DTYPES, FeatureStore, StoreMismatchError, allocate_store, array_key, chunk_sha,
                             open_for_writing, write_manifest, writing)
from .paths import cache_dir, config_hash

NO_TIMESTEP = -1  # the pseudo-timestep of encoder arrays (an encoder sees clean images once)
SPLITS = ("train", "val", "test")
BASE_BLOCKS = ("cls", "mean", "patch")

# config.json "architectures" entry -> the transformers class that is loaded (a full CLIP / SigLIP checkpoint: its
# vision tower; an image classifier: its backbone without the head)
ENCODER_CLASSES: dict[str, str] = {
    "CLIPVisionModel": "CLIPVisionModel",
    "CLIPVisionModelWithProjection": "CLIPVisionModelWithProjection",
    "CLIPModel": "CLIPVisionModel",
    "SiglipVisionModel": "SiglipVisionModel",
    "SiglipModel": "SiglipVisionModel",
    "Dinov2Model": "Dinov2Model",
    "Dinov2WithRegistersModel": "Dinov2WithRegistersModel",
    "ViTModel": "ViTModel",
    "ViTForImageClassification": "ViTModel",
    "ConvNextModel": "ConvNextModel",
    "ConvNextForImageClassification": "ConvNextModel",
    "ConvNextV2Model": "ConvNextV2Model",
    "ConvNextV2ForImageClassification": "ConvNextV2Model",
}
# config.json "model_type" -> class, for folders whose config has no "architectures"
MODEL_TYPES: dict[str, str] = {
    "clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel", "convnext": "ConvNextModel", "convnextv2": "ConvNextV2Model",
}
CONV_CLASSES = ("ConvNextModel", "ConvNextV2Model")  # outputs are (B, C, h, w) maps, not token sequences
CLS_FROM_TOKEN = ("ViTModel",)  # ViT's pooler is an extra dense + tanh: its CLS token is used instead


class EncoderError(ValueError):
    """A vision encoder could not be resolved, loaded or used as asked."""


# ------------------------------------------------------------------------------------------ preprocessing

# PIL resampling ids (transformers' "resample"): name, support of the filter (0: nearest neighbour)
_RESAMPLE = {0: ("nearest", 0.0), 1: ("lanczos", 3.0), 2: ("bilinear", 1.0), 3: ("bicubic", 2.0), 4: ("box", 0.5),
             5: ("hamming", 1.0)}


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    """PIL's resampling filters (Resample.c), on distances ``x`` in input pixels (scaled when downsampling)."""
    ax = np.abs(x)
    if name == "bicubic":  # a = -0.5, as PIL
        a = -0.5
        return np.where(ax < 1, ((a + 2) * ax - (a + 3)) * ax * ax + 1,
                        np.where(ax < 2, (((ax - 5) * ax + 8) * ax - 4) * a, 0.0))
    if name == "bilinear":
        return np.clip(1.0 - ax, 0.0, None)
    if name == "box":
        return ((x >= -0.5) & (x < 0.5)).astype(np.float64)
    if name == "hamming":
        return np.where(ax < 1, np.sinc(x) * (0.46 + 0.54 * np.cos(np.pi * x)), 0.0)
    return np.where(ax < 3, np.sinc(x) * np.sinc(x / 3), 0.0)  # lanczos


@lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int, resample: int) -> torch.Tensor:
    """(n_out, n_in) weights of PIL's separable resize along one axis (its ``precompute_coeffs``)."""
    name, support = _RESAMPLE[resample]
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support *= fscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = _filter(name, (np.arange(lo, hi) - center + 0.5) / fscale)
        m[i, lo:hi] = w / w.sum() if w.sum() else 0.0
    return torch.from_numpy(m).float()


def pil_resize(x: torch.Tensor, size: tuple[int, int], resample: int = 3) -> torch.Tensor:
    """Resize float 8-bit images (B, C, H, W) in [0, 255] to ``size`` exactly as PIL resizes uint8 images: the
    horizontal pass then the vertical one, each rounded to whole grey levels (PIL's intermediate image is 8-bit)."""
    h, w = size
    if _RESAMPLE[resample][0] == "nearest":
        return F.interpolate(x, size=(h, w), mode="nearest-exact")
    if x.shape[-1] != w:
        x = torch.einsum("bchw,vw->bchv", x, _resample_matrix(x.shape[-1], w, resample)).add(0.5).floor().clamp(0, 255)
    if x.shape[-2] != h:
        x = torch.einsum("bchw,uh->bcuw", x, _resample_matrix(x.shape[-2], h, resample)).add(0.5).floor().clamp(0, 255)
    return x


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# the defaults of transformers' image processors, per family (what a preprocessor_config.json leaves out)
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIP": dict(resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"shortest_edge": 224},
                 crop_size={"height": 224, "width": 224}, do_center_crop=True, default_to_square=False),
    "Bit": dict(resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"shortest_edge": 224},
                crop_size={"height": 224, "width": 224}, do_center_crop=True, default_to_square=False),
    "Siglip": dict(resample=3, image_mean=HALF, image_std=HALF, size={"height": 224, "width": 224},
                   do_center_crop=False, default_to_square=False),
    "ViT": dict(resample=2, image_mean=HALF, image_std=HALF, size={"height": 224, "width": 224},
                do_center_crop=False, default_to_square=True),
    "ConvNext": dict(resample=3, image_mean=HALF, image_std=HALF, size={"shortest_edge": 384}, crop_pct=224 / 256,
                     do_center_crop=False, default_to_square=False),
}


def _processor_family(name: str) -> str | None:
    stem = re.sub(r"(ImageProcessor(Fast|Pil)?|FeatureExtractor)$", "", name or "")
    return stem if stem in PROCESSOR_DEFAULTS else None


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing of a vision encoder (what its ``preprocessor_config.json`` says), on torch batches.

    ``resize``: ``("shortest_edge", n)`` (the shorter side to n, aspect kept, as torchvision), ``("exact", h, w)``
    or ``("crop_pct", n, pct)`` (ConvNeXt below 384: the shorter side to ``int(n / pct)`` then an n x n centre
    crop); ``crop``: (h, w) centre crop after the resize, or None. Pixels are rescaled by ``rescale_factor`` and
    normalised with ``mean`` / ``std`` per channel.
    """

    resize: tuple | None
    crop: tuple[int, int] | None
    resample: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    channels: int = 3
    family: str = ""

    @classmethod
    def from_config(cls, cfg: dict[str, Any], channels: int = 3) -> "Preprocess":
        """From a ``preprocessor_config.json`` dict (keys it leaves out take its processor family's defaults)."""
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
        family = _processor_family(kind)
        if family is None:
            raise EncoderError(f"unsupported image processor {kind!r} in preprocessor_config.json; supported: "
                               f"{sorted(f + 'ImageProcessor' for f in PROCESSOR_DEFAULTS)} (or their FeatureExtractor "
                               f"names); write one of them as image_processor_type with size / crop_size / image_mean "
                               f"/ image_std / resample")
        d = {**PROCESSOR_DEFAULTS[family], **{k: v for k, v in cfg.items() if v is not None}}
        size, square = d.get("size"), bool(d.get("default_to_square", False))
        if isinstance(size, (int, float)):
            size = {"height": int(size), "width": int(size)} if square else {"shortest_edge": int(size)}
        if isinstance(size, (list, tuple)):
            size = {"height": int(size[0]), "width": int(size[-1])}
        resize = None
        if d.get("do_resize", True):
            if not isinstance(size, dict) or not (("height" in size and "width" in size) or "shortest_edge" in size):
                raise EncoderError(f"preprocessor size {size!r} is not supported: give {{'shortest_edge': n}} or "
                                   f"{{'height': h, 'width': w}}")
            if family == "ConvNext":
                n = int(size.get("shortest_edge", size.get("height", 384)))
                resize = ("crop_pct", n, float(d.get("crop_pct") or 224 / 256)) if n < 384 else ("exact", n, n)
            elif "shortest_edge" in size:
                resize = ("shortest_edge", int(size["shortest_edge"]))
            else:
                resize = ("exact", int(size["height"]), int(size["width"]))
        crop = None
        if d.get("do_center_crop") and family != "ConvNext":
            c = d.get("crop_size") or {}
            if isinstance(c, (int, float)):
                c = {"height": int(c), "width": int(c)}
            crop = (int(c["height"]), int(c["width"]))
        mean = tuple(float(m) for m in np.broadcast_to(d.get("image_mean"), (channels,)))
        std = tuple(float(s) for s in np.broadcast_to(d.get("image_std"), (channels,)))
        if not d.get("do_normalize", True):
            mean, std = (0.0,) * channels, (1.0,) * channels
        resample = int(d.get("resample", 3))
        if resample not in _RESAMPLE:
            raise EncoderError(f"unknown resample {resample!r}; valid PIL ids: "
                               f"{ {k: v[0] for k, v in _RESAMPLE.items()} }")
        rescale = float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0
        return cls(resize=resize, crop=crop, resample=resample, mean=mean, std=std, rescale_factor=rescale,
                   channels=channels, family=family)

    def identity(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of an h x w image after preprocessing."""
        h, w = self._resized_size(h, w)
        if self.resize is not None and self.resize[0] == "crop_pct":
            h = w = int(self.resize[1])
        return self.crop if self.crop is not None else (h, w)

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        if self.resize[0] == "exact":
            return int(self.resize[1]), int(self.resize[2])
        short = int(self.resize[1]) if self.resize[0] == "shortest_edge" else int(self.resize[1] / self.resize[2])
        if w <= h:  # as transformers' get_resize_output_image_size(default_to_square=False)
            return int(short * h / w), short
        return short, int(short * w / h)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, C) with C in {1, 3} (a dataset's ``images``) -> float (B, channels, h, w)."""
        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise EncoderError(f"images must be (B, H, W, 1|3) uint8, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition (PIL's convert("RGB"))
        elif self.channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # PIL's "L"
        h, w = self._resized_size(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = pil_resize(x, (h, w), self.resample)
        if self.resize is not None and self.resize[0] == "crop_pct":
            x = _center_crop(x, int(self.resize[1]), int(self.resize[1]))
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x * self.rescale_factor - mean) / std


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """Centre crop as transformers' ``center_crop`` (top = (H - h) // 2); zero-padded when the image is smaller."""
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        ph, pw = max(0, ch - h), max(0, cw - w)
        x = F.pad(x, ((pw + 1) // 2, pw - (pw + 1) // 2, (ph + 1) // 2, ph - (ph + 1) // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


# ------------------------------------------------------------------------------------------ the encoder


def _weights_hash(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes) of the module (no copies)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


@dataclass
class VisionEncoder:
    """A loaded vision backbone: its module, preprocessing and identity (weights hash)."""

    encoder_id: str  # what was asked for: a hub id or a folder
    model: nn.Module
    arch: str  # the transformers class loaded
    preprocess: Preprocess
    weights_hash: str
    folder: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short label for tables: the hub id, or the folder's name."""
        return self.encoder_id if not Path(self.encoder_id).expanduser().exists() else Path(self.encoder_id).name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_conv(self) -> bool:
        return self.arch in CONV_CLASSES

    @property
    def n_layers(self) -> int:
        """Number of ``layers.N`` outputs beyond the embeddings (N runs 0..n_layers)."""
        cfg = self.model.config
        return int(getattr(cfg, "num_stages", None) or len(cfg.depths)) if self.is_conv else int(cfg.num_hidden_layers)

    def valid_blocks(self) -> list[str]:
        return [*BASE_BLOCKS, *(f"layers.{i}" for i in range(self.n_layers + 1))]

    def check_blocks(self, blocks: Sequence[str]) -> list[str]:
        blocks = [blocks] if isinstance(blocks, str) else list(blocks)
        if not blocks:
            raise EncoderError(f"no blocks given; valid blocks of {self.name}: {self.valid_blocks()}")
        bad = [b for b in blocks if b not in self.valid_blocks()]
        if bad:
            raise EncoderError(f"unknown block(s) {bad} of encoder {self.name} ({self.arch}); valid: "
                               f"{self.valid_blocks()}")
        if len(set(blocks)) != len(blocks):
            raise EncoderError(f"blocks has duplicates: {blocks}")
        return blocks

    def to(self, device: str | torch.device) -> "VisionEncoder":
        self.model.to(device)
        return self

    def _accepts(self, arg: str) -> bool:
        import inspect

        return arg in inspect.signature(self.model.forward).parameters

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return self.preprocess.output_size(h, w)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
        """Preprocessed images (B, C, h, w) -> {block: (B, D) vector or (B, D, gh, gw) grid} (float32)."""
        layers = [int(b.split(".", 1)[1]) for b in blocks if b.startswith("layers.")]
        kw = {"output_hidden_states": True} if layers else {}
        native = getattr(self.model.config, "image_size", None)
        if native and tuple(pixel_values.shape[-2:]) != (native, native) and self._accepts("interpolate_pos_encoding"):
            kw["interpolate_pos_encoding"] = True  # an input size other than the checkpoint's (CLIP, SigLIP, ViT)
        out = self.model(pixel_values=pixel_values.to(self.device, next(self.model.parameters()).dtype), **kw)
        res: dict[str, torch.Tensor] = {}
        if self.is_conv:
            last = out.last_hidden_state
            grids = {"patch": last, **{f"layers.{i}": out.hidden_states[i] for i in layers}}
            pooled = {"cls": out.pooler_output, "mean": last.mean(dim=(2, 3))}
        else:
            h, w = pixel_values.shape[-2:]
            p = self.model.config.patch_size
            p = (p, p) if isinstance(p, int) else tuple(p)
            gh, gw = h // p[0], w // p[1]

            def grid(tokens: torch.Tensor) -> torch.Tensor:
                n_prefix = tokens.shape[1] - gh * gw  # CLS and register tokens come first
                if n_prefix < 0:
                    raise EncoderError(f"{self.name}: {tokens.shape[1]} tokens cannot hold a {gh}x{gw} patch grid")
                return tokens[:, n_prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)

            last = out.last_hidden_state
            patch = grid(last)
            grids = {"patch": patch, **{f"layers.{i}": grid(out.hidden_states[i]) for i in layers}}
            if self.arch == "CLIPVisionModelWithProjection":
                cls_vec = out.image_embeds
            elif self.arch in CLS_FROM_TOKEN:
                cls_vec = last[:, 0]
            else:
                cls_vec = getattr(out, "pooler_output", None)
            pooled = {"cls": cls_vec, "mean": patch.mean(dim=(2, 3))}
        for b in blocks:
            v = grids.get(b) if b in grids else pooled.get(b)
            if v is None:
                raise EncoderError(f"encoder {self.name} ({self.arch}) has no {b!r} output (e.g. a SigLIP tower "
                                   f"without its pooling head has no 'cls'); use 'mean' instead")
            res[b] = v.float()
        return res

    def shapes(self, blocks: Sequence[str], image_hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Per-image output shape of each block for images of size ``image_hw`` (one dummy forward pass)."""
        x = self.preprocess(np.zeros((1, *image_hw, 3), dtype=np.uint8))
        return {b: tuple(f.shape[1:]) for b, f in self.features(x, blocks).items()}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports and weight-loading progress bars off for a moment (restored afterwards)."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _resolve_class(folder: Path) -> str:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EncoderError(f"encoder folder {folder} has no config.json (expected a transformers model folder: "
                           f"config.json, preprocessor_config.json, model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ENCODER_CLASSES:
            return ENCODER_CLASSES[a]
    if not archs and cfg.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[cfg["model_type"]]
    raise EncoderError(f"{folder}: model class {archs or cfg.get('model_type')!r} is not an allowed vision encoder; "
                       f"allowed classes: {sorted(ENCODER_CLASSES)} (remote code is never run)")


def load_encoder_folder(folder: str | os.PathLike, encoder_id: str | None = None) -> VisionEncoder:
    """Load an allow-listed vision backbone from a transformers folder (safetensors weights only)."""
    import transformers

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EncoderError(f"encoder folder {folder} does not exist")
    arch = _resolve_class(folder)
    if not any(folder.glob("*.safetensors")):
        raise EncoderError(f"{folder} has no .safetensors weights; pickled weights (pytorch_model.bin) are never "
                           f"loaded: convert them to safetensors first")
    pp_file = folder / "preprocessor_config.json"
    if not pp_file.is_file():
        raise EncoderError(f"{folder} has no preprocessor_config.json: copy the one of the checkpoint's hub repo, or "
                           f"write one (image_processor_type, size, crop_size, image_mean, image_std, resample)")
    cls = getattr(transformers, arch)
    with _quiet_transformers():  # a CLIP checkpoint's unused text tower is not worth a load report
        model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
    model.requires_grad_(False)
    channels = int(getattr(model.config, "num_channels", 3) or 3)
    preprocess = Preprocess.from_config(json.loads(pp_file.read_text()), channels=channels)
    return VisionEncoder(encoder_id=encoder_id or str(folder), model=model, arch=arch, preprocess=preprocess,
                         weights_hash=_weights_hash(model), folder=folder,
                         info={"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})


def _hub_snapshot(repo_id: str) -> Path:
    """The hub repo's config, preprocessing and safetensors weights in the Hugging Face cache (as diffusion models)."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=offline,
                                      allow_patterns=["config.json", "preprocessor_config.json", "*.safetensors",
                                                      "*.safetensors.index.json"]))
    except Exception as e:
        why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else \
            f"it could not be fetched ({type(e).__name__}: {str(e)[:160]})"
        raise EncoderError(
            f"vision encoder {repo_id!r} is not a local folder and {why}. Pass a local folder instead: one with "
            f"config.json, preprocessor_config.json and model.safetensors (e.g. `huggingface-cli download {repo_id}` "
            f"on a machine with network, or `model.save_pretrained(folder)`)") from e


def load_encoder(source: str | os.PathLike) -> VisionEncoder:
    """A vision encoder by local folder or hub id (``"facebook/dinov2-small"``, ``"openai/clip-vit-base-patch16"``)."""
    src = str(source)
    if Path(src).expanduser().exists():
        return load_encoder_folder(src)
    if "/" in src and not src.startswith((".", "/", "~")) and src.count("/") == 1:
        return load_encoder_folder(_hub_snapshot(src), encoder_id=src)
    raise EncoderError(f"unknown vision encoder {src!r}: not an existing folder and not a hub id (owner/name); "
                       f"e.g. 'facebook/dinov2-small', 'openai/clip-vit-base-patch16' or a local folder")


# ------------------------------------------------------------------------------------------ feature stores


@dataclass
class EncoderExtractionConfig:
    """What to extract from a vision encoder. Every field but ``device`` is part of the store identity."""

    encoder: str  # hub id or local folder
    dataset: str = "animal-mnist"
    split: str = "train"
    blocks: list[str] = field(default_factory=lambda: list(BASE_BLOCKS))
    max_images: int | None = None  # seeded, class-stratified subset of the split (as ExtractionConfig)
    classes: list[int] | None = None
    seed: int = 0  # of the subset
    batch_size: int = 32  # also the store's chunk size
    store_dtype: str = "float16"
    precision: str = "fp32"  # autocast dtype of the encoder pass: "fp32" | "fp16" | "bf16"
    device: str = "auto"

    def validate(self) -> "EncoderExtractionConfig":
        if self.store_dtype not in STORE_DTYPES:
            raise EncoderError(f"store_dtype {self.store_dtype!r} is not one of {list(STORE_DTYPES)}")
        if self.precision not in PRECISIONS:
            raise EncoderError(f"precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.split not in SPLITS:
            raise EncoderError(f"split {self.split!r} is not one of {list(SPLITS)}")
        if isinstance(self.blocks, str):
            self.blocks = [self.blocks]
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EncoderError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise EncoderError(f"max_images must be None or a positive integer, got {self.max_images!r}")
        return self

    def identity(self) -> dict[str, Any]:
        """The store's ``config``: the fields of a diffusion store's config that probes and SAEs read (model,
        dataset, split, blocks, timesteps, pooling ...), with the encoder as ``model``."""
        d = asdict(self)
        d.pop("device")
        d["model"] = d.pop("encoder")
        d["timesteps"] = [NO_TIMESTEP]
        d["pooling"] = "encoder"  # per block: vectors (cls, mean) or grids (patch, layers.N)
        return d


def dataset_rows_hash(ds: ImageDataset, indices: np.ndarray) -> str:
    """Content hash of the rows a store holds: their images, labels and the class names."""
    h = hashlib.sha256()
    idx = np.asarray(indices, dtype=np.int64)
    h.update(idx.tobytes())
    h.update(np.ascontiguousarray(ds.images[idx]).tobytes())
    h.update(np.ascontiguousarray(ds.labels[idx]).tobytes())
    h.update(json.dumps(list(ds.class_names)).encode())
    return h.hexdigest()[:16]


def encoder_store_key(cfg: EncoderExtractionConfig, encoder: VisionEncoder, ds: ImageDataset,
                      indices: np.ndarray) -> str:
    """The key of an encoder store: everything that changes the stored numbers (the config, the encoder's weights,
    its preprocessing, the content of the dataset rows). The one place encoder keys are built (recorded in the
    manifest as ``key``, like diffusion stores)."""
    return config_hash({"cfg": cfg.identity(), "weights": encoder.weights_hash,
                        "preprocess": encoder.preprocess.identity(), "rows": dataset_rows_hash(ds, indices)})


def encoder_store_dir(cfg: EncoderExtractionConfig, encoder: VisionEncoder, ds: ImageDataset,
                      indices: np.ndarray) -> Path:
    """``<cache>/features/enc-<encoder>-<dataset>-<split>-<key>`` (:func:`encoder_store_key`)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.name)[-40:]
    ds_slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ds.name)[-24:]
    return cache_dir("features") / f"enc-{slug}-{ds_slug}-{cfg.split}-{encoder_store_key(cfg, encoder, ds, indices)}"


def _create_encoder_store(path: Path, cfg: EncoderExtractionConfig, encoder: VisionEncoder, ds: ImageDataset,
                          indices: np.ndarray) -> FeatureStore:
    hw = tuple(ds.images.shape[1:3])
    shapes = encoder.shapes(cfg.blocks, hw)
    n = len(indices)
    arrays = {}
    for b in cfg.blocks:
        key = array_key(b, NO_TIMESTEP)
        arrays[key] = {"file": key + ".npy", "block": b, "t": NO_TIMESTEP, "shape": [n, *shapes[b]],
                       "kind": "vector" if len(shapes[b]) == 1 else "grid"}
    manifest = {
        "format": "revelio-feature-store/1",
        "source": "vision-encoder",
        "config": cfg.identity(),
        "model_id": encoder.encoder_id,
        "model_kind": f"encoder:{encoder.arch}",
        "weights_hash": encoder.weights_hash,
        "key": encoder_store_key(cfg, encoder, ds, indices),
        "preprocess": encoder.preprocess.identity(),
        "dataset": ds.name,
        "dataset_fingerprint": dataset_rows_hash(ds, indices),
        "class_names": ds.class_names,
        "split": cfg.split,
        "image_size": list(encoder.input_size(*hw)),
        "n_rows": n,
        "chunk_size": cfg.batch_size,
        "n_chunks": (n + cfg.batch_size - 1) // cfg.batch_size,
        "arrays": arrays,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return allocate_store(path, manifest, ds.labels[indices], indices)


@torch.no_grad()
def extract_encoder_features(cfg: EncoderExtractionConfig, encoder: VisionEncoder | None = None,
                             dataset: ImageDataset | None = None, out_dir: str | os.PathLike | None = None,
                             verify: bool = True, progress: bool = True) -> FeatureStore:
    """Encoder features of one split into a feature store (cached; an interrupted run resumes; chunks whose
    checksum fails are recomputed), in the format :class:`revelio_nb.features.FeatureStore` reads."""
    cfg.validate()
    encoder = encoder or load_encoder(cfg.encoder)
    if str(encoder.encoder_id) != str(cfg.encoder):
        raise EncoderError(f"cfg.encoder {cfg.encoder!r} is not the encoder passed ({encoder.encoder_id!r})")
    cfg.blocks = encoder.check_blocks(cfg.blocks)
    device = resolve_device(cfg.device)
    if encoder.device != device:
        encoder.to(device)
    ds = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    split_idx = ds.split(cfg.split)
    indices = split_idx if cfg.max_images is None else stratified_subset(
        split_idx, ds.labels[split_idx], cfg.max_images, cfg.seed)
    path = Path(out_dir) if out_dir is not None else encoder_store_dir(cfg, encoder, ds, indices)
    key = encoder_store_key(cfg, encoder, ds, indices)

    def same_key(st: FeatureStore) -> None:  # e.g. an out_dir store made from other images or preprocessing
        if st.manifest.get("key") != key:
            raise StoreMismatchError(f"feature store {path} was made from another encoder, preprocessing or dataset "
                                     f"rows (key {st.manifest.get('key')!r}, asked for {key!r}); use another "
                                     f"out_dir, or delete it to extract again")

    store, rec = open_for_writing(path, cfg.identity(), encoder.weights_hash,
                                  lambda: _create_encoder_store(path, cfg, encoder, ds, indices), verify=verify,
                                  check=same_key)
    if rec is None:
        return store

    def open_arrays() -> dict[str, np.memmap]:
        with writing(path, "the feature arrays"):
            return {k: np.load(path / m["file"], mmap_mode="r+") for k, m in store.manifest["arrays"].items()}

    open_arrays()  # fail early when the folder is not writable
    todo = [c for c in range(store.manifest["n_chunks"]) if c not in store.done_chunks()]
    micro = MicroBatch(store.manifest["chunk_size"])
    autocast_dtype = PRECISIONS[cfg.precision]
    bar = tqdm(total=sum(store.chunk_rows(c).stop - store.chunk_rows(c).start for c in todo),
               desc=f"encode {encoder.name} {cfg.split}", unit="img", disable=not progress)
    for c in todo:
        rows = store.chunk_rows(c)
        x = encoder.preprocess(ds.images[indices[rows]])

        def forward(s: slice) -> dict[str, torch.Tensor]:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return {b: f.cpu() for b, f in encoder.features(x[s], cfg.blocks).items()}

        parts = micro.run(forward, len(x), "encoder pass")
        arrays, sums = open_arrays(), {}
        with writing(path, f"chunk {c}"):
            for b in cfg.blocks:
                key = array_key(b, NO_TIMESTEP)
                f = parts[0][b] if len(parts) == 1 else torch.cat([p[b] for p in parts])
                arrays[key][rows] = f.numpy().astype(cfg.store_dtype)
                arrays[key].flush()
                sums[key] = chunk_sha(arrays[key][rows])
        del arrays
        rec.record(c, sums)
        bar.update(len(x))
    bar.close()
    if len(store.done_chunks()) == store.manifest["n_chunks"]:
        store.manifest["status"] = "complete"
        store.manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_manifest(store)
    return FeatureStore(path, store.manifest)


def extract_encoder_splits(cfg: EncoderExtractionConfig, encoder: VisionEncoder | None = None,
                           dataset: ImageDataset | None = None, splits: Sequence[str] = SPLITS,
                           progress: bool = True) -> dict[str, FeatureStore]:
    """:func:`extract_encoder_features` for several splits (each its own cached store)."""
    encoder = encoder or load_encoder(cfg.encoder)
    dataset = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    return {s: extract_encoder_features(replace(cfg, split=s), encoder, dataset, progress=progress) for s in splits}


# ------------------------------------------------------------------------------------------ probes


def encoder_runs(encoder: str | VisionEncoder, dataset: str | ImageDataset, blocks: Sequence[str] = BASE_BLOCKS,
                 seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                 max_images: int | None = None, linear=None, diffc=None, batch_size: int = 32,
                 store_dtype: str = "float16", precision: str = "fp32", device: str = "auto", progress: bool = True,
                 **extra: Any):
    """The encoder's rows of the transfer table, on the dataset's train / val / test splits (the splits the
    diffusion probes use; ``max_images``: the same seeded stratified subset per split).

    A linear probe (``C`` chosen on validation) on every pooled block: ``cls``, ``mean``, and the spatial mean of
    each ``layers.N`` grid (the ``patch`` grid's mean *is* ``mean``, so it is fitted only when ``mean`` is not asked
    for); features are deterministic, so it is fitted once. Diff-C on every grid block (``patch``, ``layers.N``),
    once per seed. One tidy row per (block, method, seed) with ``features = "encoder: <name>"``,
    ``t = NO_TIMESTEP``, ``dataset`` and ``model``.
    """
    import pandas as pd

    from .probes import DiffCConfig, LinearProbeConfig, ProbeError, fit_linear_probe, probe_data, train_diffc

    bad = [m for m in methods if m not in ("linear", "diffc")]
    if bad:
        raise ProbeError(f"unknown methods {bad}; valid: ['linear', 'diffc']")
    enc = encoder if isinstance(encoder, VisionEncoder) else load_encoder(encoder)
    ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset)
    blocks = enc.check_blocks(blocks)
    cfg = EncoderExtractionConfig(encoder=enc.encoder_id, dataset=ds.name, blocks=blocks, max_images=max_images,
                                  batch_size=batch_size, store_dtype=store_dtype, precision=precision, device=device)
    stores = extract_encoder_splits(cfg, enc, ds, progress=progress)
    info = {"features": f"encoder: {enc.name}", "model": enc.encoder_id, "dataset": ds.name, **extra}
    rows = []
    for b in blocks:
        d = probe_data(stores, (b, NO_TIMESTEP))
        if "linear" in methods and (not d.spatial or b != "patch" or "mean" not in blocks):
            rows.append(fit_linear_probe(d, linear or LinearProbeConfig()).row(block=b, t=NO_TIMESTEP, **info))
        if "diffc" in methods and d.spatial:
            for s in seeds:
                r = train_diffc(d, replace(diffc or DiffCConfig(), seed=int(s)), progress=progress)
                rows.append(r.row(block=b, t=NO_TIMESTEP, **info))
    return pd.DataFrame(rows)


def describe_encoder(encoder: VisionEncoder, image_hw: tuple[int, int] = (28, 28)) -> dict[str, Any]:
    """One row for a table: what the encoder is and how it sees an image of ``image_hw``."""
    return {"encoder": encoder.name, "class": encoder.arch, "params_M": encoder.info.get("params_M"),
            "preprocessing": encoder.preprocess.family, "input": "x".join(map(str, encoder.input_size(*image_hw))),
            "blocks": ", ".join(encoder.valid_blocks()), "weights_hash": encoder.weights_hash}


# ------------------------------------------------------------------------------------------ tiny random encoders

TINY_KINDS = ("clip", "clip-full", "siglip", "dinov2", "vit", "convnext")


def _tiny_model(kind: str):
    import transformers as T

    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)
    if kind == "clip":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**vit)), "CLIPImageProcessor"
    if kind == "clip-full":  # a whole CLIP checkpoint (text tower included), as openai/clip-vit-base-patch16
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return T.CLIPModel(T.CLIPConfig(vision_config=vit, text_config=text, projection_dim=16)), "CLIPImageProcessor"
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**vit)), "SiglipImageProcessor"
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(**vit), add_pooling_layer=False), "ViTImageProcessor"
    if kind == "dinov2":
        cfg = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28,
                             patch_size=7)
        return T.Dinov2Model(cfg), "BitImageProcessor"
    if kind == "convnext":
        return T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=4,
                                                image_size=32)), "ConvNextImageProcessor"
    raise EncoderError(f"unknown tiny encoder kind {kind!r}; valid: {list(TINY_KINDS)}")


def save_tiny_random(folder: str | os.PathLike, kind: str = "clip", seed: int = 0) -> Path:
    """Write a tiny random-weight vision encoder folder (config.json, model.safetensors, preprocessor_config.json)
    of an allow-listed class: for tests and smoke runs only (its features carry no pretrained knowledge).

    Images are preprocessed to 32x32 (DINOv2: resized to 32, centre-cropped to 28, patch 7), giving a 4x4 patch
    grid. The folder is written to a temporary sibling and renamed, so it is either complete or absent.
    """
    folder = Path(folder).expanduser()
    if (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model, processor = _tiny_model(kind)
    pp = {"image_processor_type": processor, "resample": 3, "do_resize": True, "do_rescale": True,
          "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    if kind == "dinov2":
        pp.update(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True)
    elif kind in ("clip", "clip-full"):
        pp.update(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True)
    elif kind == "convnext":
        pp.update(size={"shortest_edge": 32}, crop_pct=0.875)  # < 384: shorter side to int(32 / 0.875) = 36, crop 32
    else:
        pp.update(size={"height": 32, "width": 32})
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
