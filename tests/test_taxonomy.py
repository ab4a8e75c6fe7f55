"""Latent taxonomy: exact sparse rank statistics, planted kinds recovered, noise stays unexplained like its null,
Hungarian matching of a permuted SAE, claim verdicts and word-naming agreement from the numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from revelio_nb import taxonomy as T
from revelio_nb.latent_store import ImageScores
from revelio_nb.sae import SaeConfig, SparseAutoencoder


def planted(n_per_class=150, n_classes=4, seed=0):
    """Dense scores of 8 latents with known kinds, labels and attributes (size, facing, texture independent)."""
    rng = np.random.default_rng(seed)
    n = n_per_class * n_classes
    labels = np.repeat(np.arange(n_classes), n_per_class)
    values = pd.DataFrame({"size": rng.normal(size=n), "facing": rng.normal(size=n), "texture": rng.normal(size=n)})
    s = np.zeros((n, 8), dtype=np.float32)
    s[labels == 2, 0] = 1 + rng.random((labels == 2).sum())            # class 2, unordered inside it
    f = values.facing.to_numpy()
    s[f > 0.3, 1] = f[f > 0.3] + 0.1                                   # facing, whatever the class
    one = labels == 1
    s[one, 2] = np.exp(values["size"].to_numpy()[one])                 # class 1, ordered by size: mixed
    z = values["size"].to_numpy()
    s[z < -0.2, 3] = -z[z < -0.2]                                      # small things: size, negative
    for j in (4, 5, 6):                                                # noise
        fire = rng.random(n) < 0.25
        s[fire, j] = rng.random(fire.sum()) + 0.01
    return ImageScores.from_dense(s), labels, values, s           # latent 7 never fires: dead


def test_rank_correlation_is_spearman_on_the_sparse_code():
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((200, 6)) < 0.3, rng.integers(1, 4, (200, 6)), 0).astype(np.float32)
    vals = np.c_[rng.normal(size=200), rng.integers(0, 3, 200)]  # the second column is full of ties
    rho = T.rank_correlation(ImageScores.from_dense(dense), vals)
    ref = np.array([[spearmanr(dense[:, m], vals[:, j])[0] for j in range(2)] for m in range(6)])
    np.testing.assert_allclose(rho, ref, atol=1e-12)
    # within groups: pooled correlation of group-wise ranks scaled by the group size
    g = rng.integers(0, 3, 200)

    def cr(x):
        out = np.zeros(len(x))
        for k in range(3):
            sel = g == k
            out[sel] = (rankdata(x[sel]) - (sel.sum() + 1) / 2) / sel.sum()
        return out

    rho_g = T.rank_correlation(ImageScores.from_dense(dense), vals, g)
    ref_g = np.array([[(cr(dense[:, m]) * cr(vals[:, j])).sum()
                       / np.sqrt((cr(dense[:, m]) ** 2).sum() * (cr(vals[:, j]) ** 2).sum()) for j in range(2)]
                      for m in range(6)])
    np.testing.assert_allclose(rho_g, ref_g, atol=1e-12)


def test_planted_latents_get_their_kinds():
    scores, labels, values, _ = planted()
    names = ["bear", "bird", "cat", "cow"]
    tax = T.latent_taxonomy(scores, labels, values, names, T.TaxonomyConfig(n_shuffles=5))
    t = tax.table.set_index("latent")
    assert t.loc[0, "kind"] == "class" and t.loc[0, "label"] == "cat" and t.loc[0, "class_auroc"] > 0.99
    assert t.loc[1, "kind"] == "attribute" and t.loc[1, "label"] == "facing+"
    assert t.loc[2, "kind"] == "mixed" and t.loc[2, "label"] == "bird & size+"
    assert t.loc[3, "kind"] == "attribute" and t.loc[3, "label"] == "size-" and t.loc[3, "attribute_rho"] < 0
    assert (t.loc[[4, 5, 6], "kind"] == "unexplained").all()
    assert t.loc[7, "kind"] == "dead" and t.loc[7, "label"] == ""
    assert tax.counts().to_dict() == {"class": 1, "mixed": 1, "attribute": 2, "unexplained": 3, "dead": 1}
    assert t.loc[1, "attribute_group"] == "pose" and t.loc[3, "attribute_group"] == "geometry"
    assert {"auroc:cat", "rho:facing"} <= set(t.columns)


def test_within_class_rho_does_not_credit_a_class_latent_with_its_class_attribute():
    # class 0 is large, class 1 small; a latent firing on class 0 (unordered inside it) tracks size across classes
    # (raw rho high) but not within them: it is a class latent, not a size latent.
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 200)
    size = rng.normal(size=400) + 3 * (labels == 0)
    s = np.zeros((400, 1), np.float32)
    s[labels == 0, 0] = rng.random(200) + 0.5
    tax = T.latent_taxonomy(ImageScores.from_dense(s), labels, pd.DataFrame({"size": size}), ["big", "small"])
    r = tax.table.iloc[0]
    assert r.attribute_rho_raw > 0.7 and abs(r.attribute_rho) < 0.2 and r.kind == "class"


def test_noise_is_unexplained_and_the_threshold_matches_the_null():
    rng = np.random.default_rng(3)
    n, m = 600, 60
    dense = np.where(rng.random((n, m)) < rng.uniform(0.05, 0.4, m), rng.random((n, m)) + 0.01, 0)
    labels = rng.integers(0, 4, n)
    values = pd.DataFrame({"size": rng.normal(size=n), "facing": rng.normal(size=n)})
    scores = ImageScores.from_dense(dense)
    tax = T.latent_taxonomy(scores, labels, values, cfg=T.TaxonomyConfig(n_shuffles=5))
    assert (tax.table.kind == "unexplained").mean() >= 0.95
    # floors off: the thresholds are the shuffled null's 99th percentile, and noise passes them about as rarely
    free = T.TaxonomyConfig(min_class_auroc=0.5, min_attribute_rho=0.0, n_shuffles=10)
    tax0 = T.latent_taxonomy(scores, labels, values, cfg=free)
    thr = tax0.meta["thresholds"]
    assert thr["class_auroc"] == 0.5 and 1.5 < thr["class_z"] < 4.5  # the best of 4 near-normal z-scores, q99
    assert thr["attribute_rho"] == tax0.meta["own_null"]["null_attribute_rho"] < 0.2
    assert (tax0.table.kind.isin(["class", "mixed"])).mean() <= 0.1
    assert (tax0.table.kind.isin(["attribute", "mixed"])).mean() <= 0.1
    # and the planted latents are still found with the floors off (7 live latents: more shuffles for the q99)
    p_scores, p_labels, p_values, _ = planted()
    kinds = T.latent_taxonomy(p_scores, p_labels, p_values, cfg=T.TaxonomyConfig(
        min_class_auroc=0.5, min_attribute_rho=0.0, n_shuffles=100)).table.kind.tolist()
    assert kinds[:4] == ["class", "attribute", "mixed", "attribute"]


def test_undefined_and_redundant_attributes_are_skipped_and_reported():
    scores, labels, values, _ = planted()
    v = values.assign(saturation=np.nan, brightness=values["size"] * 2 + 1)
    tax = T.latent_taxonomy(scores, labels, v, cfg=T.TaxonomyConfig(n_shuffles=2))
    assert tax.meta["attributes"] == ["size", "facing", "texture"]
    assert "undefined" in tax.meta["dropped_attributes"]["saturation"]
    assert tax.meta["dropped_attributes"]["brightness"].startswith("redundant with size")
    with pytest.raises(T.TaxonomyError, match="same images"):
        T.latent_taxonomy(scores, labels[:-1], values)


def test_taxonomy_round_trips_through_disk(tmp_path):
    scores, labels, values, _ = planted()
    tax = T.latent_taxonomy(scores, labels, values, ["a", "b", "c", "d"], T.TaxonomyConfig(n_shuffles=2))
    back = T.Taxonomy.load(tax.save(tmp_path / "tax") / T.TABLE_FILE)
    pd.testing.assert_frame_equal(back.table, tax.table, check_dtype=False)
    assert back.meta["thresholds"] == tax.meta["thresholds"]
    with pytest.raises(FileNotFoundError):
        T.Taxonomy.load(tmp_path / "nothing")


def _sae(d=12, m=24, k=4, seed=0):
    torch.manual_seed(seed)
    model = SparseAutoencoder(SaeConfig(d_in=d, num_latents=m, k=k))
    with torch.no_grad():
        model.encoder.bias.normal_(0, 0.2)
    return model


def test_matching_recovers_a_permuted_sae_and_its_taxonomy_is_stable():
    a = _sae()
    perm = np.random.default_rng(0).permutation(a.num_latents)
    b = _sae(seed=1)
    with torch.no_grad():  # b = a with its latents reordered: b's latent j is a's latent perm[j]
        b.encoder.weight.copy_(a.encoder.weight[perm])
        b.encoder.bias.copy_(a.encoder.bias[perm])
        b.W_dec.copy_(a.W_dec[perm])
        b.b_dec.copy_(a.b_dec)
    match = T.match_latents(a, b)
    inv = np.argsort(perm)
    assert match.latent_b.tolist() == inv[match.latent_a].tolist()
    assert np.allclose(match.cosine, 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 300)
    x[:, 0] += 2.0 * (labels == 1)
    values = pd.DataFrame({"size": x[:, 1] + 0.3 * rng.normal(size=300)})
    cfg = T.TaxonomyConfig(n_shuffles=2, min_class_auroc=0.6, min_attribute_rho=0.1)  # several kinds
    ta, tb = (T.sae_taxonomy(s, x, labels, values, cfg=cfg) for s in (a, b))
    assert ta.table.kind.nunique() >= 2
    st = T.stability(ta, tb, match)
    assert st["same_kind"] == 1.0 and st["same_label"] == 1.0 and st["mean_cosine"] == pytest.approx(1.0)
    assert st["kappa"] == pytest.approx(1.0) and 0 < st["chance_kind"] < 1
    # kinds paired at random agree only by chance: kappa near 0
    shuffled = match.assign(latent_b=np.random.default_rng(1).permutation(match.latent_b.to_numpy()))
    rnd = T.stability(ta, tb, shuffled)
    assert rnd["kappa"] < 0.5 and rnd["same_kind"] < 1
    assert T.kind_confusion(ta, tb, match).to_numpy().trace() == a.num_latents
    # an unrelated SAE does not look stable
    other = T.match_latents(a, _sae(seed=7))
    assert other.cosine.mean() < 0.9


def test_claim_table_verdicts_follow_the_numbers():
    rows = []
    shares = {  # block -> (class, pose, colour, texture)
        "mid_block": (0.10, 0.30, 0.05, 0.05), "up_blocks.0": (0.20, 0.10, 0.05, 0.05),
        "up_blocks.1": (0.15, 0.05, 0.10, 0.05), "up_blocks.2": (0.05, 0.00, 0.02, 0.02)}
    for b, (c, p, col, tex) in shares.items():
        rows.append({"block": b, "t": 25, "live_share_class": c, "live_share_pose": p, "live_share_colour": col,
                     "live_share_texture": tex})
    summary = pd.DataFrame(rows)
    claims = T.claim_table(summary).set_index("claim")
    assert claims.loc["bottleneck: pose / camera view", "verdict"] == "holds"
    assert claims.loc["middle up-block: fine-grained class", "verdict"] == "partly"  # rank 2 of 4
    assert claims.loc["middle up-block: fine-grained class", "best_block"] == "up_blocks.0"
    assert claims.loc["last up-block: colour / texture", "verdict"] == "does not hold"
    null = summary.assign(live_share_pose=0.5)  # a random-init model with more pose latents everywhere
    claims_null = T.claim_table(summary, null).set_index("claim")
    assert claims_null.loc["bottleneck: pose / camera view", "verdict"] == "partly"
    assert "random-init" in claims_null.loc["bottleneck: pose / camera view", "why"]
    assert T.claim_blocks(["transformer_blocks.0"]) == {"bottleneck": None, "middle up-block": None,
                                                        "last up-block": None}
    text = T.finding_paragraph(T.claim_table(summary), pd.DataFrame([{"n_live": 10, **{f"n_{k}": 2 for k in T.KINDS}}]))
    assert "holds" in text and "does not hold" in text


def test_word_naming_is_compared_with_the_measured_kind():
    scores, labels, values, _ = planted()
    names = ["bear", "bird", "cat", "cow"]
    tax = T.latent_taxonomy(scores, labels, values, names, T.TaxonomyConfig(n_shuffles=2))
    named = pd.DataFrame([
        {"direction": "latent 1 (30%)", "side": "+", "rank": 1, "word": "right", "score": 0.6},   # facing: agrees
        {"direction": "latent 0 (25%)", "side": "+", "rank": 1, "word": "large", "score": 0.4},   # a cat latent
        {"direction": "latent 0 (25%)", "side": "-", "rank": 1, "word": "cat", "score": -0.3},   # other side: skipped
        {"direction": "latent 2 (25%)", "side": "+", "rank": 1, "word": "bird", "score": 0.5},   # bird: agrees
        {"direction": "latent 4 (25%)", "side": "+", "rank": 1, "word": "drawing", "score": 0.2},
    ])
    cmp = T.compare_with_names(named, tax).set_index("latent")
    assert cmp.loc[1, "agree"] and cmp.loc[1, "target"] == "facing"
    assert not cmp.loc[0, "agree"] and cmp.loc[0, "kind"] == "class"
    assert cmp.loc[2, "agree"] and cmp.loc[2, "names"] == "class"
    assert cmp.loc[4, "names"] == "other" and not cmp.loc[4, "agree"]
    summ = T.naming_summary(cmp.reset_index()).set_index("target")
    assert summ.loc["facing", "agree"] == 1.0 and summ.loc["size", "agree"] == 0.0
    with pytest.raises(T.TaxonomyError, match="latent id"):
        T.compare_with_names(named.assign(direction="axis 1"), tax)
