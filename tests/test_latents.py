"""Latent statistics: computed from the sparse code, exact label statistics, spatial maps, tables on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from revelio_nb.latent_store import LatentStats
from revelio_nb.latents import auroc_from_entries, label_summary, latent_stats, plot_top_images
from revelio_nb.sae import ArraySource, SaeConfig, SparseAutoencoder


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


def _identity_sae(d: int, k: int) -> SparseAutoencoder:
    """An SAE whose pre-activations are the input coordinates (W_enc = W_dec = I, zero biases)."""
    model = SparseAutoencoder(SaeConfig(d_in=d, num_latents=d, k=k))
    with torch.no_grad():
        model.encoder.weight.copy_(torch.eye(d))
        model.encoder.bias.zero_()
        model.W_dec.copy_(torch.eye(d))
        model.b_dec.zero_()
    return model


def _random_sae(d: int, m: int, k: int, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    model = SparseAutoencoder(SaeConfig(d_in=d, num_latents=m, k=k))
    with torch.no_grad():
        model.encoder.bias.normal_(0, 0.3)
    return model


def _brute_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_statistics_use_the_sparse_code_not_pre_topk_values():
    # k = 1. Image 0 has pre-acts (5, 4, 0): latent 1 scores 4 before TopK but is cut (5 wins).
    # Image 1 has (1, 2, 0): latent 1 fires with 2. Pre-TopK ranking for latent 1 is image 0 > image 1;
    # the sparse code says image 1 is its only (so top) image.
    x = np.array([[5.0, 4.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    stats = latent_stats(_identity_sae(3, k=1), x, labels=np.array([0, 1, 1]), top_n=2)
    assert stats.top_rows[1].tolist() == [1, -1]
    assert stats.top_values[1].tolist() == [2.0, 0.0]
    t = stats.table.set_index("latent")
    assert t.loc[1, "freq_images"] == pytest.approx(1 / 3) and t.loc[1, "max_act"] == 2.0
    assert t.loc[0, "freq_images"] == pytest.approx(1 / 3)  # image 1's latent 0 (1.0) lost to latent 1
    assert t.loc[1, "n_top"] == 1 and t.loc[1, "purity"] == 1.0 and t.loc[1, "majority_label"] == 1
    # AUROC from the sparse code: latent 1 scores (0, 2, 0) for labels (0, 1, 1) -> class 1: 0.75
    assert t.loc[1, "best_auroc"] == pytest.approx(_brute_auroc(np.array([0, 2, 0.0]), np.array([0, 1, 1]) == 1))
    assert t.loc[1, "best_auroc"] == pytest.approx(0.75)


def test_label_summary_hand_made():
    out = label_summary(np.array([[3, 1, 0], [2, 2, 0], [0, 0, 5], [0, 0, 0]]))
    assert out["majority_label"].tolist()[:3] == [0, 0, 2] and out["majority_label"][3] == -1
    np.testing.assert_allclose(out["purity"][:3], [0.75, 0.5, 1.0])
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    np.testing.assert_allclose(out["label_entropy_bits"][:3], [h, 1.0, 0.0])
    assert np.isnan(out["purity"][3]) and np.isnan(out["label_entropy_bits"][3])


def test_auroc_hand_made_with_ties():
    # 4 images, labels (0, 0, 1, 1); latent 0 scores (3, 1, 1, 0), latent 1 never fires.
    labels = np.array([0, 0, 1, 1])
    auc = auroc_from_entries(np.array([0, 0, 0]), np.array([3.0, 1.0, 1.0], np.float32), labels[[0, 1, 2]],
                             labels, num_latents=2, num_classes=3)
    # class 0 vs rest: pairs (3>1, 3>0, 1=1, 1>0) -> 3.5 / 4
    assert auc[0, 0] == pytest.approx(0.875) and auc[0, 1] == pytest.approx(0.125)
    assert auc[1, 0] == pytest.approx(0.5) and auc[1, 1] == pytest.approx(0.5)  # all tied at 0
    assert np.isnan(auc[:, 2]).all()  # class 2 has no images


def test_pooled_stats_match_dense_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    n, d, m, k = 120, 8, 24, 3
    arr = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, 3, size=n)
    model = _random_sae(d, m, k)
    rows = np.arange(10, n)  # a subset of rows, as for one split
    stats = latent_stats(model, ArraySource(arr, rows=rows), labels=labels, top_n=5, batch_size=32,
                         image_index=np.arange(n) + 1000, class_names=["a", "b", "c"])
    with torch.no_grad():
        acts, idx = model.encode(torch.from_numpy(arr[rows]))
    dense = torch.zeros(len(rows), m).scatter(1, idx, acts).numpy()  # fine at test size
    table = stats.table.set_index("latent")
    np.testing.assert_allclose(table["freq_images"], (dense > 0).mean(0))
    np.testing.assert_allclose(table["max_act"], dense.max(0), rtol=1e-6)
    fired = dense > 0
    mean_fired = np.where(fired.sum(0) > 0, dense.sum(0) / np.maximum(fired.sum(0), 1), 0)
    np.testing.assert_allclose(table["mean_act"], mean_fired, rtol=1e-5)
    for lat in range(m):
        n_fire = int(fired[:, lat].sum())
        order = np.argsort(-dense[:, lat], kind="stable")[: min(5, n_fire)]
        np.testing.assert_allclose(stats.top_values[lat, : len(order)], dense[order, lat], rtol=1e-6)
        assert set(stats.top_rows[lat, : len(order)]) == set(rows[order])  # no ties in random floats
        assert (stats.top_rows[lat, len(order):] == -1).all()
        assert (stats.top_images[lat, : len(order)] == stats.top_rows[lat, : len(order)] + 1000).all()
        top_labels = labels[stats.top_rows[lat, : len(order)]]
        np.testing.assert_array_equal(stats.label_counts[lat], np.bincount(top_labels, minlength=3))
        aucs = [_brute_auroc(dense[:, lat], labels[rows] == c) for c in range(3)]
        assert table.loc[lat, "best_auroc"] == pytest.approx(max(aucs))
        assert table.loc[lat, "best_auroc_class"] == "abc"[int(np.argmax(aucs))]

    stats.save(tmp_path / "lat")
    back = LatentStats.load(tmp_path / "lat")
    np.testing.assert_array_equal(back.top_rows, stats.top_rows)
    np.testing.assert_array_equal(back.label_counts, stats.label_counts)
    np.testing.assert_array_equal(back.top_labels, stats.top_labels)
    np.testing.assert_allclose(back.table["best_auroc"], stats.table["best_auroc"])
    assert back.maps is None and back.meta["top_n"] == 5
    assert back.top(int(np.argmax(table["freq_images"]))).shape[0] == 5


def test_spatial_stats_keep_positions_and_maps(tmp_path):
    rng = np.random.default_rng(1)
    n, c, h, w, m, k = 14, 6, 3, 5, 20, 2
    arr = rng.normal(size=(n, c, h, w)).astype(np.float32)
    mm = np.memmap(tmp_path / "f.f32", dtype=np.float32, mode="w+", shape=arr.shape)
    mm[:] = arr
    mm.flush()
    model = _random_sae(c, m, k, seed=2)
    stats = latent_stats(model, mm, labels=rng.integers(0, 2, size=n), top_n=4, batch_size=40)
    assert stats.maps.shape == (m, 4, h, w)
    tokens = torch.from_numpy(arr.transpose(0, 2, 3, 1).reshape(-1, c))
    with torch.no_grad():
        acts, idx = model.encode(tokens)
    dense = torch.zeros(len(tokens), m).scatter(1, idx, acts).numpy().reshape(n, h, w, m)
    score = dense.max(axis=(1, 2))  # image score = max over positions
    np.testing.assert_allclose(stats.table["freq_tokens"], (dense > 0).reshape(-1, m).mean(0))
    np.testing.assert_allclose(stats.table["freq_images"], (score > 0).mean(0))
    for lat in range(m):
        n_top = int(min(4, (score[:, lat] > 0).sum()))
        np.testing.assert_allclose(stats.top_values[lat, :n_top], np.sort(score[:, lat])[::-1][:n_top], rtol=1e-6)
        for r in range(n_top):
            row = stats.top_rows[lat, r]
            np.testing.assert_allclose(stats.maps[lat, r], dense[row, :, :, lat], rtol=2e-3, atol=1e-3)  # float16
        assert not stats.maps[lat, n_top:].any()
    stats.save(tmp_path / "lat")
    back = LatentStats.load(tmp_path / "lat")
    np.testing.assert_array_equal(np.asarray(back.maps), stats.maps)

    with pytest.raises(ValueError, match="max_map_bytes"):
        latent_stats(model, mm, top_n=4, max_map_bytes=100)


def test_plot_top_images_writes_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(30, 4, 2, 2)).astype(np.float32)
    stats = latent_stats(_random_sae(4, 12, 2), arr, labels=rng.integers(0, 2, size=30), top_n=3,
                         class_names=["cat", "dog"], image_index=np.arange(30)[::-1])
    images = rng.integers(0, 255, size=(30, 8, 8, 1), dtype=np.uint8)
    fig = plot_top_images(stats, images, latents=[0, 3, 5], n=3, path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert len(fig.axes) == 9
    with pytest.raises(ValueError, match="out of range"):
        plot_top_images(stats, images, latents=[12])


# ------------------------------------------------------------------------------------------ firing lists
def test_firing_lists_are_every_firing_image_best_first_in_dataset_indices(tmp_path):
    """The stats pass keeps, for each latent, every image where it fires (dataset indices, score descending, ties
    in image order), saved as the firing.npz part of the commit: what the browser's dataset view draws."""
    # identity SAE, k = 2: exact scores, with ties (images 0 and 2 both score 3 on latent 0)
    x = np.array([[3, 1, 0, 0], [0, 2, 5, 0], [3, 0, 0, 1], [1, 0, 0, 4], [0, 0, 0, 0]], dtype=np.float32)
    index = np.array([40, 41, 42, 43, 44])
    stats = latent_stats(_identity_sae(4, 2), x, top_n=1, image_index=index, batch_size=2, max_entries=3)
    f = stats.firing
    assert f.ptr.tolist() == [0, 3, 5, 6, 8]
    assert [f.of(m)[0].tolist() for m in range(4)] == [[40, 42, 43], [41, 40], [41], [43, 42]]
    assert [f.of(m)[1].tolist() for m in range(4)] == [[3, 3, 1], [2, 1], [5], [4, 1]]
    stats.save(tmp_path / "lat")
    back = LatentStats.load(tmp_path / "lat")
    for name in ("ptr", "images", "scores"):
        np.testing.assert_array_equal(getattr(back.firing, name), getattr(f, name))


def test_spatial_firing_lists_match_the_dense_code_with_spilling(tmp_path):
    rng = np.random.default_rng(3)
    n, c, h, w, m, k = 30, 6, 3, 3, 24, 3
    arr = rng.normal(size=(n, c, h, w)).astype(np.float32)
    model = _random_sae(c, m, k, seed=4)
    index = np.arange(n) * 7 + 1
    stats = latent_stats(model, arr, top_n=2, image_index=index, batch_size=45, max_entries=50, spill_dir=tmp_path)
    with torch.no_grad():
        acts, idx = model.encode(torch.from_numpy(arr.transpose(0, 2, 3, 1).reshape(-1, c)))
    score = torch.zeros(len(acts), m).scatter(1, idx, acts).numpy().reshape(n, h * w, m).max(axis=1)
    for lat in range(m):
        imgs, vals = stats.firing.of(lat)
        assert sorted(imgs.tolist()) == sorted(index[score[:, lat] > 0].tolist())
        assert np.all(np.diff(vals) <= 0)
        np.testing.assert_allclose(vals, score[(imgs - 1) // 7, lat], rtol=1e-5)
        np.testing.assert_array_equal(imgs[:2], stats.top_images[lat, :len(imgs[:2])])
