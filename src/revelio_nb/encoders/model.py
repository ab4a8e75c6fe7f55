"""A loaded vision backbone (:class:`VisionEncoder`: module, preprocessing, weights hash, its blocks' outputs) and its
loading from a local folder or a hub id (:func:`load_encoder`), through the allow-listed class only, safetensors
weights only.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from .allowlist import BASE_BLOCKS, CLS_FROM_TOKEN, CONV_CLASSES, ENCODER_CLASSES, MODEL_TYPES, EncoderError
from .preprocess import Preprocess


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
def quiet_transformers() -> Iterator[None]:
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
    with quiet_transformers():  # a CLIP checkpoint's unused text tower is not worth a load report
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


def describe_encoder(encoder: VisionEncoder, image_hw: tuple[int, int] = (28, 28)) -> dict[str, Any]:
    """One row for a table: what the encoder is and how it sees an image of ``image_hw``."""
    return {"encoder": encoder.name, "class": encoder.arch, "params_M": encoder.info.get("params_M"),
            "preprocessing": encoder.preprocess.family, "input": "x".join(map(str, encoder.input_size(*image_hw))),
            "blocks": ", ".join(encoder.valid_blocks()), "weights_hash": encoder.weights_hash}
