"""Tiny random-weight pipeline folders of every model family, built from config the way diffusers' own tests build
them (``tests/pipelines/*/test_*.py``), with text encoders and tokenizers made offline, saved as diffusers pipeline
folders so that tests load them by path through ``load_model`` like any hub snapshot.

Each ``save_tiny_<family>(folder)`` returns the folder; :data:`BUILDERS` maps a test id to (builder, image size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-()[]/&+*=%#@<>_")


def _index(folder: Path, cls: str, **components: tuple[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, **{k: list(v) for k, v in components.items()}}))


def tiny_clip_tokenizer(folder: Path, max_length: int = 16, chars: Sequence[str] = CHARS):
    """A CLIPTokenizer built offline from a tiny character-level vocabulary (``chars``, each also as a word end)."""
    from transformers import CLIPTokenizer

    chars = list(chars)
    vocab = {}
    for tok in ["!", *chars, *[c + "</w>" for c in chars]]:
        vocab.setdefault(tok, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tiny_sentencepiece_like_tokenizer(eos: bool = True, bos: bool = False, max_length: int = 512):
    """A fast character-level tokenizer (``tokenizers`` BPE without merges) with T5/Gemma-like special tokens:
    pad 0, eos 1, unk 2, bos 3; ``</s>`` appended (T5) or ``<bos>`` prepended (Gemma)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<bos>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS + [c.upper() for c in CHARS if c.isalpha()])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = ("<bos> " if bos else "") + "$A" + (" </s>" if eos else "")
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("</s>", 1), ("<bos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<bos>", model_max_length=max_length, padding_side="right")


def _clip(tok, hidden: int, with_projection: bool = False, projection_dim: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(tok, d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _vae_kl(latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = {} if shift_factor is None else dict(shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling_factor, **kw)


def _save_text(folder: Path, slot: str, enc, tok) -> None:
    enc.save_pretrained(folder / f"text_encoder{slot}", safe_serialization=True)
    tok.save_pretrained(folder / f"tokenizer{slot}")


def save_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """SD 1.x/2.x-shaped: UNet2DConditionModel + AutoencoderKL + CLIP; ``prediction_type="v_prediction"`` = SD 2.x 768."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tok = tiny_clip_tokenizer(folder / "_vocab")
    _save_text(folder, "", _clip(tok, 16, seed=seed), tok)
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    _vae_kl(seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1).save_pretrained(folder / "scheduler")
    _index(folder, "StableDiffusionPipeline", unet=("diffusers", "UNet2DConditionModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "CLIPTextModel"),
           tokenizer=("transformers", "CLIPTokenizer"), scheduler=("diffusers", "DDIMScheduler"))
    return folder


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """SDXL-shaped: two CLIP encoders (the second with projection), ``addition_embed_type="text_time"``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tok = tiny_clip_tokenizer(folder / "_vocab")
    _save_text(folder, "", _clip(tok, 16, seed=seed), tok)
    _save_text(folder, "_2", _clip(tok, 16, with_projection=True, projection_dim=16, seed=seed + 1), tok)
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=1, projection_class_embeddings_input_dim=16 + 6 * 8, cross_attention_dim=32,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    _vae_kl(seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    _index(folder, "StableDiffusionXLPipeline", unet=("diffusers", "UNet2DConditionModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "CLIPTextModel"),
           text_encoder_2=("transformers", "CLIPTextModelWithProjection"), tokenizer=("transformers", "CLIPTokenizer"),
           tokenizer_2=("transformers", "CLIPTokenizer"), scheduler=("diffusers", "DDIMScheduler"))
    return folder


def save_tiny_lcm(folder: Path, seed: int = 0) -> Path:
    """LCM-shaped (as diffusers' LatentConsistencyModelPipeline tests): ``time_cond_proj_dim`` + LCMScheduler."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    tok = tiny_clip_tokenizer(folder / "_vocab")
    _save_text(folder, "", _clip(tok, 16, seed=seed), tok)
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        time_cond_proj_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
        attention_head_dim=4,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    _vae_kl(seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    _index(folder, "LatentConsistencyModelPipeline", unet=("diffusers", "UNet2DConditionModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "CLIPTextModel"),
           tokenizer=("transformers", "CLIPTokenizer"), scheduler=("diffusers", "LCMScheduler"))
    return folder


def save_tiny_dit(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=2,
                          norm_num_groups=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10,
                          ).save_pretrained(folder / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    _index(folder, "DiTPipeline", transformer=("diffusers", "DiTTransformer2DModel"),
           scheduler=("diffusers", "DDPMScheduler"))
    return folder


def save_tiny_pixart(folder: Path, seed: int = 0) -> Path:
    """PixArt-alpha-shaped (diffusers' PixArt tests)."""
    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    tok = tiny_sentencepiece_like_tokenizer()
    _save_text(folder, "", _t5(tok, 32, seed=seed), tok)
    torch.manual_seed(seed)
    PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).save_pretrained(folder / "transformer", safe_serialization=True)
    _vae_kl(seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                  set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    _index(folder, "PixArtAlphaPipeline", transformer=("diffusers", "PixArtTransformer2DModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "T5EncoderModel"),
           tokenizer=("transformers", "T5Tokenizer"), scheduler=("diffusers", "DDIMScheduler"))
    return folder


def save_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """SD3-shaped (diffusers' SD3 tests): two CLIP encoders with projection + T5, 2 joint blocks, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tok = tiny_clip_tokenizer(folder / "_vocab")
    _save_text(folder, "", _clip(tok, 16, with_projection=True, projection_dim=16, seed=seed), tok)
    _save_text(folder, "_2", _clip(tok, 16, with_projection=True, projection_dim=16, seed=seed + 1), tok)
    t5tok = tiny_sentencepiece_like_tokenizer()
    _save_text(folder, "_3", _t5(t5tok, 32, seed=seed + 2), t5tok)
    torch.manual_seed(seed)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                          ).save_pretrained(folder / "transformer", safe_serialization=True)
    _vae_kl(shift_factor=0.0609, scaling_factor=1.5035, seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    _index(folder, "StableDiffusion3Pipeline", transformer=("diffusers", "SD3Transformer2DModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "CLIPTextModelWithProjection"),
           text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
           text_encoder_3=("transformers", "T5EncoderModel"), tokenizer=("transformers", "CLIPTokenizer"),
           tokenizer_2=("transformers", "CLIPTokenizer"), tokenizer_3=("transformers", "T5TokenizerFast"),
           scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler"))
    return folder


def save_tiny_flux(folder: Path, seed: int = 0, dev: bool = True) -> Path:
    """FLUX.1-shaped (diffusers' Flux tests): CLIP + T5, 1 double + 1 single block; ``dev``: guidance embedding and
    resolution-dependent shift (FLUX.1-dev), else schnell (no guidance, no shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tok = tiny_clip_tokenizer(folder / "_vocab")
    _save_text(folder, "", _clip(tok, 32, seed=seed), tok)
    t5tok = tiny_sentencepiece_like_tokenizer()
    _save_text(folder, "_2", _t5(t5tok, 32, seed=seed + 1), t5tok)
    torch.manual_seed(seed)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=(4, 4, 8), guidance_embeds=dev,
                           ).save_pretrained(folder / "transformer", safe_serialization=True)
    _vae_kl(shift_factor=0.1159, scaling_factor=0.3611, seed=seed).save_pretrained(folder / "vae", safe_serialization=True)
    if dev:
        FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                        max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                                        ).save_pretrained(folder / "scheduler")
    else:
        FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(folder / "scheduler")
    _index(folder, "FluxPipeline", transformer=("diffusers", "FluxTransformer2DModel"),
           vae=("diffusers", "AutoencoderKL"), text_encoder=("transformers", "CLIPTextModel"),
           text_encoder_2=("transformers", "T5EncoderModel"), tokenizer=("transformers", "CLIPTokenizer"),
           tokenizer_2=("transformers", "T5TokenizerFast"), scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler"))
    return folder


def save_tiny_sana(folder: Path, seed: int = 0) -> Path:
    """Sana-shaped (diffusers' Sana tests): Gemma-2 encoder, AutoencoderDC, patch 1, flow shift."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = tiny_sentencepiece_like_tokenizer(eos=False, bos=True, max_length=2048)
    torch.manual_seed(seed)
    enc = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=16,
                                   max_position_embeddings=2048, num_attention_heads=2, num_hidden_layers=1,
                                   num_key_value_heads=2, vocab_size=len(tok), pad_token_id=0, eos_token_id=1,
                                   bos_token_id=3, attn_implementation="eager"))
    _save_text(folder, "", enc, tok)
    torch.manual_seed(seed)
    SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                           attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                           cross_attention_dim=8, caption_channels=8, sample_size=8,
                           ).save_pretrained(folder / "transformer", safe_serialization=True)
    torch.manual_seed(seed)
    AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                  encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
                  encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                  encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                  encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                  upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                  scaling_factor=0.41407).save_pretrained(folder / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    _index(folder, "SanaPipeline", transformer=("diffusers", "SanaTransformer2DModel"),
           vae=("diffusers", "AutoencoderDC"), text_encoder=("transformers", "Gemma2Model"),
           tokenizer=("transformers", "GemmaTokenizerFast"), scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler"))
    return folder


# test id -> (builder, image size used in tests)
BUILDERS = {
    "sd": (save_tiny_sd, 16),
    "sd-v": (lambda f: save_tiny_sd(f, prediction_type="v_prediction"), 16),
    "sdxl": (save_tiny_sdxl, 16),
    "lcm": (save_tiny_lcm, 16),
    "dit": (save_tiny_dit, 16),
    "pixart": (save_tiny_pixart, 16),
    "sd3": (save_tiny_sd3, 16),
    "flux": (save_tiny_flux, 16),
    "sana": (save_tiny_sana, 32),  # SanaPipeline takes multiples of 32 only
}
FAMILY = {"sd": "unet_cond", "sd-v": "unet_cond", "sdxl": "unet_cond", "lcm": "unet_cond", "dit": "dit",
          "pixart": "pixart", "sd3": "sd3", "flux": "flux", "sana": "sana"}
