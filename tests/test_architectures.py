"""Every model family through its adapter: a tiny random-weight pipeline folder per family (tests/tiny_models.py),
loaded by path through ``load_model``, then blocks, extraction (= the image stream of the block output), noise (=
the family's own scheduler), sampling (= the family's own diffusers pipeline), prompt latents, steering (image stream
only), bad inputs, identity. The block output formats of the pinned diffusers (0.42.1) are pinned here too."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from revelio_nb import directions as D
from revelio_nb import features as F
from revelio_nb import capture
from revelio_nb.models import ModelLoadError, load_model
from revelio_nb.sampling import sample
from tiny_models import BUILDERS, FAMILY

NAMES = list(BUILDERS)
TEXT_NAMES = [n for n in NAMES if n != "dit"]
_FOLDERS: dict[str, Path] = {}
_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def folder_of(root: Path, name: str) -> Path:
    if name not in _FOLDERS:
        _FOLDERS[name] = BUILDERS[name][0](root / name)
    return _FOLDERS[name]


def model_of(root: Path, name: str):
    if name not in _MODELS:
        _MODELS[name] = load_model(str(folder_of(root, name)))
    return _MODELS[name]


def size_of(name: str) -> int:
    return BUILDERS[name][1]


def cond_kw(name: str) -> dict:
    return {"class_labels": 3} if name == "dit" else {"prompts": "a red cat"}


def expected_stream(name: str, block_type: str, output, latent_hw, patch: int) -> torch.Tensor:
    """The image stream of a raw block output, written out per family from the pinned diffusers formats (not
    through the adapter), as a (B, C, h, w) map."""
    if block_type in ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"):
        assert isinstance(output, tuple) and len(output) == 2, "pinned: (encoder_hidden_states, hidden_states)"
        text, image = output
        assert text is None or (text.ndim == 3 and text.shape[1] != image.shape[1] or True)
        tokens = image
    elif isinstance(output, tuple):  # UNet down blocks: (hidden_states, residuals)
        assert block_type.endswith("DownBlock2D")
        return output[0]
    else:
        tokens = output
    if tokens.ndim == 4:
        return tokens
    gh, gw = latent_hw[0] // patch, latent_hw[1] // patch
    b, n, d = tokens.shape
    assert n == gh * gw
    return tokens.reshape(b, gh, gw, d).permute(0, 3, 1, 2)


def _keep(store: dict, key, with_type: bool = False):
    """A forward hook that records a block's raw output (first call only) and leaves it unchanged."""
    def hook(mod, args, out):
        store.setdefault(key, (type(mod).__name__, out) if with_type else out)
    return hook


PATCH = {"dit": 4, "pixart": 2, "sd3": 2, "flux": 2, "sana": 1}


# ---------------------------------------------------------------------------------------------- formats


def test_pinned_block_output_formats_of_diffusers(root):
    """An upgrade that changes what these blocks return must fail here, loudly."""
    import diffusers

    assert diffusers.__version__ == "0.42.1", "block formats below were pinned on diffusers 0.42.1: re-check them"
    seen = {}
    for name in ("sd3", "flux", "pixart", "sana", "sd"):
        m = model_of(root, name)
        mods = dict(m.denoiser.named_modules())
        blocks = m.main_blocks
        handles = [mods[b].register_forward_hook(_keep(seen, (name, b))) for b in blocks]
        try:
            x = torch.zeros(m.latent_shape(2, size_of(name)))
            m.denoise(x, 10, m.conditioning(2))
        finally:
            for h in handles:
                h.remove()
    sd3_first, sd3_last = seen[("sd3", "transformer_blocks.0")], seen[("sd3", "transformer_blocks.1")]
    assert isinstance(sd3_first, tuple) and sd3_first[0].shape[1] > sd3_first[1].shape[1]  # (text, image): text first
    assert sd3_last[0] is None and sd3_last[1].shape == (2, 16, 16)  # last joint block: (None, hidden_states)
    for b in ("transformer_blocks.0", "single_transformer_blocks.0"):
        out = seen[("flux", b)]
        assert isinstance(out, tuple) and len(out) == 2 and out[1].shape == (2, 16, 32) and out[0].shape[1] == 512
    assert torch.is_tensor(seen[("pixart", "transformer_blocks.0")]) and seen[("pixart", "transformer_blocks.0")].ndim == 3
    assert torch.is_tensor(seen[("sana", "transformer_blocks.0")]) and seen[("sana", "transformer_blocks.0")].ndim == 3
    assert isinstance(seen[("sd", "down_blocks.0")], tuple) and torch.is_tensor(seen[("sd", "mid_block")])


# ---------------------------------------------------------------------------------------------- per family


@pytest.mark.parametrize("name", NAMES)
def test_loads_by_path_and_lists_blocks_on_the_image_grid(root, name):
    m = model_of(root, name)
    assert m.kind == FAMILY[name] and m.folder == folder_of(root, name)
    size = size_of(name)
    df = capture.list_blocks(m, image_size=size).set_index("block")
    hw = m.latent_shape(1, size)[-2:]
    for b in m.main_blocks:
        shape = df.loc[b, "output_shape"]
        assert shape is not None and len(shape) == 3, (b, shape)
        if name in PATCH:
            assert shape[1:] == (hw[0] // PATCH[name], hw[1] // PATCH[name]), (b, shape)
    assert m.h_block in m.main_blocks and (m.h_block == "mid_block") == (FAMILY[name] in ("unet", "unet_cond"))
    if name in ("sd3", "flux"):  # text-stream modules are listed without an image shape, not folded into a grid
        assert df.loc["context_embedder", "output_shape"] is None


@pytest.mark.parametrize("name", NAMES)
def test_extraction_stores_the_image_stream_of_the_block_output(root, name, tmp_path):
    m = model_of(root, name)
    size = size_of(name)
    blocks = [m.h_block, m.main_blocks[0]]
    cfg = F.ExtractionConfig(model=str(folder_of(root, name)), dataset="digits", split="train", blocks=blocks,
                             timesteps=[100, 700], pooling="map", max_images=3, batch_size=3, image_size=size)
    store = F.extract_features(cfg, model=m, out_dir=tmp_path / "s", progress=False)
    from revelio_nb.data import load_dataset

    ds = load_dataset("digits")
    x0 = m.encode_images(ds.tensor(store.indices, size=size, channels=m.image_channels))
    mods = dict(m.denoiser.named_modules())
    for rec, t in zip(store.manifest["noise"], cfg.timesteps):
        assert rec["t"] == t and ("sigma" if m.noise.convention == "flow" else "alpha_bar") in rec
        noise = torch.stack([F.noise_for(int(i), t, 0, cfg.seed, tuple(x0.shape[1:])) for i in store.indices])
        x_t = m.add_noise(x0, noise, t)
        raw = {}
        hs = [mods[b].register_forward_hook(_keep(raw, b, with_type=True)) for b in blocks]
        try:
            m.denoise(x_t, t, m.conditioning(len(x_t)))
        finally:
            for h in hs:
                h.remove()
        for b in blocks:
            want = expected_stream(name, raw[b][0], raw[b][1], x_t.shape[-2:], PATCH.get(name, 1))
            got = store.array(b, t)
            assert got.shape == tuple(want.shape)
            np.testing.assert_allclose(got, want.float().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_noise_matches_the_familys_own_scheduler(root, name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = model_of(root, name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(m.latent_shape(2, size_of(name)), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    seq = m.seq_len(tuple(x0.shape[-2:]))
    for t in (0, 100, 500, 999):
        ours = m.add_noise(x0, noise, t)
        if m.noise.convention == "ddpm":
            theirs = m.scheduler.add_noise(x0, noise, torch.tensor([t]))
            assert m.model_timestep(t, x0.shape[-2:]) == t
        else:
            sched = FlowMatchEulerDiscreteScheduler.from_config(m.scheduler.config)
            if m.noise.dynamic:  # resolution-dependent shift: the scheduler's own time_shift at this token count
                sched.set_timesteps(sigmas=[(t + 1) / 1000], mu=m.noise.mu(seq))
                ts = sched.timesteps[:1]
            else:  # static shift: the scheduler's training table, index i <-> t = N - 1 - i
                ts = sched.timesteps[999 - t : 1000 - t]
            theirs = sched.scale_noise(x0, ts, noise)
            assert m.model_timestep(t, x0.shape[-2:]) == pytest.approx(float(ts[0]), rel=1e-5)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _pipeline_latents(name: str, m, x_t: torch.Tensor, steps: int) -> torch.Tensor:
    """The family's own diffusers pipeline, from the same components and start latents, no CFG."""
    import diffusers

    size = size_of(name)
    common = dict(num_inference_steps=steps, latents=x_t.clone(), output_type="latent", height=size, width=size)
    if name in ("sd-v", "sd"):
        sched = diffusers.DDIMScheduler.from_config(m.scheduler.config, clip_sample=False, set_alpha_to_one=True)
        pipe = diffusers.StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                                 unet=m.denoiser, scheduler=sched, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        return pipe(["a red cat"] * len(x_t), guidance_scale=1.0, **common).images
    if name == "pixart":
        sched = diffusers.DDIMScheduler.from_config(m.scheduler.config, clip_sample=False, set_alpha_to_one=True)
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae,
                                             transformer=m.denoiser, scheduler=sched)
        return pipe(["a red cat"] * len(x_t), guidance_scale=1.0, clean_caption=False, use_resolution_binning=False, **common).images
    if name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=m.denoiser, scheduler=m.scheduler, vae=m.vae, text_encoder=m.text_encoder,
            tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2, tokenizer_2=m.tokenizer_2,
            text_encoder_3=m.text_encoder_3, tokenizer_3=m.tokenizer_3)
        return pipe(["a red cat"] * len(x_t), guidance_scale=1.0, **common).images
    if name == "flux":
        from revelio_nb.models.adapters.flux import pack, unpack

        pipe = diffusers.FluxPipeline(scheduler=m.scheduler, vae=m.vae, text_encoder=m.text_encoder,
                                      tokenizer=m.tokenizer, text_encoder_2=m.text_encoder_2,
                                      tokenizer_2=m.tokenizer_2, transformer=m.denoiser)
        common["latents"] = pack(x_t.clone())
        out = pipe(["a red cat"] * len(x_t), guidance_scale=3.5, **common).images
        return unpack(out, *x_t.shape[-2:])
    if name == "sana":
        pipe = diffusers.SanaPipeline(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae,
                                      transformer=m.denoiser, scheduler=m.scheduler)
        return pipe(["a red cat"] * len(x_t), guidance_scale=1.0, use_resolution_binning=False, **common).images
    raise KeyError(name)


@pytest.mark.parametrize("name", ["sd-v", "pixart", "sd3", "flux", "sana"])
def test_few_step_sample_equals_the_familys_own_pipeline(root, name):
    """Conditioning (the model's real encoders), timesteps, prediction type and the sampler step, all at once:
    our sampler loop gives the latents of diffusers' own pipeline for that family."""
    m = model_of(root, name)
    x_t = torch.randn(m.latent_shape(2, size_of(name)), generator=torch.Generator().manual_seed(3))
    ours = sample(m, 2, prompts="a red cat", steps=3, latents=x_t, decode=False, image_size=size_of(name))
    theirs = _pipeline_latents(name, m, x_t, 3)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_few_step_sample_is_seeded_and_follows_the_condition(root, name):
    m = model_of(root, name)
    size = size_of(name)
    a = sample(m, 2, steps=2, seed=1, image_size=size, **cond_kw(name))
    b = sample(m, 2, steps=2, seed=1, image_size=size, **cond_kw(name))
    other = {"class_labels": 7} if name == "dit" else {"prompts": "a blue dog"}
    c = sample(m, 2, steps=2, seed=1, image_size=size, **other)
    assert a.shape == (2, m.image_channels, size, size) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_lcm_sampler_matches_diffusers_latent_consistency_pipeline(root):
    """Issue 17: the LCM path (guidance embedding timestep_cond from w = guidance - 1, no CFG batch, x0 prediction
    then seeded re-noising) pinned against diffusers' LatentConsistencyModelPipeline."""
    import diffusers

    m = model_of(root, "lcm")
    assert m.adapter.sampler == "lcm" and not m.adapter.uses_cfg()
    n, seed, steps, scale = 2, 5, 4, 8.5
    ours = sample(m, n, prompts="a red cat", steps=steps, guidance_scale=scale, seed=seed, decode=False,
                  image_size=16)
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(m.latent_shape(n, 16), generator=g)  # the same start noise; g continues for re-noising
    pipe = diffusers.LatentConsistencyModelPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                                    unet=m.denoiser, scheduler=m.scheduler, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    orig = m.denoiser.forward
    m.denoiser.forward = lambda *a, **k: (calls.append(len(a[0])), orig(*a, **k))[1]
    try:
        theirs = pipe(["a red cat"] * n, num_inference_steps=steps, guidance_scale=scale, latents=start.clone(),
                      generator=g, output_type="latent", height=16, width=16).images
    finally:
        del m.denoiser.forward
    assert calls == [n] * steps  # the pipeline runs no CFG batch; ours neither (checked by the equality)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the guidance embedding matters: another w gives other latents
    other = sample(m, n, prompts="a red cat", steps=steps, guidance_scale=2.0, seed=seed, decode=False, image_size=16)
    assert not torch.allclose(ours, other)


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_prompt_h_and_steering_touch_the_image_stream_only(root, name):
    m = model_of(root, name)
    size = size_of(name)
    cfg = D.SampleConfig(n_seeds=2, steps=2, image_size=size, batch_size=4)  # block "mid_block" -> the h block
    lat = D.prompt_h(m, ["a red cat", "a blue dog"], cfg, cache=False, progress=False)
    shape = capture.list_blocks(m, image_size=size).set_index("block").loc[m.h_block, "output_shape"]
    assert lat.shape == tuple(shape) and lat.pooled.shape == (2, shape[0]) and lat.flat.shape == (2, int(np.prod(shape)))
    assert np.isfinite(lat.flat).all() and not np.allclose(lat.get("a red cat"), lat.get("a blue dog"))
    # steering: the image stream moves by exactly strength * direction, the text stream (joint blocks) not at all
    block = m.main_blocks[0]
    module = dict(m.denoiser.named_modules())[block]
    direction = torch.randn(shape[0] if block == m.h_block else
                            capture.list_blocks(m, image_size=size).set_index("block").loc[block, "output_shape"][0])
    x = torch.randn(m.latent_shape(2, size), generator=torch.Generator().manual_seed(0))
    cond = m.conditioning(2, prompts="a red cat")

    def run(steer: bool):
        seen = {}
        hook = D.SteeringHook(m, direction, strength=1.5, block=block) if steer else None
        if hook:
            hook.__enter__()
        h = module.register_forward_hook(_keep(seen, "o"))
        try:
            m.denoise(x, 300, cond)
        finally:
            h.remove()
            if hook:
                hook.remove()
        return seen["o"]
    plain, steered = run(False), run(True)
    img = lambda o: o[1] if name in ("sd3", "flux") else (o[0] if isinstance(o, tuple) else o)  # noqa: E731
    delta = img(steered) - img(plain)
    want = 1.5 * (direction.reshape(1, 1, -1) if delta.ndim == 3 else direction.reshape(1, -1, 1, 1))
    torch.testing.assert_close(delta, want.expand_as(delta), rtol=1e-4, atol=1e-4)
    if name in ("sd3", "flux"):
        torch.testing.assert_close(steered[0], plain[0])  # the text stream is untouched


def test_flux_tokens_go_back_on_a_non_square_packed_grid(root):
    from revelio_nb.models.adapters.flux import pack

    m = model_of(root, "flux")
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # 16 x 24 px: 4 x 6 packed tokens
    with capture.FeatureCapture(m, [m.h_block], early_exit=False) as cap:
        got = cap.run(x, 200, m.conditioning(1))[m.h_block]
    assert got.shape == (1, 32, 4, 6)
    # a planted token pattern survives the round trip: token k of the packed sequence is grid cell (k // 6, k % 6)
    tok = pack(torch.arange(96.0).reshape(1, 1, 8, 12).repeat(1, 4, 1, 1))
    assert tok.shape == (1, 24, 16)
    grid = m.adapter.to_grid(tok, (8, 12))
    assert grid.shape == (1, 16, 4, 6) and grid[0, 0, 1, 2] == tok[0, 1 * 6 + 2, 0]


# ---------------------------------------------------------------------------------------------- bad inputs


def test_unsupported_denoiser_class_lists_the_supported_families(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert "WanTransformer3DModel" in msg
    for cls in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel",
                "SanaTransformer2DModel", "DiTTransformer2DModel"):
        assert cls in msg


def test_transformer2dmodel_checkpoints_go_to_pixart_or_dit_by_their_norm_type():
    from revelio_nb.models.adapters import find_adapter

    assert find_adapter("Transformer2DModel", {"norm_type": "ada_norm_single"}).family == "pixart"
    assert find_adapter("Transformer2DModel", {"norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1000}).family == "dit"
    with pytest.raises(ModelLoadError, match="norm_type"):
        find_adapter("Transformer2DModel", {"norm_type": "layer_norm"})


def test_bad_inputs_are_clear_errors(root):
    dit, sd3 = model_of(root, "dit"), model_of(root, "sd3")
    with pytest.raises(ValueError, match="takes class_labels"):
        dit.conditioning(2, prompts="a cat")
    with pytest.raises(ValueError, match="not text-conditioned"):
        sample(dit, 1, prompts="a cat", steps=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        sd3.check_image_size(18)
    with pytest.raises(ValueError, match="at most 64"):
        sd3.check_image_size(128)
    with pytest.raises(ValueError, match="fixed position embeddings"):
        dit.check_image_size(32)
    for t in (1000, -1, 2.5):
        with pytest.raises(ValueError, match="outside"):
            sd3.check_timestep(t)
    with pytest.raises(ValueError, match="outside"):
        F.extract_features(F.ExtractionConfig(model="x", dataset="digits", blocks=[sd3.h_block], timesteps=[1000]),
                           model=sd3, progress=False)


def test_text_encoder_and_scheduler_classes_come_from_allow_lists(root, tmp_path):
    bad = shutil.copytree(folder_of(root, "sd"), tmp_path / "bad")
    idx = json.loads((bad / "model_index.json").read_text())
    idx["text_encoder"] = ["transformers", "GPT2LMHeadModel"]
    (bad / "model_index.json").write_text(json.dumps(idx))
    cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
    (bad / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not allowed.*CLIPTextModel"):
        load_model(str(bad))
    bad2 = shutil.copytree(folder_of(root, "dit"), tmp_path / "bad2")
    sc = json.loads((bad2 / "scheduler" / "scheduler_config.json").read_text())
    (bad2 / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sc, "_class_name": "os.system"}))
    with pytest.raises(ModelLoadError, match="scheduler class 'os.system' is not supported"):
        load_model(str(bad2))


# ---------------------------------------------------------------------------------------------- identity / loading


def test_fingerprint_covers_scheduler_text_encoder_tokenizer_and_dtype(root, tmp_path):
    from safetensors.torch import load_file, save_file

    src = folder_of(root, "sd")
    base = model_of(root, "sd").fingerprint
    assert load_model(str(src)).fingerprint == base  # reload: the same identity
    betas = shutil.copytree(src, tmp_path / "betas")
    sc = json.loads((betas / "scheduler" / "scheduler_config.json").read_text())
    (betas / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sc, "beta_end": 0.02}))
    assert load_model(str(betas)).fingerprint != base
    text = shutil.copytree(src, tmp_path / "text")
    f = next((text / "text_encoder").glob("*.safetensors"))
    w = load_file(str(f))
    k = next(k for k in w if w[k].dtype == torch.float32)
    w[k] = w[k] + 1e-3
    save_file(w, str(f), metadata={"format": "pt"})
    assert load_model(str(text)).fingerprint != base
    vocab = shutil.copytree(src, tmp_path / "vocab")
    tj = json.loads((vocab / "tokenizer" / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    a, b = list(v)[1:3]
    v[a], v[b] = v[b], v[a]
    (vocab / "tokenizer" / "tokenizer.json").write_text(json.dumps(tj))
    assert load_model(str(vocab)).fingerprint != base
    half = load_model(str(src), dtype="bf16")
    assert half.fingerprint != base and half.weights_hash == half.fingerprint
    import dataclasses

    other = dataclasses.replace(model_of(root, "sd"), weights_hash="0" * 16)  # as the cache-key tests do
    assert other.fingerprint == "0" * 16 and other.adapter.model is other


def test_dtype_is_applied_while_loading_every_component(root):
    m = load_model(str(folder_of(root, "sd3")), dtype="bf16")
    for mod in (m.denoiser, m.vae, m.text_encoder, m.text_encoder_2, m.text_encoder_3):
        assert next(mod.parameters()).dtype == torch.bfloat16
    out = m.denoise(torch.randn(m.latent_shape(1, 16)).to(torch.bfloat16), 500, m.conditioning(1))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_hub_downloads_take_only_the_diffusers_sub_folders():
    from huggingface_hub.utils import filter_repo_objects

    from revelio_nb.models import hub_patterns

    allow, ignore = hub_patterns()
    files = ["model_index.json", "sd_xl_base_1.0.safetensors", "v1-5-pruned.ckpt", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "text_encoder_3/model.safetensors",
             "tokenizer_3/spiece.model", "vae/diffusion_pytorch_model.bin", "flux1-dev.safetensors"]
    kept = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert kept == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                    "text_encoder_3/model.safetensors", "tokenizer_3/spiece.model"}


# ---------------------------------------------------------------------------------------------- embedded models


def test_embedded_training_holds_a_lock_so_two_callers_train_once(monkeypatch):
    from revelio_nb.models import embedded as E

    calls = []

    def fake_train(name, spec, folder, progress, train_steps=None):
        calls.append(name)
        assert torch.is_grad_enabled()  # training never inherits the caller's no_grad
        time.sleep(0.3)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")

    monkeypatch.setattr(E, "_train_embedded", fake_train)
    out = []

    def worker():
        with torch.no_grad():
            out.append(E.ensure_embedded("digits5-unet", train_steps=3))
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == ["digits5-unet"] and len(out) == 2 and out[0] == out[1]


def test_random_init_models_load_through_load_model():
    m = load_model("random:digits-unet")
    assert m.model_id == "random:digits-unet" and m.info["trained"] is False
    assert m.fingerprint == load_model("random:digits-unet").fingerprint
