"""Decoding Diffusion directions: word maps, bias scores, steering, and the same code on a tiny SD-style pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from revelio_nb import directions as D
from revelio_nb.directions import causal, prompt_runs, word_maps
from revelio_nb.captions import attribute_prompt, neutral_prompt


# ------------------------------------------------------------------------------------------ a tiny SD pipeline


@pytest.fixture(scope="module")
def sd_model(tiny_sd_pipeline):
    """The tiny random SD-style pipeline of conftest (UNet2DConditionModel + CLIP + AutoencoderKL), by path."""
    from revelio_nb.models import load_model

    model = load_model(str(tiny_sd_pipeline))
    assert model.kind == "unet_cond" and model.vae is not None and model.text_encoder is not None
    return model


def _mid(model):
    """(channels, h, w) of the mid-block output of a model at its native size."""
    c = model.denoiser.config.block_out_channels[-1]
    side = model.native_image_size // model.vae_factor // 2 ** (len(model.denoiser.config.down_block_types) - 1)
    return c, side, side


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------ SD-family pipeline


def test_generate_matches_sampling_sample_with_and_without_cfg(sd_model):
    from revelio_nb.sampling import sample

    for g in (1.0, 3.0):
        cfg = D.SampleConfig(n_seeds=2, steps=3, guidance_scale=g, seed=5)
        ours = D.generate(sd_model, ["a cat", "a dog"], cfg, progress=False)
        size = sd_model.native_image_size
        assert ours.shape == (4, 3, size, size)
        ref = sample(sd_model, 2, prompts="a dog", steps=3, guidance_scale=g, seed=5)
        torch.testing.assert_close(ours[2:], ref, atol=1e-4, rtol=1e-4)


def test_prompt_h_on_tiny_sd_pipeline(sd_model, cache):
    prompts = ["a cat", "a dog", "a red cat", "a red dog"]
    cfg = D.SampleConfig(n_seeds=2, steps=3, batch_size=4)
    lat = D.prompt_h(sd_model, prompts, cfg, keep_images=True, progress=False)
    c, hh, ww = _mid(sd_model)
    size = sd_model.native_image_size
    assert lat.pooled.shape == (4, c) and lat.flat.shape == (4, c * hh * ww) and lat.shape == (c, hh, ww)
    assert lat.pooled_steps.shape == (4, 3, c) and lat.images.shape == (4, 2, size, size, 3)
    np.testing.assert_allclose(lat.get().mean(0), 0, atol=1e-5)  # centred on the reference (all prompts)
    # the pooled latent is the mean of the flattened one over space
    np.testing.assert_allclose(lat.pooled, lat.flat.reshape(4, c, hh * ww).mean(-1), rtol=1e-4, atol=1e-5)
    # batching does not change a prompt's latent (paired seeds), and the cache returns the same arrays
    one = D.prompt_h(sd_model, ["a dog"], cfg, progress=False, cache=False)
    np.testing.assert_allclose(one.pooled[0], lat.pooled[1], rtol=1e-4, atol=1e-5)
    again = D.prompt_h(sd_model, prompts, cfg, keep_images=True, progress=False)
    np.testing.assert_array_equal(again.flat, lat.flat)
    assert list((cache / "directions").iterdir())
    # chosen steps only
    last = D.prompt_h(sd_model, ["a cat"], D.SampleConfig(n_seeds=2, steps=3, capture_steps=[2]),
                            progress=False, cache=False)
    np.testing.assert_allclose(last.pooled[0], lat.pooled_steps[0, 2], rtol=1e-4, atol=1e-5)
    d = D.concept_direction(lat, ["a red cat", "a red dog"], ["a cat", "a dog"])
    assert d.shape == (c,) and np.linalg.norm(d) == pytest.approx(1.0)
    base = D.text_encoder_embeddings(sd_model, prompts)
    assert base.pooled.shape == (4, sd_model.text_encoder.config.hidden_size) and base.flat is None
    with pytest.raises(ValueError, match="flat"):
        base.get(form="flat")
    with pytest.raises(ValueError, match=r"form 'pooled' is not one of \['mean', 'flat'\] \('pooled' is now 'mean'\)"):
        base.get(form="pooled")
    with pytest.raises(ValueError, match="capture_steps"):
        D.SampleConfig(steps=3, capture_steps=[3]).validate()


def test_steering_hook_adds_exactly_strength_times_direction_and_is_removed(sd_model):
    mid = sd_model.denoiser.mid_block
    seen = []
    side = sd_model.native_image_size // sd_model.vae_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond = sd_model.conditioning(2, prompts=["a cat", "a dog"])

    def run():
        h = mid.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        try:
            return sd_model.denoise(x, 10, cond)
        finally:
            h.remove()

    base = run()
    c, hh, ww = _mid(sd_model)
    direction = torch.randn(c, generator=torch.Generator().manual_seed(1))
    with D.SteeringHook(sd_model, direction, strength=2.5) as hook:
        steered = run()
        assert len(mid._forward_hooks) == 1  # the steering hook (run() removed its own)
    torch.testing.assert_close(seen[1] - seen[0], 2.5 * direction.view(1, c, 1, 1).expand_as(seen[0]),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, base)
    assert len(mid._forward_hooks) == 0  # removed on exit
    torch.testing.assert_close(run(), base)
    # a flattened (C*h*w) direction is added per position; a wrong size is a clear error
    flat = torch.randn(c * hh * ww)
    with D.steering(sd_model, flat, 1.0):
        run()
    torch.testing.assert_close(seen[-1] - seen[0], flat.view(1, c, hh, ww).expand_as(seen[0]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"), D.steering(sd_model, torch.ones(c + 1), 1.0):
        run()
    assert len(mid._forward_hooks) == 0
    with pytest.raises(ValueError, match="unknown block"):
        D.SteeringHook(sd_model, direction, block="mid_blok")


def test_a_steering_site_adds_each_blocks_own_direction_at_one_strength(sd_model):
    """{block: direction} steers several blocks together: each block's output moves by strength x its direction."""
    side = sd_model.native_image_size // sd_model.vae_factor
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond = sd_model.conditioning(1, prompts=["a cat"])
    blocks = ["mid_block", "up_blocks.0"]
    modules = {b: dict(sd_model.denoiser.named_modules())[b] for b in blocks}
    seen = {b: [] for b in blocks}

    def run():
        hs = [m.register_forward_hook(lambda m, a, o, b=b: seen[b].append(o.detach().clone()))
              for b, m in modules.items()]
        try:
            sd_model.denoise(x, 10, cond)
        finally:
            for h in hs:
                h.remove()
    run()
    # mid_block is steered; up_blocks.0 gets its own direction on top of what the steered mid_block passes on:
    # measure each against a run steering the other block alone
    dirs = {b: torch.randn(seen[b][0].shape[1], generator=torch.Generator().manual_seed(i))
            for i, b in enumerate(blocks)}
    hooks = [D.SteeringHook(sd_model, dirs[b], 0.0, b) for b in blocks]
    with D.SteeringHooks(hooks) as group:
        group.strength = 1.5
        assert all(h.strength == 1.5 for h in hooks) and group.blocks == blocks
        run()
        group.active = False
        run()
    torch.testing.assert_close(seen["mid_block"][1] - seen["mid_block"][0],
                               1.5 * dirs["mid_block"].view(1, -1, 1, 1).expand_as(seen["mid_block"][0]))
    with D.steering(sd_model, dirs["mid_block"], 1.5):
        run()  # mid_block alone: up_blocks.0 then differs from the site's only by its own direction
    torch.testing.assert_close(seen["up_blocks.0"][1] - seen["up_blocks.0"][3],
                               1.5 * dirs["up_blocks.0"].view(1, -1, 1, 1).expand_as(seen["up_blocks.0"][0]))
    torch.testing.assert_close(seen["mid_block"][2], seen["mid_block"][0])  # switched off together
    assert all(not m._forward_hooks for m in modules.values())
    with pytest.raises(ValueError, match="steered twice"):
        D.SteeringHooks([D.SteeringHook(sd_model, dirs["mid_block"]), D.SteeringHook(sd_model, dirs["mid_block"])])
    # steer() takes the site as a {block: direction} dict
    cfg = D.SampleConfig(n_seeds=1, steps=2)
    one = D.steer(sd_model, "a cat", dirs["mid_block"], [2.0], cfg, progress=False)[2.0]
    site = D.steer(sd_model, "a cat", dirs, [2.0], cfg, progress=False)[2.0]
    zero_up = {"mid_block": dirs["mid_block"], "up_blocks.0": torch.zeros_like(dirs["up_blocks.0"])}
    torch.testing.assert_close(D.steer(sd_model, "a cat", zero_up, [2.0], cfg, progress=False)[2.0], one)
    assert not torch.allclose(site, one)


def test_steer_returns_one_batch_per_strength_with_zero_unsteered(sd_model, monkeypatch):
    cfg = D.SampleConfig(n_seeds=2, steps=2)
    c = _mid(sd_model)[0]
    out = D.steer(sd_model, "a cat", np.ones(c, np.float32), [-5.0, 0.0, 5.0], cfg, progress=False)
    assert sorted(out) == [-5.0, 0.0, 5.0]
    torch.testing.assert_close(out[0.0], D.generate(sd_model, ["a cat"], cfg, progress=False))
    assert not torch.allclose(out[5.0], out[0.0])
    # each strength is sampled on its own: alone, it gives the very images it gives beside others, so images
    # already sampled at a strength can be handed back (``sampled``) instead of being sampled again
    alone = D.steer(sd_model, "a cat", np.ones(c, np.float32), [5.0], cfg, progress=False)[5.0]
    assert torch.equal(alone, out[5.0])
    calls, real = [], causal.generate
    monkeypatch.setattr(causal, "generate", lambda *a, **k: calls.append(k["steer"].strength) or real(*a, **k))
    again = D.steer(sd_model, "a cat", np.ones(c, np.float32), [-5.0, 0.0, 5.0], cfg, progress=False,
                    sampled={5.0: out[5.0], 0.0: out[0.0]})
    assert calls == [-5.0] and again[5.0] is out[5.0] and torch.equal(again[-5.0], out[-5.0])
    with pytest.raises(ValueError, match=r"sampled\[5\] holds 1 images"):
        D.steer(sd_model, "a cat", np.ones(c, np.float32), [5.0], cfg, progress=False, sampled={5.0: alone[:1]})


# ------------------------------------------------------------------------------------------ synthetic checks


def test_word_map_names_a_planted_direction():
    rng = np.random.default_rng(0)
    vocab = ["large", "small", "cat", "dog", "left", "right"]
    d = 40
    true = rng.normal(size=(len(vocab), d))
    words = (rng.random((600, len(vocab))) < 0.4).astype(np.float32)
    h = words @ true + 0.3 * rng.normal(size=(600, d))
    captions = [" ".join(w for w, on in zip(vocab, row) if on) or "nothing" for row in words]
    wm = D.fit_word_map(h, captions, min_count=5)
    assert set(vocab) <= set(wm.vocabulary)
    planted = true[vocab.index("large")] - true[vocab.index("small")]
    for method in ("ridge", "mean_diff"):
        named = wm.name(planted[None], k=2, method=method, names=["planted"])
        top = named[(named.side == "+")].sort_values("rank")
        bottom = named[(named.side == "-")].sort_values("rank")
        assert top.iloc[0].word == "large" and bottom.iloc[0].word == "small"
        assert top.iloc[0].score > 0.5
    # ridge recovers the word vectors themselves
    cos = np.diag(word_maps.unit(wm.ridge[[wm.vocabulary.index(w) for w in vocab]]) @ word_maps.unit(true).T)
    assert (cos > 0.95).all()
    assert wm.labels(true[[2]], k=1) == ["cat"]
    with pytest.raises(ValueError, match="dims"):
        wm.name(np.ones((1, d + 1)))


def _synthetic_latents(rates: dict[str, float], noise: float, seed: int = 0, offset: float = 0.5) -> D.PromptH:
    """Prompt h in which each noun's neutral prompt sits at its rate between its small and large prompts;
    each noun has its own random identity offset (scale ``offset``)."""
    rng = np.random.default_rng(seed)
    d = 16
    axis = rng.normal(size=d)
    prompts, vecs = [], []
    for noun, r in rates.items():
        base = rng.normal(size=d) * offset
        lo, hi = base - axis / 2, base + axis / 2
        for p, v in ((neutral_prompt(noun), lo + r * (hi - lo)),
                     (attribute_prompt(noun, "size", "large"), hi), (attribute_prompt(noun, "size", "small"), lo)):
            prompts.append(p)
            vecs.append(v + noise * rng.normal(size=d))
    return D.PromptH(prompts, np.array(vecs, np.float32), None)


def test_bias_scores_track_planted_rates():
    rates = {n: r for n, r in zip(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"], np.linspace(0.05, 0.95, 8))}
    lat = _synthetic_latents(rates, noise=0.05)
    truth = pd.DataFrame({"class": list(rates), "attribute": "size", "rate": list(rates.values())})
    for method, centre in (("axis", "class"), ("axis", "global"), ("pair", "class")):
        scores = D.bias_scores(lat, list(rates), ["size"], method=method, centre=centre)
        assert list(scores.columns[:3]) == ["class", "attribute", "high"]
        rho = D.compare_with_ground_truth(scores, truth)
        assert rho.iloc[0].rho > 0.9 and rho.iloc[0].n_classes == 8
    # large noun identity offsets: class centring removes them, so the ranking survives
    shifted = _synthetic_latents(rates, noise=0.05, offset=4.0)
    assert D.compare_with_ground_truth(D.bias_scores(shifted, list(rates), ["size"], centre="class"),
                                       truth).iloc[0].rho > 0.9
    # an external axis (e.g. from the caption map) is used as given
    axis = D.attribute_axis(lat, list(rates), "size")
    ext = D.bias_scores(lat, list(rates), ["size"], axes={"size": 3 * axis})
    np.testing.assert_allclose(ext["score"], D.bias_scores(lat, list(rates), ["size"])["score"], rtol=1e-6)
    pair = D.bias_scores(lat, list(rates), ["size"], method="pair")
    np.testing.assert_allclose(pair["score"], list(rates.values()), atol=0.1)
    assert pair.sort_values("rank").iloc[0]["class"] == "hen"
    # pure noise: no rank agreement to speak of
    noisy = D.bias_scores(_synthetic_latents({k: 0.5 for k in rates}, noise=1.0), list(rates), ["size"])
    assert abs(D.compare_with_ground_truth(noisy, truth).iloc[0].rho) < 0.9
    with pytest.raises(ValueError, match="method"):
        D.bias_scores(lat, list(rates), ["size"], method="median")
    with pytest.raises(ValueError, match="centre"):
        D.bias_scores(lat, list(rates), ["size"], centre="median")
    with pytest.raises(KeyError, match="not in these prompt h"):
        D.bias_scores(lat, ["yak"], ["size"])


def test_cluster_and_steering_effect_on_synthetic_images():
    rates = {"ant": 0.1, "bee": 0.2, "cat": 0.9}
    clusters = D.cluster_prompts(_synthetic_latents(rates, 0.01))
    assert clusters["linkage"].shape == (8, 4) and len(clusters["order"]) == 9
    imgs = {}
    for s, side in zip([-1.0, 0.0, 1.0, 2.0], [6, 10, 14, 18]):
        x = np.zeros((3, 32, 32), np.uint8)
        x[:, 16 - side // 2 : 16 + side // 2, 16 - side // 2 : 16 + side // 2] = 255
        imgs[s] = x
    eff = D.steering_effect(imgs, "size")
    assert eff["monotonic"].iloc[0] == 1 and eff["rho_value_strength"].iloc[0] > 0.9
    assert eff.set_index("strength").loc[2.0, "frac_up_vs_0"] == 1.0
    with pytest.raises(ValueError, match="valid"):
        D.steering_effect(imgs, "colour")


def test_text_model_refuses_unconditional_models():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="not text-conditioned"):
        D.generate(SimpleNamespace(kind="unet", model_id="embedded:animals-unet"), ["a cat"], progress=False)


def test_caption_features_are_seeded_per_image_and_feed_a_word_map(sd_model):
    size = sd_model.native_image_size
    imgs = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    caps = ["a cat", "a dog", "a red cat", "a red dog", "a cat", "a dog"]
    cfg = D.CaptionMapConfig(t=50, batch_size=4)
    full = D.caption_features(sd_model, imgs, caps, cfg, progress=False)
    c, hh, ww = _mid(sd_model)
    assert full["mean"].shape == (6, c) and full["flat"].shape == (6, c * hh * ww)
    again = D.caption_features(sd_model, imgs, caps, D.CaptionMapConfig(t=50, batch_size=3), progress=False)
    np.testing.assert_allclose(again["mean"], full["mean"], rtol=1e-4, atol=1e-5)  # batching-independent
    cond = D.caption_features(sd_model, imgs, caps, D.CaptionMapConfig(t=50, condition="caption"), progress=False)
    assert not np.allclose(cond["mean"], full["mean"])  # the caption reaches h through cross-attention
    wm = D.fit_word_map(cond["mean"], caps, min_count=2)
    assert wm.vocabulary == ["cat", "dog", "red"] and wm.ridge.shape == (3, c)
    with pytest.raises(ValueError, match="one caption per image"):
        D.caption_features(sd_model, imgs, caps[:2], D.CaptionMapConfig(condition="caption"), progress=False)
    with pytest.raises(ValueError, match="timestep"):
        D.caption_features(sd_model, imgs, caps, D.CaptionMapConfig(t=1000), progress=False)
    with pytest.raises(ValueError, match="1 indices for 6 images"):
        D.caption_features(sd_model, imgs, caps, cfg, indices=[0], progress=False)
    part = D.caption_features(sd_model, imgs[2:4], caps[2:4], cfg, indices=[2, 3], progress=False)
    np.testing.assert_allclose(part["flat"], full["flat"][2:4], rtol=1e-4, atol=1e-5)  # a subset: the same rows


def test_generated_attribute_scores_apply_the_caption_rule_to_kept_images():
    big = np.zeros((4, 32, 32, 1), np.uint8)
    big[:, 4:28, 4:28] = 255
    small = np.zeros((4, 32, 32, 1), np.uint8)
    small[:, 14:18, 14:18] = 255
    mixed = np.concatenate([big[:1], small[:3]])
    prompts = [neutral_prompt(n) for n in ("elephant", "ant", "cat")]
    lat = D.PromptH(prompts, np.zeros((3, 2), np.float32), None, images=np.stack([big, small, mixed]))
    th = {"size": (0.1, 0.3)}
    s = D.generated_attribute_scores(lat, ["elephant", "ant", "cat"], ["size"], thresholds=th).set_index("class")
    assert s.loc["elephant", "score"] == 1.0 and s.loc["ant", "score"] == 0.0 and s.loc["cat", "score"] == 0.25
    mean = D.generated_attribute_scores(lat, ["elephant"], ["size"]).iloc[0].score
    assert mean == pytest.approx(24 * 24 / 1024)
    with pytest.raises(ValueError, match="keep_images"):
        D.generated_attribute_scores(D.PromptH(prompts, np.zeros((3, 2)), None), ["cat"])


def test_neutral_pass_h_keeps_images_and_a_cfg_run_serves_both_conditions(sd_model, cache, monkeypatch):
    prompts = ["a cat", "a red dog"]
    plain = D.SampleConfig(n_seeds=2, steps=2)
    lp = D.prompt_h(sd_model, prompts, plain, keep_images=True, progress=False)
    ln = D.prompt_h(sd_model, prompts, D.SampleConfig(n_seeds=2, steps=2, h_condition="neutral"),
                          keep_images=True, progress=False)
    np.testing.assert_array_equal(lp.images, ln.images)  # the extra neutral pass does not change the drawing
    assert not np.allclose(lp.flat, ln.flat)
    guided = D.SampleConfig(n_seeds=2, steps=2, guidance_scale=2.0)
    gp = D.prompt_h(sd_model, prompts, guided, progress=False)
    monkeypatch.setattr(prompt_runs, "generate", lambda *a, **k: pytest.fail("should have been served from the cache"))
    gn = D.prompt_h(sd_model, prompts, D.SampleConfig(n_seeds=2, steps=2, guidance_scale=2.0,
                                                            h_condition="neutral"), progress=False)
    assert gn.flat.shape == gp.flat.shape and not np.allclose(gn.flat, gp.flat)
    with pytest.raises(ValueError, match="h_condition"):
        D.SampleConfig(h_condition="caption").validate()


def test_prompt_following_measures_the_words_effect_on_the_drawings():
    rng = np.random.default_rng(0)

    def blobs(sides):
        x = np.zeros((len(sides), 32, 32, 1), np.uint8)
        for i, s in enumerate(sides):
            x[i, 16 - s // 2 : 16 + s - s // 2, 16 - s // 2 : 16 + s - s // 2] = 255
        return x

    prompts = [attribute_prompt("cat", "size", "large"), neutral_prompt("cat"), attribute_prompt("cat", "size", "small")]
    images = np.stack([blobs(rng.integers(18, 24, 6)), blobs(rng.integers(10, 18, 6)), blobs(rng.integers(6, 10, 6))])
    lat = D.PromptH(prompts, np.zeros((3, 2), np.float32), None, images=images)
    row = D.prompt_following(lat, ["cat"], ["size"]).iloc[0]
    assert row.mean_high > row.mean_neutral > row.mean_low and row.d > 3


def test_stepwise_rho_finds_the_step_that_carries_the_attribute():
    rates = {n: r for n, r in zip(["ant", "bee", "cat", "dog", "eel", "fox"], np.linspace(0.1, 0.9, 6))}
    lat = _synthetic_latents(rates, noise=0.02)
    rng = np.random.default_rng(1)
    # step 0: identical for all prompts; step 1: the planted structure; step 2: pure noise
    steps = np.stack([np.ones_like(lat.pooled), lat.pooled, rng.normal(size=lat.pooled.shape)], 1).astype(np.float32)
    lat = D.PromptH(lat.prompts, lat.pooled, None, pooled_steps=steps)
    truth = pd.DataFrame({"class": list(rates), "attribute": "size", "rate": list(rates.values())})
    df = D.stepwise_rho(lat, list(rates), truth, ["size"])
    assert df["step"].tolist() == [0, 1, 2]
    assert np.isnan(df.rho.iloc[0]) and df.rho.iloc[1] > 0.9 and abs(df.rho.iloc[2]) < 0.9
    with pytest.raises(ValueError, match="per-step"):
        D.stepwise_rho(D.PromptH(lat.prompts, lat.pooled, None), list(rates), truth, ["size"])


def test_extra_neutral_pass_runs_only_at_capture_steps_and_keeps_each_step(sd_model, cache):
    prompts = ["a cat", "a red dog"]
    calls = []
    orig = sd_model.predict  # the denoiser call of the package's one sampler loop

    def counting(x, t, cond):
        calls.append(len(x))
        return orig(x, t, cond)

    cfg = D.SampleConfig(n_seeds=2, steps=3, h_condition="neutral", capture_steps=[1, 2])
    sd_model.predict = counting
    try:
        seen = []
        D.generate(sd_model, prompts, cfg, on_h=lambda p, i, hs: seen.append((i, sorted(hs))), progress=False)
        assert calls == [4, 8, 8]  # step 0: conditional pass only; steps 1, 2: both passes
        assert seen[0] == (0, ["prompt"]) and seen[-1] == (2, ["neutral", "prompt"])
    finally:
        sd_model.predict = orig
    lat = D.prompt_h(sd_model, prompts, cfg, keep_images=True, progress=False)
    assert lat.capture_steps == [1, 2] and lat.flat_steps.shape == (2, 2, lat.flat.shape[1])
    assert np.isnan(lat.pooled_steps[:, 0]).all() and np.isfinite(lat.pooled_steps[:, 1:]).all()
    np.testing.assert_allclose(lat.flat, lat.flat_steps.mean(1), rtol=1e-5, atol=1e-6)
    # one step alone equals a run that captures only that step (same images, same h)
    only = D.prompt_h(sd_model, prompts, D.SampleConfig(n_seeds=2, steps=3, h_condition="neutral",
                                                              capture_steps=[2]), keep_images=True, progress=False)
    np.testing.assert_allclose(lat.at_step(2).flat, only.flat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lat.at_step(2).pooled, only.pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(lat.images, only.images)
    with pytest.raises(ValueError, match="not captured"):
        lat.at_step(0)
    assert D.step_index(sd_model, 3, 0) == 2 and D.step_index(sd_model, 3, 999) == 0


def test_caption_axis_bias_reads_planted_rates_through_word_axes():
    """Per-step h of neutral prompts that sit at their class's rate along a per-step 'large' direction; word maps
    fitted on captioned samples of the same space recover the ranking, whatever each class's identity offset."""
    rng = np.random.default_rng(0)
    nouns = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]
    rates = dict(zip(nouns, rng.permutation(np.linspace(0.05, 0.95, 8))))
    d, steps = 24, [3, 4]
    maps, flat_steps = {}, np.zeros((len(nouns), 2, d), np.float32)
    for k, step in enumerate(steps):
        axis = rng.normal(size=d)
        ids = {n: rng.normal(size=d) for n in nouns}
        # captioned "real images": a class identity, the size word with the class's rate, noise
        labels = rng.integers(0, len(nouns), 800)
        large = rng.random(800) < np.array([rates[nouns[c]] for c in labels])
        h = np.stack([ids[nouns[c]] for c in labels]) + np.where(large, 1.0, -1.0)[:, None] * axis
        h += 0.5 * rng.normal(size=h.shape)
        caps = [f"a drawing of a {'large' if g else 'small'} {nouns[c]}" for c, g in zip(labels, large)]
        maps[step] = D.fit_word_map(h, caps)
        for i, n in enumerate(nouns):  # the neutral prompt's h: its identity plus its rate along the axis
            flat_steps[i, k] = ids[n] + (2 * rates[n] - 1) * axis + 0.05 * rng.normal(size=d)
    prompts = [neutral_prompt(n) for n in nouns]
    lat = D.PromptH(prompts, flat_steps.mean(1), flat_steps.mean(1), flat_steps=flat_steps, capture_steps=steps)
    scores = D.caption_axis_bias(lat, maps, nouns, ["size"])
    assert list(scores.columns) == ["class", "attribute", "high", "low", "score", "rank"]
    truth = pd.DataFrame({"class": nouns, "attribute": "size", "rate": [rates[n] for n in nouns]})
    assert D.compare_with_ground_truth(scores, truth).iloc[0].rho > 0.9
    # scores are standardised per step, then averaged: mean 0 across classes
    assert abs(scores.score.mean()) < 1e-9
    with pytest.raises(ValueError, match="not captured"):
        D.caption_axis_bias(lat, {7: maps[3]}, nouns, ["size"])
    with pytest.raises(ValueError, match="no word maps"):
        D.caption_axis_bias(lat, {}, nouns, ["size"])

