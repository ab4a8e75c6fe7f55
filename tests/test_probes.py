"""Probes: linear probe + Diff-C on synthetic features with known answers, selection discipline, controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from revelio_nb import probes, report
from revelio_nb.probes import compare
from revelio_nb.probes import (DiffC, DiffCConfig, LinearProbeConfig, ProbeData, ProbeError, best_cells,
                               fit_linear_probe, summarize, train_diffc)


def _blobs(n, d=16, k=4, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = np.random.default_rng(123).normal(size=(k, d)) * sep
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _split_data(x, y, test=True, **kw):
    n = len(y)
    a, b = int(n * 0.6), int(n * 0.8)
    return ProbeData(x[:a], y[:a], x[a:b], y[a:b], x[b:] if test else None, y[b:] if test else None, **kw)


def _quadrant_maps(n, seed=0, hw=8):
    """Class = which quadrant holds a bright blob; the spatial mean is identical for all classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(scale=0.3, size=(n, 2, hw, hw)).astype(np.float32)
    h = hw // 2
    for i, c in enumerate(y):
        r0, c0 = (c // 2) * h, (c % 2) * h
        x[i, 0, r0 : r0 + h, c0 : c0 + h] += 2.0
        x[i, 1, :, :] += 2.0 * h * h / (hw * hw)  # same mean everywhere in channel 1
    return x, y


# ------------------------------------------------------------------------------------------ linear probe


def test_linear_probe_separable_and_chance():
    x, y = _blobs(600)
    r = fit_linear_probe(_split_data(x, y))
    assert r.val_acc > 0.97 and r.test_acc > 0.97
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    r0 = fit_linear_probe(_split_data(noise, y))
    assert r0.test_acc < 0.45  # 4 classes: chance is 0.25


def test_linear_probe_selects_C_on_validation_only():
    x, y = _blobs(500, d=40, sep=0.6)
    cfg = LinearProbeConfig(Cs=[1e-3, 1e-1, 10.0])
    with_test = fit_linear_probe(_split_data(x, y), cfg)
    no_test = fit_linear_probe(_split_data(x, y, test=False), cfg)
    # poison the test split: garbage labels and features must not change anything chosen on validation
    d = _split_data(x, y)
    d.y_test = np.zeros_like(d.y_test)
    d.x_test = np.random.default_rng(5).normal(size=d.x_test.shape).astype(np.float32) * 100
    poisoned = fit_linear_probe(d, cfg)
    assert no_test.test_acc is None
    for r in (no_test, poisoned):
        assert r.selected == with_test.selected
        assert r.val_acc == with_test.val_acc
        assert r.history == with_test.history
    accs = [h["val_acc"] for h in with_test.history]
    assert with_test.selected["C"] == with_test.history[int(np.argmax(accs))]["C"]
    assert poisoned.test_acc != with_test.test_acc


def test_linear_probe_errors_and_pooling():
    x, y = _blobs(100)
    with pytest.raises(ProbeError, match="rows but"):
        ProbeData(x[:50], y[:40], x[50:], y[50:])
    with pytest.raises(ProbeError, match="Cs must be"):
        fit_linear_probe(_split_data(x, y), LinearProbeConfig(Cs=[]))
    with pytest.raises(ProbeError, match=r"pool 'max' is not one of \['mean', 'flat'\]"):
        ProbeData(x[:50], y[:50], x[50:], y[50:], pool="max")
    maps = np.random.default_rng(0).normal(size=(10, 3, 4, 4)).astype(np.float32)
    d = ProbeData(maps, np.arange(10) % 2, maps, np.arange(10) % 2)
    np.testing.assert_allclose(d.vectors("train"), maps.mean(axis=(2, 3)), rtol=1e-6)
    d.pool = "flat"
    assert d.vectors("val").shape == (10, 48)


# ------------------------------------------------------------------------------------------ Diff-C


def test_diffc_architecture():
    m = DiffC(in_channels=32, n_classes=10, width=64)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert m.norm is bns[0] and m.norm.affine is False and m.norm.weight is None
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 4
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert isinstance(m.pool, nn.AdaptiveAvgPool2d) and isinstance(m.head, nn.Linear)
    assert (m.head.in_features, m.head.out_features) == (64, 10)
    sizes = []
    hooks = [c.register_forward_hook(lambda mod, a, o: sizes.append(tuple(o.shape[-2:]))) for c in convs]
    out = m.eval()(torch.randn(2, 32, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert out.shape == (2, 10)
    assert m.eval()(torch.randn(2, 32, 1, 1)).shape == (2, 10)  # a 1x1 map stays 1x1
    pooled = DiffC(in_channels=32, n_classes=10, width=64, max_map_size=16).eval()
    sizes.clear()
    hooks = [c.register_forward_hook(lambda mod, a, o: sizes.append(tuple(o.shape[-2:])))
             for c in pooled.modules() if isinstance(c, nn.Conv2d)]
    pooled(torch.randn(2, 32, 32, 32))
    pooled(torch.randn(2, 32, 8, 8))  # smaller maps are left as they are
    assert sizes == [(8, 8), (4, 4), (2, 2), (1, 1), (4, 4), (2, 2), (1, 1), (1, 1)]
    with pytest.raises(ProbeError, match="max_map_size"):
        DiffCConfig(max_map_size=0).validate()


def test_diffc_beats_linear_when_information_is_spatial():
    x, y = _quadrant_maps(700)
    d = _split_data(x, y)
    lin = fit_linear_probe(d)  # the mean-pooled vector carries no class information here
    dc = train_diffc(d, DiffCConfig(width=16, max_epochs=8, patience=8, batch_size=64), progress=False)
    assert lin.test_acc < 0.45
    assert dc.test_acc > 0.9 and dc.val_acc > 0.9
    assert dc.selected["epoch"] == int(np.argmax([h["val_acc"] for h in dc.history]))


def test_diffc_seeded_reproducible_and_test_blind():
    x, y = _quadrant_maps(300, seed=3)
    cfg = DiffCConfig(width=8, max_epochs=3, patience=3, batch_size=32)
    a = train_diffc(_split_data(x, y), cfg, progress=False)
    b = train_diffc(_split_data(x, y), cfg, progress=False)
    assert a.history == b.history and a.test_acc == b.test_acc
    c = train_diffc(_split_data(x, y), DiffCConfig(**{**cfg.__dict__, "seed": 1}), progress=False)
    assert c.history != a.history
    d = _split_data(x, y)
    d.y_test = (d.y_test + 1) % 4
    poisoned = train_diffc(d, cfg, progress=False)
    assert poisoned.history == a.history and poisoned.selected == a.selected
    with pytest.raises(ProbeError, match="spatial maps"):
        train_diffc(_split_data(*_blobs(100)), cfg, progress=False)


# ------------------------------------------------------------------------------------------ selection / tables


def test_best_cells_uses_validation_and_refuses_test():
    df = pd.DataFrame({"block": ["a", "a", "b"], "t": [0, 25, 0], "val_acc": [0.5, 0.9, 0.8],
                       "test_acc": [0.99, 0.1, 0.2]})
    assert best_cells(df, 1) == [("a", 25)]
    assert best_cells(df, 2) == [("a", 25), ("b", 0)]
    with pytest.raises(ProbeError, match="validation"):
        best_cells(df, 1, metric="test_acc")


def test_summarize_mean_std():
    df = pd.DataFrame({"method": ["m"] * 3 + ["p"], "block": ["x"] * 4, "t": [1] * 4, "seed": [0, 1, 2, 0],
                       "val_acc": [0.8, 0.9, 1.0, 0.5], "test_acc": [0.80, 0.90, 1.00, 0.5]})
    s = summarize(df).set_index("method")
    assert s.loc["m", "test_mean"] == pytest.approx(0.9)
    assert s.loc["m", "test_std"] == pytest.approx(0.1)
    assert s.loc["m", "n_seeds"] == 3 and s.loc["m", "test"] == "90.0 ± 10.0"
    assert s.loc["p", "test_std"] == 0.0


def test_results_markdown(tmp_path):
    (tmp_path / "tables").mkdir()
    with pytest.raises(FileNotFoundError, match="notebooks 04/05"):
        report.results_markdown(tmp_path)
    pd.DataFrame([{"features": "animals-unet", "method": "diffc", "block": "up_blocks.1", "t": 25, "val_acc": 0.9,
                   "test": "93.0 ± 0.2", "n_seeds": 3},
                  {"features": "animals-unet", "method": "diffc", "block": "mid_block", "t": 25, "val_acc": 0.8,
                   "test": "99.0 ± 0.2", "n_seeds": 3},  # better on test, worse on val: must not be reported
                  {"features": "pixels", "method": "pixels (logistic)", "block": "pixels", "t": -1, "val_acc": 0.8,
                   "test": "80.0 ± 0.0", "n_seeds": 1}]).to_csv(tmp_path / "tables" / "probe_summary.csv", index=False)
    md = report.results_markdown(tmp_path)
    assert "| animals-unet | diffc | up_blocks.1 @ 25 | 93.0 ± 0.2 | 3 |" in md
    assert "99.0" not in md
    assert "| pixels | pixels (logistic) | - |" in md


# ------------------------------------------------------------------------------------------ random-init control


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_random_init_control_same_architecture_other_weights(cache, monkeypatch):
    from revelio_nb import models
    from revelio_nb.models import load_model

    monkeypatch.setattr(models, "save_model_card", lambda folder, **kw: None)  # no preview sampling in a unit test

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    r0 = probes.random_init_model("animals-unet", seed=0)
    assert torch.rand(1) == before  # the global RNG is left untouched
    r0b = probes.random_init_model("embedded:animals-unet", seed=0)
    r1 = probes.random_init_model("animals-unet", seed=1)
    assert r0.model_id == "random:animals-unet" and r0.info["trained"] is False
    assert r0.weights_hash == r0b.weights_hash != r1.weights_hash
    trained = load_model("embedded:animals-unet", train_steps=2, progress=False)
    sd_r, sd_t = r0.denoiser.state_dict(), trained.denoiser.state_dict()
    assert {k: v.shape for k, v in sd_r.items()} == {k: v.shape for k, v in sd_t.items()}
    assert type(r0.denoiser) is type(trained.denoiser) and r0.kind == trained.kind
    assert r0.weights_hash != trained.weights_hash
    assert any(not torch.equal(sd_r[k], sd_t[k]) for k in sd_r)
    with pytest.raises(ProbeError, match="valid"):
        probes.random_init_model("no-such-model")


@pytest.mark.slow
def test_probe_cells_end_to_end_on_random_model(cache):
    from revelio_nb.features import ExtractionConfig

    model = probes.random_init_model("animals-unet", seed=0)
    base = ExtractionConfig(model=model.model_id, max_images=30, batch_size=30)
    df = probes.probe_cells(model, base, [("mid_block", 25), ("down_blocks.0", 100)], seeds=(0, 1),
                            diffc=DiffCConfig(width=8, max_epochs=1), progress=False)
    assert len(df) == 2 * 2 * 2  # cells x methods x seeds
    assert set(df["method"]) == {"linear", "diffc"} and set(df["seed"]) == {0, 1}
    assert df["n_train"].eq(30).all() and df["n_test"].eq(30).all()
    assert set(zip(df["block"], df["t"])) == {("mid_block", 25), ("down_blocks.0", 100)}
    assert df["test_acc"].between(0, 1).all()
    s = summarize(df)
    assert len(s) == 4 and s["n_seeds"].eq(2).all()
    # the same seed gives the same features (noise seeded) and so the same linear probe
    again = probes.probe_cells(model, base, [("mid_block", 25)], seeds=(1,), methods=("linear",), progress=False)
    ref = df[(df.method == "linear") & (df.block == "mid_block") & (df.seed == 1)]
    assert again["test_acc"].iloc[0] == ref["test_acc"].iloc[0]


def test_pixel_probe_data_uses_dataset_splits():
    from revelio_nb.data import load_dataset

    ds = load_dataset("digits")
    d = probes.pixel_probe_data(ds, size=8)
    assert d.pool == "flat" and d.x_train.shape[1:] == (1, 8, 8)
    np.testing.assert_array_equal(d.y_val, ds.labels[ds.split("val")])
    assert d.sizes() == {"n_train": len(ds.split("train")), "n_val": len(ds.split("val")), "n_test": len(ds.split("test"))}
    sub = probes.pixel_probe_data(ds, size=8, max_images=50)
    assert sub.sizes()["n_train"] == 50


@pytest.mark.slow
def test_compare_models_on_random_models(cache, monkeypatch, tmp_path):
    calls = []
    real = probes.probe_cells
    monkeypatch.setattr(compare, "probe_cells", lambda *a, **k: calls.append(a[0].model_id) or real(*a, **k))
    E = probes.ComparisonEntry
    entries = [E("architecture", "UNet", "random:animals-unet"), E("architecture", "DiT", "random:animals-dit"),
               E("conditioning", "uncond", "random:animals-unet")]  # same model + data: computed once
    sweeps, runs = probes.compare_models(entries, timesteps=[25], seeds=(0, 1), max_images=20,
                                         diffc=DiffCConfig(width=8, max_epochs=1), progress=False)
    assert calls == ["random:animals-unet", "random:animals-dit"]
    assert set(sweeps["test_acc"].isna()) == {True}  # selection sweeps never see the test split
    dit_blocks = sweeps[sweeps.label == "DiT"]["block"].tolist()
    assert dit_blocks == [f"transformer_blocks.{i}" for i in range(6)]
    # vary_noise=False: one linear row per model, Diff-C per seed
    assert runs.groupby(["label", "method"]).size().to_dict() == {
        ("DiT", "diffc"): 2, ("DiT", "linear"): 1, ("UNet", "diffc"): 2, ("UNet", "linear"): 1,
        ("uncond", "diffc"): 2, ("uncond", "linear"): 1}
    summary = probes.comparison_summary(runs)
    assert list(summary["label"]) == ["UNet", "DiT", "uncond"] and summary["train_steps"].eq(0).all()
    (tmp_path / "tables").mkdir()
    summary.to_csv(tmp_path / "tables" / "comparison_summary.csv", index=False)
    assert "| architecture | DiT | 0 | animal-mnist | transformer_blocks." in report.results_markdown(tmp_path)


def test_unconditional_dit_neutral_label_is_the_trained_one():
    dit = probes.random_init_model("animals-dit", seed=0)
    assert dit.kind == "dit" and dit.conditioning(3)["class_labels"].tolist() == [0, 0, 0]
    x = torch.zeros(1, 1, 32, 32)
    assert torch.isfinite(dit.denoise(x, 10)).all()


class _FakeStore:
    """The part of a FeatureStore a linear sweep reads."""

    def __init__(self, arrays, labels):
        self._arrays, self.labels = arrays, labels
        self.blocks = sorted({b for b, _ in arrays})
        self.timesteps = sorted({t for _, t in arrays})
        self.class_names = [str(c) for c in range(int(labels.max()) + 1)]

    def array(self, block, t):
        return self._arrays[(block, t)]


def test_linear_sweep_max_train_subsamples_train_rows_only():
    x, y = _blobs(1000, sep=0.6, seed=3)
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    parts = {"train": slice(0, 600), "val": slice(600, 800), "test": slice(800, 1000)}
    stores = {s: _FakeStore({("a", 25): x[sl], ("b", 25): noise[sl]}, y[sl]) for s, sl in parts.items()}
    full = probes.linear_sweep(stores, progress=False)
    sub = probes.linear_sweep(stores, max_train=120, progress=False)
    again = probes.linear_sweep(stores, max_train=120, progress=False)
    assert full["n_train"].eq(600).all() and sub["n_train"].eq(120).all()
    assert sub["n_val"].eq(200).all() and sub["n_test"].eq(200).all()
    pd.testing.assert_frame_equal(sub.drop(columns="seconds"), again.drop(columns="seconds"))  # seeded
    by_block = sub.set_index("block")["val_acc"]
    assert by_block["a"] > by_block["b"] + 0.2  # informative block still found on the subset
    with pytest.raises(ProbeError, match="not in the store"):
        probes.linear_sweep(stores, blocks=["c"], progress=False)
    with pytest.raises(ProbeError, match="max_train"):
        probes.linear_sweep(stores, max_train=0, progress=False)
