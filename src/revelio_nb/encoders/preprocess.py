"""Image preprocessing of a vision encoder, as its ``preprocessor_config.json`` says (resize, centre crop, rescale,
normalise), implemented with torch on whole batches: :class:`Preprocess`, :func:`pil_resize` (PIL's resampling
filters as matrices). It matches transformers' PIL image processors up to one grey level of rounding.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .allowlist import EncoderError


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
