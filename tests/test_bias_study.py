"""Bias readout that holds on every seed set: per-seed projections, bootstrap intervals over paired seeds,
independent seed sets, the image-conditioning retrieval check, per-timestep steering, and the bias_study
pipeline end to end on a tiny random text-conditioned pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from revelio_nb.directions import prompt_runs, readouts as R, study as B
from revelio_nb import directions as D
from revelio_nb.captions import neutral_prompt

NOUNS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]


def _projections(signal: float, n_seeds: int = 40, common: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(nouns, seeds, steps=2, attributes=1) projections: each noun's truth times ``signal`` plus seed noise;
    ``common`` adds a per-seed offset shared by every noun (what paired seeds share)."""
    rng = np.random.default_rng(seed)
    truth = np.linspace(0.05, 0.95, len(NOUNS))[rng.permutation(len(NOUNS))]
    p = signal * truth[:, None, None, None] + rng.normal(size=(len(NOUNS), n_seeds, 2, 1))
    p += common * rng.normal(size=(1, n_seeds, 1, 1))
    return p, truth[:, None]


def test_combine_steps_standardises_each_step_then_averages():
    p = np.zeros((3, 2, 1))
    p[:, 0, 0] = [1.0, 2.0, 3.0]
    p[:, 1, 0] = [300.0, 100.0, 200.0]  # another scale: must not dominate
    s = D.combine_steps(p)[:, 0]
    z0 = (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3])
    z1 = (np.array([300, 100, 200]) - 200) / np.std([300, 100, 200])
    np.testing.assert_allclose(s, (z0 + z1) / 2)
    # a constant step (no spread) adds nothing and does not divide by zero
    p[:, 1, 0] = 5.0
    np.testing.assert_allclose(D.combine_steps(p)[:, 0], z0 / 2)


def test_bootstrap_interval_is_narrow_for_a_strong_signal_and_wide_for_a_weak_one():
    strong, truth = _projections(signal=20.0)
    weak, _ = _projections(signal=1.0)
    rs = D.bootstrap_rho(strong, truth, n_boot=300, seed=1)
    rw = D.bootstrap_rho(weak, truth, n_boot=300, seed=1)
    assert rs["rho"][0] > 0.95 and rs["ci_low"][0] > 0.85
    assert rw["ci_high"][0] - rw["ci_low"][0] > 3 * (rs["ci_high"][0] - rs["ci_low"][0])
    assert rw["ci_low"][0] <= rw["rho"][0] + 1e-9 and rw["ci_low"][0] < rw["ci_high"][0]
    # seeded: the same resamples give the same interval
    again = D.bootstrap_rho(weak, truth, n_boot=300, seed=1)
    assert again["ci_low"][0] == rw["ci_low"][0] and again["ci_high"][0] == rw["ci_high"][0]
    with pytest.raises(ValueError, match="truth must be"):
        D.bootstrap_rho(strong, truth[:3], n_boot=10)
    with pytest.raises(ValueError, match="ci"):
        D.bootstrap_rho(strong, truth, ci=1.5)


def test_bootstrap_resamples_seeds_jointly_for_all_nouns():
    """Paired seeds: a large per-seed offset shared by every noun changes no ranking, so resampling seeds jointly
    keeps the interval tight; resampling each noun's seeds on its own would let the offset scramble the ranks."""
    p, truth = _projections(signal=6.0, n_seeds=30, common=50.0)
    r = D.bootstrap_rho(p, truth, n_boot=300, seed=0)
    assert r["ci_low"][0] > 0.8


def test_rho_by_seed_set_reports_each_set_and_all_sets_at_once():
    sets = {f"set {k}": _projections(signal=4.0, seed=0)[0] + 0 * k for k in range(3)}
    rng = np.random.default_rng(5)
    sets = {k: v + rng.normal(size=v.shape) for k, v in sets.items()}  # independent seed noise per set
    _, truth = _projections(signal=4.0, seed=0)
    tdf = pd.DataFrame({"class": NOUNS, "attribute": "size", "rate": truth[:, 0]})
    df = D.rho_by_seed_set(sets, NOUNS, tdf, ["size"], n_boot=200)
    assert df.seed_set.tolist() == ["set 0", "set 1", "set 2", "all seed sets"]
    assert df.n_seeds.tolist() == [40, 40, 40, 120]
    assert (df.ci_low <= df.ci_high).all() and df.ci.eq(0.9).all()
    all_sets = df.set_index("seed_set").loc["all seed sets"]
    # three times the seeds: a tighter interval than any single set
    assert (all_sets.ci_high - all_sets.ci_low) < (df.ci_high - df.ci_low).iloc[:3].min()
    # a truth missing for a class leaves that class out
    tdf.loc[0, "rate"] = np.nan
    assert np.isfinite(D.rho_by_seed_set(sets, NOUNS, tdf, ["size"], n_boot=50).rho).all()


def test_caption_axis_bias_from_a_subset_of_seeds_matches_the_seed_mean():
    rng = np.random.default_rng(0)
    d, steps, s = 12, [1, 2], 6
    prompts = [neutral_prompt(n) for n in NOUNS]
    seeds = rng.normal(size=(len(NOUNS), s, 2, d)).astype(np.float16)
    flat_steps = seeds.astype(np.float32).mean(1)
    lat = D.PromptH(prompts, flat_steps.mean(1), flat_steps.mean(1), flat_steps=flat_steps,
                          capture_steps=steps, flat_seeds=seeds)
    assert lat.n_seeds == s and lat.at_step(2).flat_seeds.shape == (len(NOUNS), s, 1, d)
    words = rng.normal(size=(300, d))
    caps = [f"a drawing of a {'large' if w[0] > 0 else 'small'} cat" for w in words]
    maps = {k: D.fit_word_map(words, caps) for k in steps}
    per_seed = D.caption_axis_projections(lat, maps, NOUNS, ["size"], per_seed=True)
    assert per_seed.shape == (len(NOUNS), s, 2, 1)
    mean = D.caption_axis_projections(lat, maps, NOUNS, ["size"])
    # projection is linear: mean of per-seed projections = projection of the mean (up to centring, which
    # combine_steps removes)
    np.testing.assert_allclose(D.combine_steps(per_seed.mean(1)), D.combine_steps(mean), atol=1e-5)
    full = D.caption_axis_bias(lat, maps, NOUNS, ["size"])
    sub = D.caption_axis_bias(lat, maps, NOUNS, ["size"], seeds=np.arange(s))
    np.testing.assert_allclose(full.score, sub.score, atol=1e-5)
    assert not np.allclose(D.caption_axis_bias(lat, maps, NOUNS, ["size"], seeds=[0]).score, full.score)
    no_seeds = D.PromptH(prompts, flat_steps.mean(1), flat_steps.mean(1), flat_steps=flat_steps,
                               capture_steps=steps)
    with pytest.raises(ValueError, match="keep_seeds"):
        D.caption_axis_projections(no_seeds, maps, NOUNS, ["size"], per_seed=True)


def test_caption_retrieval_finds_the_own_class_despite_an_offset_and_not_with_shuffled_labels():
    rng = np.random.default_rng(0)
    d = 32
    protos = rng.normal(size=(len(NOUNS), d))
    prompts = [neutral_prompt(n) for n in NOUNS]
    lat = D.PromptH(prompts, protos, protos.astype(np.float32), capture_steps=[4])
    labels = np.repeat(np.arange(len(NOUNS)), 20)
    # real-image h: its class's prototype, a large constant offset (real vs generated), noise growing with t
    h = {t: protos[labels] + 10.0 + s * rng.normal(size=(len(labels), d)) for t, s in [(0, 0.3), (500, 3.0)]}
    df = D.caption_retrieval(lat, h, labels, NOUNS, steps={0: 4, 500: 4})
    assert df.t.tolist() == [0, 500] and df.n_images.eq(len(labels)).all()
    row0 = df.set_index("t").loc[0]
    assert row0.top1 > 0.95 and row0.top5 == 1.0 and row0.chance_top1 == pytest.approx(1 / len(NOUNS))
    assert df.set_index("t").loc[500].top1 < row0.top1
    # prompt latents that do not differ (e.g. the first step of a neutral pass: same noise, same empty prompt)
    # retrieve nothing: ties are broken at random, so accuracy is chance, not 100 %
    same = D.PromptH(prompts, np.ones_like(protos), np.ones((len(NOUNS), d), np.float32), capture_steps=[4])
    tied = D.caption_retrieval(same, {0: h[0]}, labels, NOUNS, steps={0: 4}).iloc[0]
    assert tied.top1 == pytest.approx(1 / len(NOUNS)) and tied.top5 == pytest.approx(5 / len(NOUNS))
    shuffled = D.caption_retrieval(lat, {0: h[0]}, rng.permutation(labels), NOUNS, steps={0: 4})
    assert shuffled.top1.iloc[0] < 0.35
    with pytest.raises(ValueError, match="no capture step"):
        D.caption_retrieval(lat, {7: h[0]}, labels, NOUNS, steps={0: 4})
    with pytest.raises(ValueError, match="labels"):
        D.caption_retrieval(lat, {0: h[0]}, labels + 100, NOUNS, steps={0: 4})


def test_steering_effect_paired_rho_ignores_class_differences():
    """Images of very different sizes (classes), each grown by the strength: pooled rho is weak, paired rho 1."""
    base = np.array([4, 14, 6, 16, 8, 18])
    images = {}
    for s in (-2.0, 0.0, 2.0):
        x = np.zeros((len(base), 32, 32, 1), np.uint8)
        for i, side in enumerate(base + int(s)):
            x[i, 16 - side // 2: 16 + side - side // 2, 16 - side // 2: 16 + side - side // 2] = 255
        images[s] = x
    df = D.steering_effect(images, "size")
    assert df.rho_paired.iloc[0] > 0.85 and df.rho_value_strength.iloc[0] < 0.5 and df.monotonic.iloc[0] == 1


# ------------------------------------------------------------------------------------------ tiny text pipeline


@pytest.fixture(scope="module")
def sd_model(tiny_sd_pipeline):
    from revelio_nb.models import load_model

    return load_model(str(tiny_sd_pipeline))


def test_per_timestep_steering_adds_the_direction_of_the_current_timestep(sd_model):
    side = sd_model.native_image_size // sd_model.vae_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond = sd_model.conditioning(2, prompts=["a cat", "a dog"])
    c = sd_model.denoiser.config.block_out_channels[-1]

    def mid_out(t):  # registered last, so it sees the output after any steering hook
        seen = []
        h = sd_model.denoiser.mid_block.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
        try:
            sd_model.denoise(x, t, cond)
        finally:
            h.remove()
        return seen[0]

    plain = {t: mid_out(t) for t in (110, 650)}
    dirs = {100: torch.full((c,), 1.0), 700: torch.full((c,), -2.0)}
    with D.SteeringHook(sd_model, dirs, strength=0.5) as hook:
        assert hook.per_timestep
        for t, want in ((110, 0.5), (650, -1.0)):  # the direction of the nearest timestep, times the strength
            torch.testing.assert_close(mid_out(t) - plain[t], torch.full_like(plain[t], want), atol=1e-4, rtol=1e-4)
    assert not sd_model.denoiser.mid_block._forward_hooks and not sd_model.denoiser._forward_pre_hooks
    torch.testing.assert_close(mid_out(110), plain[110])
    with pytest.raises(ValueError, match="empty"):
        D.SteeringHook(sd_model, {}, 1.0)


def test_attribute_axes_by_step_key_each_step_by_its_timestep(sd_model):
    from revelio_nb.captions import attribute_prompt

    nouns = ["cat", "dog"]
    prompts = [attribute_prompt(n, "size", w) for n in nouns for w in ("large", "small")]
    lat = D.prompt_h(sd_model, prompts, D.SampleConfig(n_seeds=2, steps=3), cache=False, progress=False)
    ts = D.step_timesteps(sd_model, 3)
    axes = D.attribute_axes_by_step(lat, nouns, "size", ts)
    assert sorted(axes) == sorted(ts) and all(v.shape == lat.flat.shape[1:] for v in axes.values())
    np.testing.assert_allclose(np.mean(list(axes.values()), 0), D.attribute_axis(lat, nouns, "size", "flat",
                                                                                normalise=False), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_animals(animals):
    """60 Animal-MNIST images per class (train 40 / test 20): a captioned dataset small enough for tests."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(animals.labels == c), 60, replace=False)
                          for c in range(len(animals.class_names))])
    labels = animals.labels[idx]
    order = np.argsort(rng.random(len(idx)))
    idx, labels = idx[order], labels[order]
    test = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(len(animals.class_names))])
    train = np.setdiff1d(np.arange(len(idx)), test)
    return replace(animals, name="tiny-animals", images=animals.images[idx], labels=labels,
                   splits={"train": train, "val": test[:10], "test": np.sort(test)})


def test_bias_study_end_to_end_on_a_tiny_text_pipeline(sd_model, tiny_animals, tmp_path, monkeypatch):
    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    cfg = B.BiasStudyConfig(n_seeds=3, seed_sets=3, steps=3, t_maps=[0, 333], map_max_images=60, shrinkage=3.0,
                            retrieval_ts=[0, 333, 666], retrieval_max_images=40, n_boot=50, batch_size=16,
                            label="tiny")
    study = B.bias_study(sd_model, tiny_animals, cfg, progress=False)
    attrs = cfg.attributes
    assert study.seed_set_labels == ["seeds 0+", "seeds 1000+", "seeds 2000+"]
    assert study.map_steps == {0: 2, 333: 1} and sorted(study.word_maps) == [1, 2]
    # each seed set keeps every seed's h at the map steps and the retrieval steps
    assert study.projections["seeds 0+"].shape == (10, 3, 2, len(attrs))
    assert all(lat.capture_steps == [0, 1, 2] for lat in study.neutral_h.values())
    # the score reads the whitened caption-map axes (cfg.axis_method), each with its attribute's mirror parity
    assert all(wm.whitened is not None and wm.shrinkage == 3.0 for wm in study.word_maps.values())
    lat0 = study.neutral_h["seeds 0+"]
    want = D.caption_axis_projections(lat0, study.word_maps, study.nouns, attrs, method="whitened", per_seed=True,
                                      mirror=True)
    np.testing.assert_allclose(study.projections["seeds 0+"], want)
    assert not np.allclose(want, D.caption_axis_projections(lat0, study.word_maps, study.nouns, attrs,
                                                            method="whitened", per_seed=True))
    # independent seed sets give different h
    assert not np.allclose(study.projections["seeds 0+"], study.projections["seeds 1000+"])
    assert set(study.rho.seed_set) == {*study.seed_set_labels, "all seed sets"}
    assert study.rho.n_seeds.tolist() == [3] * 12 + [9] * 4
    table = study.rho_table()
    assert list(table.columns) == [*study.seed_set_labels, "worst seed set", "all seed sets"]
    np.testing.assert_allclose(table["worst seed set"], table[study.seed_set_labels].min(1))
    # the reported score of a set is the combined score of its seed-mean projections
    np.testing.assert_allclose(D.score_table(study.scores["seeds 0+"]).to_numpy(),
                               D.combine_steps(study.projections["seeds 0+"].mean(1)), atol=1e-9)
    assert set(study.references.scores) == {"generated images (measured)", "text encoder"}
    assert study.retrieval.t.tolist() == [0, 333, 666] * 3 and study.retrieval.n_images.eq(40).all()
    assert study.retrieval.seed_set.tolist() == [s for s in study.seed_set_labels for _ in range(3)]
    rho, scores = B.readout_variants(study)
    assert list(scores)[0].startswith("score:") and "text encoder" in scores and len(rho) == len(scores) * len(attrs)
    assert study.retrieval[["top1", "top5"]].apply(lambda c: c.between(0, 1)).all().all()
    # the summary: one row per attribute, every seed set with its interval, the worst, the baseline, steering
    eff = pd.DataFrame({"attribute": attrs * 2, "strength": [-2.0] * 4 + [2.0] * 4, "monotonic": 1,
                        "rho_value_strength": 0.5, "rho_paired": 0.9})
    from dataclasses import replace

    retrained = replace(study, config=replace(study.config, label="tiny, seed 1"))
    summary = B.summary_table([study, retrained], steering={"tiny": eff})
    assert summary.attribute.tolist() == attrs * 2 and summary.sampler.eq("DDIM").all()
    assert summary.model.tolist() == ["tiny"] * 4 + ["tiny, seed 1"] * 4
    assert summary.steer_rho.iloc[:4].eq(0.5).all() and summary.steer_rho.iloc[4:].isna().all()
    assert summary.steer_strengths.iloc[:4].eq("-2 2").all()
    for k in (1, 2, 3):
        assert {f"rho set {k}", f"ci_low set {k}", f"ci_high set {k}"} <= set(summary.columns)
    assert {"rho worst seed set", "rho all seed sets", "rho text encoder", "steer_rho", "steer_rho_paired"} <= \
        set(summary.columns)
    # notebook 06's readouts around the study
    nouns = study.nouns
    assert list(R.readout_table(rho, scores, attrs).index) == list(scores)
    assert len(R.stack_scores(scores)) == len(scores) * len(nouns) * len(attrs)
    panels = R.bias_panels(study, scores)
    assert all(p.shape == (len(nouns), len(attrs)) for p in panels.values())
    np.testing.assert_allclose(panels["diffusion h (all seed sets)"].to_numpy(),
                               D.score_table(study.scores["all seed sets"]).to_numpy())
    ranking = R.ranking_table(study)
    assert list(ranking.columns) == attrs and list(ranking.index) == nouns and ranking.min().eq(1).all()
    clusters = R.neutral_clusters(sd_model, study)
    assert list(clusters) == ["diffusion h", "text encoder"]
    assert sorted(clusters["diffusion h"]["order"]) == sorted(neutral_prompt(n) for n in nouns)
    lat_p = R.attribute_prompt_h(sd_model, nouns, ["size"], D.SampleConfig(n_seeds=2, steps=2), progress=False)
    assert lat_p.images is not None and len(lat_p) == len(D.attribute_prompts(nouns, ["size"])["all"])
    small = replace(study, config=replace(study.config, attributes=["size"]))
    named, h, wm = R.named_directions(small, lat_p, 0, n_pcs=2, k=2)
    assert h.shape == (len(study.store.indices), lat_p.pooled.shape[1])
    assert list(dict.fromkeys(named.direction))[0] == "axis size" and named.direction.nunique() == 3
    sae_named, ev = R.sae_latent_words(study, h, wm, 0, expansion=2, k=2, epochs=2, n_latents=3, batch_size=32)
    assert sae_named.direction.nunique() == 3 and 0 <= ev["fvu"]
    # the named latents checked against their measured kind (same cached SAE: no retraining)
    naming, agreement = R.naming_vs_kind(study, tiny_animals, h, sae_named, 0, expansion=2, k=2, epochs=2,
                                         batch_size=32)
    named_ids = {int(d.split()[1]) for d in sae_named.direction}
    assert set(naming.latent) == named_ids and len(naming) == 3 and naming.agree.dtype == bool
    assert agreement.n.sum() == len(naming) and set(naming.names) <= {"attribute", "class", "other"}
    # caption_features draws the feature stores' noise: neutral rows equal the store's (the one real-image extractor)
    idx = study.store.indices[:5]
    imgs = tiny_animals.tensor(idx, size=sd_model.native_image_size, channels=sd_model.image_channels)
    got = D.caption_features(sd_model, imgs, config=D.CaptionMapConfig(t=333, seed=cfg.seed), indices=idx,
                             progress=False)
    np.testing.assert_allclose(got["flat"], study.map_h(333, "flat")[:5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["mean"], study.map_h(333, "mean")[:5], rtol=1e-4, atol=1e-5)
    # a rerun is served from the caches (no sampling)
    monkeypatch.setattr(prompt_runs, "generate", lambda *a, **k: pytest.fail("should have been served from the cache"))
    again = B.bias_study(sd_model, tiny_animals, cfg, progress=False)
    pd.testing.assert_frame_equal(again.rho, study.rho)


def test_plot_prompt_samples_has_a_row_per_noun_and_a_column_block_per_guidance_scale(sd_model):
    import matplotlib.pyplot as plt

    fig = D.plot_prompt_samples(sd_model, ["cat", "dog"], guidance_scales=(1.0, 3.0), steps=2, n_seeds=2)
    assert len(fig.axes) == 2 * 4 and fig.axes[0].get_title(loc="left") == "CFG 1"
    plt.close(fig)


def test_name_sae_latents_trains_once_and_names_the_most_frequent_latents(tmp_path, monkeypatch):
    from revelio_nb import sae

    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = rng.random((400, 2)) < 0.5
    dirs = rng.normal(size=(2, 16))
    h = (words @ dirs + 0.1 * rng.normal(size=(400, 16))).astype(np.float32)
    caps = [f"a drawing of a {'large' if a else 'small'} {'cat' if b else 'dog'}" for a, b in words]
    wm = D.fit_word_map(h, caps)
    cfg = sae.TrainConfig(sae=sae.SaeConfig(expansion_factor=2, k=2), batch_size=128, epochs=3, seed=0)
    named, ev = D.name_sae_latents(h, wm, cfg, key="t", n_latents=3, k=2)
    assert named.direction.nunique() == 3 and set(named.word) <= set(wm.vocabulary)
    freq = [float(d.split("(")[1].rstrip("%)")) for d in dict.fromkeys(named.direction)]
    assert freq == sorted(freq, reverse=True) and 0 <= ev["fvu"] < 1
    assert len(list((tmp_path / "cache" / "sae").iterdir())) == 1
    again, _ = D.name_sae_latents(h, wm, cfg, key="t", n_latents=3, k=2)  # from the cache
    pd.testing.assert_frame_equal(again, named)


def test_whitened_word_axis_reads_the_attribute_not_the_class_it_co_occurs_with():
    """'textured' is written mostly for one class whose identity varies h a lot: the plain difference of means
    mixes that identity into the texture axis, the whitened (shrinkage-LDA) axis much less; with a huge
    shrinkage it tends to the plain one."""
    rng = np.random.default_rng(0)
    d, n = 40, 3000
    texture_dir, identity_dir = np.eye(d)[0], np.eye(d)[1]
    zebra = rng.random(n) < 0.3
    textured = rng.random(n) < np.where(zebra, 0.9, 0.1)
    h = (8.0 * zebra[:, None] * identity_dir + 0.5 * np.where(textured, 1, -1)[:, None] * texture_dir
         + 0.3 * rng.normal(size=(n, d)))
    h += 4.0 * rng.normal(size=(n, 1)) * identity_dir  # identity also varies within the classes
    caps = [f"a drawing of a {'textured' if t else 'plain'} {'zebra' if z else 'cat'}" for t, z in zip(textured, zebra)]
    wm = D.fit_word_map(h, caps, shrinkage=0.1)
    plain, white = D.word_axis(wm, "texture", "mean_diff"), D.word_axis(wm, "texture", "whitened")
    assert abs(white @ texture_dir) > 0.95 and abs(white @ identity_dir) < 0.2
    assert abs(plain @ identity_dir) > 2 * abs(white @ identity_dir)
    huge = D.fit_word_map(h, caps, shrinkage=1e6)
    assert D.word_axis(huge, "texture", "whitened") @ plain > 0.999
    with pytest.raises(ValueError, match="shrinkage"):
        D.word_axis(D.fit_word_map(h, caps), "texture", "whitened")
    with pytest.raises(ValueError, match="shrinkage must be"):
        D.fit_word_map(h, caps, shrinkage=0.0)


def test_mirror_axis_keeps_the_attributes_parity_and_removes_the_rest():
    from revelio_nb.captions import ATTRIBUTES

    assert ATTRIBUTES["facing"].mirror == -1 and ATTRIBUTES["size"].mirror == 1
    rng = np.random.default_rng(0)
    shape = (3, 4, 4)
    a = rng.normal(size=int(np.prod(shape)))
    sym, anti = D.mirror_axis(a, shape, 1), D.mirror_axis(a, shape, -1)
    np.testing.assert_allclose(sym + anti, a)
    flip = lambda v: v.reshape(shape)[..., ::-1].reshape(-1)  # noqa: E731
    np.testing.assert_allclose(flip(sym), sym)
    np.testing.assert_allclose(flip(anti), -anti)
    with pytest.raises(ValueError, match="parity"):
        D.mirror_axis(a, shape, 0)
    with pytest.raises(ValueError, match="flattened"):
        D.mirror_axis(a[:-1], shape, 1)
    # a facing axis polluted by a mirror-symmetric class direction: with mirror=True a symmetric class h (a class
    # that faces neither way) projects to exactly zero on facing, and the size axis loses its antisymmetric noise
    ident = rng.normal(size=shape)
    ident = (ident + ident[..., ::-1]).reshape(-1)
    right = rng.normal(size=shape)
    right = (right - right[..., ::-1]).reshape(-1)
    words = rng.random((600, 2)) < 0.5
    h = np.where(words[:, :1], 1.0, -1.0) * right + np.where(words[:, 1:], 1.0, 0.0) * ident
    h += 0.1 * rng.normal(size=h.shape)
    caps = [f"a drawing of a {'large' if b else 'small'} cat facing {'right' if a_ else 'left'}" for a_, b in words]
    wm = D.fit_word_map(h, caps)
    wm.mean_diff[wm.vocabulary.index("right")] += 3 * ident  # the pollution
    prompts = [neutral_prompt(n) for n in NOUNS[:3]]
    flat = np.stack([ident, 2 * ident, -ident]).astype(np.float32)
    lat = D.PromptH(prompts, flat[:, :3], flat, shape=shape, capture_steps=[0])
    plain = D.caption_axis_projections(lat, {0: wm}, NOUNS[:3], ["facing"])
    parity = D.caption_axis_projections(lat, {0: wm}, NOUNS[:3], ["facing"], mirror=True)
    assert np.abs(plain).max() > 1 and np.abs(parity).max() < 1e-6


def test_strip_panels_take_the_first_seed_of_every_third_class():
    n_seeds, nouns = 3, [f"c{i}" for i in range(10)]
    imgs = np.arange(len(nouns) * n_seeds)  # image i = class i // n_seeds, seed i % n_seeds
    show, rows = R.strip_panels({"size": {0.0: imgs, 1.0: imgs + 100}}, nouns, n_seeds)
    assert rows == ["c0", "c3", "c6", "c9"] and list(show) == ["size: small->large"]
    np.testing.assert_array_equal(show["size: small->large"][1.0], [100, 109, 118, 127])
    assert R.short_prompt(neutral_prompt("cat")) == "cat"


def test_plots_save_writes_the_table_and_the_figure_under_one_name(tmp_path):
    import matplotlib.pyplot as plt

    from revelio_nb import plots

    fig = plt.figure()
    assert plots.save(tmp_path, "06_x", pd.DataFrame({"a": [1]}), fig) is None  # a cell ending with it shows no value
    plots.save(tmp_path, "06_y", fig=fig)
    plt.close(fig)
    assert pd.read_csv(tmp_path / "tables" / "06_x.csv").a.tolist() == [1]
    assert (tmp_path / "figures" / "06_x.png").stat().st_size > 0 and (tmp_path / "figures" / "06_y.png").is_file()
    assert not (tmp_path / "tables" / "06_y.csv").exists()


def test_rho_interval_plot_draws_an_interval_beside_its_estimate():
    """A percentile bootstrap interval over a few seeds can exclude the point estimate (smoke runs: 2 seeds);
    the figure draws it as it is instead of failing on negative error-bar lengths."""
    from types import SimpleNamespace

    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from revelio_nb.directions.plots import plot_rho_intervals

    rho = pd.DataFrame([
        {"seed_set": "set 1", "attribute": "size", "rho": 0.9, "ci_low": 0.2, "ci_high": 0.6},  # beside the estimate
        {"seed_set": "set 1", "attribute": "shape", "rho": 0.5, "ci_low": 0.1, "ci_high": 0.8},
        {"seed_set": "all seed sets", "attribute": "size", "rho": 0.7, "ci_low": 0.5, "ci_high": 0.8},
        {"seed_set": "all seed sets", "attribute": "shape", "rho": 0.4, "ci_low": 0.3, "ci_high": 0.6}])
    study = SimpleNamespace(rho=rho, seed_set_labels=["set 1"], label="text s0",
                            config=SimpleNamespace(attributes=["size", "shape"], sampler="ddim", n_seeds=2, ci=0.9))
    fig = plot_rho_intervals([study], target=0.8)
    segments = [seg for coll in fig.axes[0].collections for seg in coll.get_segments()]
    assert any(abs(seg[0][1] - 0.2) < 1e-9 and abs(seg[1][1] - 0.6) < 1e-9 for seg in segments)


# ------------------------------------------------------------------------------------------ where to steer


def _fake_steering(monkeypatch, scripted: dict[tuple, tuple[float, float, int]]):
    """steer_by_block with scripted selection results: {(attribute, site, scale): (rho over all images, paired rho,
    monotonic)}; records every steered run (attribute, site, scale, seed, the strengths handed back already
    sampled), every prompt-h sampling (block) and the unsteered images per seed."""
    from revelio_nb.directions import steering_blocks as SB

    runs, sampled = [], []

    baselines = {}  # seed -> the unsteered images of that seed set

    def fake_steer(model, lat, nouns, attributes, strengths, config, axes="per-step", progress=True,
                   unsteered=None, sampled=None):
        (a,) = attributes
        assert all(h.config["block"] == b for b, h in lat.items())  # each block is steered along its own axis
        site = "+".join(lat)
        assert config.block == next(iter(lat))
        # the unsteered images of a seed set are sampled once, then handed back for every attribute and site
        assert unsteered is baselines.get(config.seed)
        scale = max(strengths) / 2.0  # the test's strengths are [-2, -1, 0, 1, 2] x scale
        known = sampled[a]
        runs.append((a, site, scale, config.seed, sorted(known)))
        rho, paired, mono = scripted[(a, site, scale)]
        eff = pd.DataFrame({"attribute": a, "strength": strengths, "mean": np.arange(len(strengths)) * mono,
                            "monotonic": mono, "rho_value_strength": rho, "rho_paired": paired})
        imgs = {s: known.get(s, torch.full((len(nouns),), s)) for s in strengths}
        imgs[0.0] = baselines.setdefault(config.seed, imgs[0.0]) if unsteered is None else unsteered
        return {a: imgs}, eff

    def fake_prompt_h(model, nouns, attributes, config, progress=True):
        sampled.append(config.block)
        return prompt_runs.PromptH(["p"], np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
                                   config={"block": config.block})

    monkeypatch.setattr(SB, "steer_attributes", fake_steer)
    monkeypatch.setattr(SB, "attribute_prompt_h", fake_prompt_h)
    lat = prompt_runs.PromptH(["p"], np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32),
                              config={"block": "mid_block", "n_seeds": 3, "steps": 4})
    return runs, sampled, lat, baselines


def test_steer_by_block_keeps_h_where_it_works_and_moves_on_only_where_it_does_not(monkeypatch):
    h, up0, up01 = "mid_block", "up_blocks.0", "up_blocks.0+up_blocks.1"
    runs, sampled, lat, baselines = _fake_steering(monkeypatch, {
        ("shape", h, 1.0): (0.75, 0.81, 1),  # h works at scale 1: nothing else is tried
        ("size", h, 1.0): (0.30, 0.45, 1), ("size", h, 2.0): (0.40, 0.60, 1),  # h too weak at both scales
        ("size", up0, 1.0): (0.80, 0.95, 1),
        ("facing", h, 1.0): (0.90, 0.90, 0), ("facing", h, 2.0): (0.72, 0.75, 1),  # h x1 not monotonic, x2 is
        # paired alone is not enough: the rho over all images must pass too; up0 + up1 together at x2 gets there
        ("texture", h, 1.0): (0.10, 0.30, 1), ("texture", h, 2.0): (0.20, 0.50, 1),
        ("texture", up0, 1.0): (0.43, 0.78, 1), ("texture", up0, 2.0): (0.62, 0.84, 1),
        ("texture", up01, 1.0): (0.60, 0.84, 1), ("texture", up01, 2.0): (0.75, 0.84, 1),
        # nothing passes: the monotonic try with the highest floor min(rho, paired), not the highest paired rho
        ("tilt", h, 1.0): (0.20, 0.99, 0), ("tilt", h, 2.0): (0.10, 0.20, 1), ("tilt", up0, 1.0): (0.50, 0.60, 1),
        ("tilt", up0, 2.0): (0.30, 0.90, 1), ("tilt", up01, 1.0): (0.40, 0.40, 1), ("tilt", up01, 2.0): (0.1, 0.1, 1),
    })
    cfg = D.SteerConfig(blocks=[h, up0, up01], strengths=[2, 1, 0, -1, -2], scales=[1, 2], seed=5, min_rho=0.7)
    model = SimpleNamespace(resolve_block=lambda b: b)
    attrs = ["shape", "size", "facing", "texture", "tilt"]
    res = D.steer_by_block(model, lat, NOUNS, attrs, cfg, progress=False)
    assert res.blocks() == {"shape": h, "size": up0, "facing": h, "texture": up01, "tilt": up0}
    assert res.scales() == {"shape": 1.0, "size": 1.0, "facing": 2.0, "texture": 2.0, "tilt": 1.0}
    sel = res.selection.set_index(["attribute", "block", "scale"])
    assert len(sel) == 1 + 3 + 2 + 6 + 6 and ("shape", h, 2.0) not in sel.index
    assert not sel.loc[("texture", up0, 1.0), "passed"]  # paired 0.78 but 0.43 over all images
    assert sel.loc[("texture", up01, 2.0), "passed"] and sel.loc[("texture", up01, 2.0), "kept"]
    assert not sel["passed"].xs("tilt").any() and sel.loc[("tilt", up0, 1.0), "kept"]
    # the choice is made on the selection seeds, the kept try measured on separate evaluation seeds
    select = [r for r in runs if r[3] == 5]
    evaluate = [r for r in runs if r[3] == 5 + D.steering_blocks.EVALUATION_SEED_OFFSET]
    assert len(select) == len(sel)
    assert sorted(r[:3] for r in evaluate) == sorted((a, res.blocks()[a], res.scales()[a]) for a in attrs)
    assert res.effects.groupby("attribute")["block"].first().to_dict() == res.blocks()
    assert sampled == ["up_blocks.0", "up_blocks.1"]  # later blocks' prompt h: sampled once, only when needed
    assert list(res.strips["texture"]) == [-4.0, -2.0, 0.0, 2.0, 4.0] and len(baselines) == 2
    # a try at x2 gets back what x1 sampled at the same site on the same seeds (x2 of 1 = x1 of 2); nothing else does
    for a, site, scale, seed, known in runs:
        again = seed == 5 and scale == 2.0  # (the x1 try at a site always comes first)
        assert known == ([-2.0, -1.0, 0.0, 1.0, 2.0] if again else []), (a, site, scale, seed)
    assert res.strips["size"][0.0] is res.strips["texture"][0.0]  # one evaluation baseline for all attributes
    # the summary and the README table say where and how hard each attribute was steered
    s = D.steering_summary(res.effects)
    assert s.loc["size", "steer_block"] == up0 and s.loc["shape", "steer_block"] == h
    assert s.loc["texture", "steer_strengths"] == "-4 -2 0 2 4" and s.loc["size", "steer_strengths"] == "-2 -1 0 1 2"
    show, _ = R.strip_panels({a: res.strips[a] for a in ("size", "texture")}, NOUNS, 1, blocks=res.blocks())
    assert "size @ up_blocks.0: small->large" in show and "texture @ up_blocks.0+up_blocks.1: plain->textured" in show


def test_steer_config_names_bad_values():
    with pytest.raises(ValueError, match="include 0"):
        D.SteerConfig(strengths=[1.0, 2.0, 3.0]).validate()
    with pytest.raises(ValueError, match="without repeats"):
        D.SteerConfig(blocks=["mid_block", "mid_block"]).validate()
    with pytest.raises(ValueError, match="axes 'diagonal'"):
        D.SteerConfig(axes="diagonal").validate()
    with pytest.raises(ValueError, match="min_rho"):
        D.SteerConfig(min_rho=2.0).validate()
    with pytest.raises(ValueError, match="site 'up_blocks.0\\+'"):
        D.SteerConfig(blocks=["up_blocks.0+"]).validate()
    with pytest.raises(ValueError, match="scales must be positive"):
        D.SteerConfig(scales=[1.0, 0.0]).validate()


def test_steer_by_block_runs_on_a_tiny_pipeline_and_axes_must_match_their_block(sd_model):
    nouns = ["cat", "dog"]
    pcfg = D.SampleConfig(n_seeds=1, steps=2)
    lat = D.attribute_prompt_h(sd_model, nouns, ["size"], pcfg, progress=False)
    with pytest.raises(ValueError, match="captured at 'mid_block'"):
        D.steer_attributes(sd_model, lat, nouns, ["size"], [-1.0, 0.0, 1.0],
                           D.SampleConfig(n_seeds=1, steps=2, block="up_blocks.0"), progress=False)
    cfg = D.SteerConfig(blocks=["mid_block", "up_blocks.0"], strengths=[-1.0, 0.0, 1.0], scales=[1.0], n_seeds=1,
                        steps=2, min_rho=1.0)  # unreachable on random weights: both blocks are tried
    res = D.steer_by_block(sd_model, lat, nouns, ["size"], cfg, pcfg, progress=False)
    assert list(res.selection["block"]) == ["mid_block", "up_blocks.0"] and res.selection["kept"].sum() == 1
    assert set(res.effects["strength"]) == {-1.0, 0.0, 1.0} and res.effects["block"].nunique() == 1
    assert res.strips["size"][0.0].shape[0] == len(nouns)
    # reusing the unsteered images is exact: strength 0 at another block samples the very same images
    kept = res.effects["block"].iloc[0]
    other = "mid_block" if kept == "up_blocks.0" else "up_blocks.0"
    fresh = D.steer(sd_model, [neutral_prompt(n) for n in nouns], np.zeros(1, np.float32), [0.0],
                    cfg.sample_config(other, evaluation=True), progress=False)[0.0]
    assert torch.equal(fresh, res.strips["size"][0.0])
    with pytest.raises(ValueError, match=r"sampled\[0\] holds 1 images"):
        D.steer(sd_model, ["a cat"] * 2, np.zeros(1, np.float32), [0.0], cfg.sample_config(other, True),
                progress=False, sampled={0.0: fresh[:1]})
