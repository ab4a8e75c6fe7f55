"""Shared fixtures: an isolated cache, and tiny random-weight diffusers models saved to disk and loaded by path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache (data/cache)."""
    old = os.environ.get("REVELIO_CACHE")
    os.environ["REVELIO_CACHE"] = str(tmp_path_factory.mktemp("revelio-cache"))
    yield
    if old is None:
        os.environ.pop("REVELIO_CACHE", None)
    else:
        os.environ["REVELIO_CACHE"] = old


def _scheduler(folder: Path) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")


def save_tiny_unet(folder: Path, seed: int = 0, num_class_embeds: int | None = None,
                   block_out_channels: tuple[int, int] = (8, 16), norm_num_groups: int = 4) -> Path:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=block_out_channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=norm_num_groups, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    _scheduler(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    return folder


def save_tiny_unet16(folder: Path) -> Path:
    """A random-weight 16 px grayscale UNet2DModel saved as a single-model diffusers folder."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread, as in spawned worker processes, so results compare bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny_dit(folder: Path, seed: int = 0) -> Path:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=2,
        norm_num_groups=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10,
    )
    dit.save_pretrained(folder / "transformer", safe_serialization=True)
    _scheduler(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    return folder


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """A Stable-Diffusion-shaped pipeline folder: UNet2DConditionModel + AutoencoderKL + CLIP text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(folder / "_vocab", chars="abcdefghijklmnopqrstuvwxyz")
    tok.save_pretrained(folder / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64,
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    _scheduler(folder)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_unet_path(tmp_path_factory) -> Path:
    return save_tiny_unet(tmp_path_factory.mktemp("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_dit_path(tmp_path_factory) -> Path:
    return save_tiny_dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory) -> Path:
    """Folder of a tiny random SD-style pipeline, to be loaded by path like any hub id."""
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def animals():
    from revelio_nb.data import load_dataset

    return load_dataset("animal-mnist")
