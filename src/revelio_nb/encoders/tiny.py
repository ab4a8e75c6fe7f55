"""Tiny random-weight vision encoders of every allow-listed kind (:func:`save_tiny_random`): for tests and smoke runs
only (their features carry no pretrained knowledge).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .allowlist import EncoderError
from .model import quiet_transformers
from .preprocess import CLIP_MEAN, CLIP_STD


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
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
