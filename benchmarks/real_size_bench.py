"""Real-size models, not only tiny ones: memory and speed of loading, extraction and a k-SAE at full width.

    python benchmarks/real_size_bench.py --family sd15            # SD 1.5: UNet 860M + VAE + CLIP-L, fp32, 512 px
    python benchmarks/real_size_bench.py --family sd3 --dtype bf16  # SD3-medium transformer (2B) + CLIP-L/G, bf16
    python benchmarks/real_size_bench.py --family sd15 --tiny      # the same code path on a tiny config (seconds)

The pipeline folder is built from the published configs with **random weights** (no download: speed and memory do
not depend on the weights) by a child process, saved as a diffusers folder under ``--workdir`` (reused by later
runs), then measured in a fresh process: ``load_model(folder, dtype=...)``, extraction of ``--images`` images at two
timesteps for the bottleneck (``mid_block`` / the middle transformer block) and one later block (``up_blocks.1`` /
the block at 3/4 depth) into a spatial store, and the early-exit speed-up of the bottleneck alone. A few k-SAE
training steps at the Revelio code's size (d_in = the block's width, 1280 for SD 1.5's bottleneck; expansion 64)
run on the extracted tokens in a third process, so their memory is reported apart (``sae_peak_rss_mb``).
SD3 runs without its T5 encoder (as diffusers allows: T5 states are zeros), since T5-XXL alone is 19 GB in fp32.

Ends with: RESULT images_per_s=... peak_rss_mb=... weights_mb=... early_exit_speedup=... (and more keys).
Goal (issue 13): peak_rss_mb <= weights_mb + 2048; early_exit_speedup >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ building


def _clip(tok, hidden, layers, heads, inter, proj=None, vocab=49408):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=proj or hidden, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg)


def build(family: str, folder: Path, dtype: torch.dtype, tiny: bool) -> None:
    """Write a random-weight pipeline folder of the published architecture (or a tiny one with ``tiny``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype: no fp32 copy of a 2B model
    sys.path.insert(0, str(ROOT / "tests"))  # the tiny CLIP tokenizer is the tests' own (tests/tiny_models.py)
    from tiny_models import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(folder / "_vocab", max_length=77, chars="abcdefghijklmnopqrstuvwxyz0123456789")
    vae_ch = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    index = {}
    if family == "sd15":
        text = _clip(tok, 32, 2, 2, 64, vocab=200) if tiny else _clip(tok, 768, 12, 12, 3072)
        text.save_pretrained(folder / "text_encoder", safe_serialization=True)
        tok.save_pretrained(folder / "tokenizer")
        unet_kw = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                       attention_head_dim=4) if tiny else dict(cross_attention_dim=768)
        UNet2DConditionModel(sample_size=64, **unet_kw).save_pretrained(folder / "unet", safe_serialization=True)
        AutoencoderKL(block_out_channels=vae_ch, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                      norm_num_groups=8 if tiny else 32, sample_size=512,
                      ).save_pretrained(folder / "vae", safe_serialization=True)
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    elif family == "sd3":
        enc1 = _clip(tok, 32, 2, 2, 64, proj=32, vocab=200) if tiny else _clip(tok, 768, 12, 12, 3072, proj=768)
        enc2 = _clip(tok, 64, 2, 2, 128, proj=64, vocab=200) if tiny else _clip(tok, 1280, 32, 20, 5120, proj=1280)
        for slot, enc in (("", enc1), ("_2", enc2)):
            enc.save_pretrained(folder / f"text_encoder{slot}", safe_serialization=True)
            tok.save_pretrained(folder / f"tokenizer{slot}")
            del enc
        kw = (dict(num_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                   caption_projection_dim=32, pooled_projection_dim=96) if tiny else
              dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048))
        SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=192,
                              **kw).save_pretrained(folder / "transformer", safe_serialization=True)
        AutoencoderKL(block_out_channels=vae_ch, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                      norm_num_groups=8 if tiny else 32, sample_size=1024, shift_factor=0.0609,
                      scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
                      ).save_pretrained(folder / "vae", safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
        index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    else:
        raise SystemExit(f"unknown family {family!r}; valid: sd15, sd3")
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "BUILT").write_text("ok\n")


# ------------------------------------------------------------------------------------------ measuring


def measure(a) -> dict:
    from revelio_nb import features as F
    from revelio_nb.data import load_dataset
    from revelio_nb.models import load_model

    base = rss_mb()
    t0 = time.perf_counter()
    model = load_model(str(a.folder), dtype=a.dtype)
    load_s = time.perf_counter() - t0
    weights_mb = sum(p.numel() * p.element_size() for m in model.modules() for p in m.parameters()) / 2**20
    after_load = rss_mb()
    blocks = a.blocks or ([model.h_block, "up_blocks.1"] if model.kind == "unet_cond" else
                          [model.h_block, model.main_blocks[(3 * len(model.main_blocks)) // 4]])
    ds = load_dataset("digits")
    cfg = F.ExtractionConfig(model=str(a.folder), dataset="digits", blocks=blocks, timesteps=a.timesteps,
                             pooling="map", max_images=a.images, batch_size=a.batch, image_size=a.size,
                             store_dtype="float16")
    out = Path(a.out)
    shutil.rmtree(out / "store", ignore_errors=True)  # the benchmark's scratch store: always measured from empty
    t0 = time.perf_counter()
    store = F.extract_features(cfg, model=model, dataset=ds, out_dir=out / "store", progress=True, verify=False)
    extract_s = time.perf_counter() - t0
    images_per_s = a.images * len(a.timesteps) / extract_s  # image-timestep passes per second

    from revelio_nb.capture import FeatureCapture

    # the early-exit speed-up of the denoiser pass itself (VAE encoding and the store's writes, which early exit
    # cannot skip, are left out): the same noised latents through the denoiser, full pass vs stopping at the block
    size = a.size or model.native_image_size
    x_t = torch.randn(model.latent_shape(a.speed_images, size), generator=torch.Generator().manual_seed(0))
    x_t = x_t.to(model.device, model.dtype)
    cond = model.conditioning(a.speed_images)

    def timed(early: bool) -> float:
        with FeatureCapture(model, [blocks[0]], early_exit=early) as cap:
            best = float("inf")
            for _ in range(2):
                s = time.perf_counter()
                cap.run(x_t, a.timesteps[0], cond)
                best = min(best, time.perf_counter() - s)
            return best
    full_s, early_s = timed(False), timed(True)
    return {"images_per_s": round(images_per_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "weights_mb": round(weights_mb, 1), "early_exit_speedup": round(full_s / early_s, 2),
            "import_rss_mb": round(base, 1), "rss_after_load_mb": round(after_load, 1), "load_s": round(load_s, 1),
            "extract_s": round(extract_s, 1), "store": str(store.path), "blocks": blocks, "d_in": store.array(
                blocks[0], a.timesteps[0]).shape[1], "kind": model.kind, "dtype": str(model.dtype)}


def sae_steps(a) -> dict:
    from revelio_nb import sae as S
    from revelio_nb.features import FeatureStore

    store = FeatureStore.open(a.store)
    arr = store.array(store.blocks[0], store.timesteps[0])
    tcfg = S.TrainConfig(sae=S.SaeConfig(expansion_factor=a.expansion, k=32), batch_size=a.sae_batch,
                         steps=a.sae_steps, warmup_steps=1, init_tokens=min(4096, arr.shape[0] * arr.shape[2] * arr.shape[3]),
                         checkpoint_every=10**9, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        S.train_sae(arr, tcfg, Path(tmp) / "sae", progress=False)
        dt = time.perf_counter() - t0
    return {"sae_step_s": round(dt / a.sae_steps, 3), "sae_peak_rss_mb": round(peak_rss_mb(), 1),
            "sae_latents": arr.shape[1] * a.expansion}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sd15", choices=["sd15", "sd3"])
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 for sd15, bf16 for sd3)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--speed-images", type=int, default=4, help="images for the early-exit timing")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 500])
    p.add_argument("--blocks", nargs="*", default=None)
    p.add_argument("--sae-steps", type=int, default=5)
    p.add_argument("--sae-batch", type=int, default=1024)
    p.add_argument("--expansion", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (a quick check)")
    p.add_argument("--workdir", default=os.environ.get("REVELIO_BENCH_DIR", tempfile.gettempdir()))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--_stage", default="", help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--store", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.dtype = a.dtype or ("bf16" if a.family == "sd3" else "fp32")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._stage == "build":
        build(a.family, Path(a.folder), {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype],
              a.tiny)
        return
    if a._stage == "measure":
        print("JSON " + json.dumps(measure(a)), flush=True)
        return
    if a._stage == "sae":
        print("JSON " + json.dumps(sae_steps(a)), flush=True)
        return

    work = Path(a.workdir) / f"revelio-real-{a.family}-{a.dtype}{'-tiny' if a.tiny else ''}"
    folder, out = work / "pipeline", work / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    me = [sys.executable, __file__, "--family", a.family, "--dtype", a.dtype] + (["--tiny"] if a.tiny else [])
    if a.threads:
        me += ["--threads", str(a.threads)]
    if not (folder / "BUILT").is_file():
        t0 = time.perf_counter()
        subprocess.run(me + ["--_stage", "build", "--folder", str(folder)], check=True, env=env)
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s")
    res = {}
    for stage, extra in (("measure", ["--folder", str(folder), "--out", str(out), "--size", str(a.size),
                                      "--images", str(a.images), "--speed-images", str(a.speed_images),
                                      "--batch", str(a.batch), "--timesteps", *map(str, a.timesteps),
                                      *(["--blocks", *a.blocks] if a.blocks else [])]),
                         ("sae", ["--store", "", "--sae-steps", str(a.sae_steps), "--sae-batch", str(a.sae_batch),
                                  "--expansion", str(a.expansion)])):
        if stage == "sae":
            extra[1] = res["store"]
        proc = subprocess.run(me + ["--_stage", stage, *extra], env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{proc.stdout[-2000:]}")
        res.update(json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON "))[5:]))
    print(json.dumps(res, indent=1))
    ok = res["peak_rss_mb"] <= res["weights_mb"] + 2048
    print(f"family={a.family} dtype={a.dtype} size={a.size} images={a.images} timesteps={a.timesteps} "
          f"threads={torch.get_num_threads()} blocks={res['blocks']} goal peak<=weights+2GB: {'met' if ok else 'MISSED'}")
    print(f"RESULT images_per_s={res['images_per_s']} peak_rss_mb={res['peak_rss_mb']} weights_mb={res['weights_mb']} "
          f"early_exit_speedup={res['early_exit_speedup']} rss_after_load_mb={res['rss_after_load_mb']} "
          f"import_rss_mb={res['import_rss_mb']} load_s={res['load_s']} sae_step_s={res['sae_step_s']} "
          f"sae_peak_rss_mb={res['sae_peak_rss_mb']} sae_d_in={res['d_in']} sae_latents={res['sae_latents']}")


if __name__ == "__main__":
    main()
