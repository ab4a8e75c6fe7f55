"""Attribute functions on hand-made images, caption generation and the saved ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from revelio_nb import captions as C
from revelio_nb.data import ImageDataset, stratified_splits


def _canvas(n=1, size=32):
    return np.zeros((n, size, size), np.uint8)


def _horse_like(facing_right=True, size=32):
    """A body box with a raised head on one side: a side-on animal silhouette."""
    img = _canvas(1, size)[0]
    img[16:24, 8:24] = 255  # body
    img[8:16, 20:26] = 255  # neck + head, on the right
    img[24:30, 9:11] = 255  # legs
    img[24:30, 21:23] = 255
    return img if facing_right else img[:, ::-1].copy()


def test_facing_sign_flips_exactly_under_mirroring():
    right, left = _horse_like(True), _horse_like(False)
    v = C.facing(np.stack([right, left]))
    assert v[0] > 0.1 and v[1] < -0.1
    assert v[0] == pytest.approx(-v[1], abs=1e-9)


def test_size_shape_and_texture_on_hand_made_images():
    big, small = _canvas(2)
    big[4:28, 4:28] = 255
    small[12:20, 12:20] = 255
    area = C.silhouette_area(np.stack([big, small]))
    assert area[0] == pytest.approx(24 * 24 / 1024) and area[1] == pytest.approx(64 / 1024)

    tall, wide = _canvas(2)
    tall[2:30, 12:18] = 255
    wide[12:18, 2:30] = 255
    ar = C.aspect_ratio(np.stack([tall, wide]))
    assert ar[0] < -1 and ar[1] > 1 and ar[0] == pytest.approx(-ar[1])

    plain, striped = _canvas(2)
    plain[4:28, 4:28] = 255
    striped[4:28, 4:28] = 255
    striped[4:28, 6:28:4] = 90  # grey stripes, still foreground
    tex = C.texture(np.stack([plain, striped]))
    assert tex[0] == pytest.approx(0.0, abs=1e-6) and tex[1] > 0.1


def test_empty_image_gives_zeros_not_nan():
    vals = C.measure(_canvas(1))
    assert np.isfinite(vals.to_numpy()).all()


def test_image_formats_agree():
    u8 = np.stack([_horse_like(True), _horse_like(False)])[..., None]  # (N, H, W, 1)
    f = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, H, W) in [-1, 1]
    a, b = C.measure(u8), C.measure(f)
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="channel axis"):
        C.to_gray(np.zeros((2, 5, 8, 7), np.float32))
    with pytest.raises(ValueError, match="valid"):
        C.measure(u8, ["colour"])


def _toy_dataset(n_per_class=30, seed=0):
    """Two classes: 'big' animals drawn large and wide, 'tiny' ones small and tall; random facing."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(2):
        for _ in range(n_per_class):
            img = np.zeros((28, 28), np.uint8)
            if c == 0:
                w, h = rng.integers(14, 24), rng.integers(8, 14)
            else:
                w, h = rng.integers(3, 7), rng.integers(10, 20)
            img[14 - h // 2 : 14 - h // 2 + h, 14 - w // 2 : 14 - w // 2 + w] = 255
            side = rng.integers(0, 2)
            img[max(0, 14 - h // 2 - 4) : 14 - h // 2, (14 + w // 2 - 3) if side else (14 - w // 2) :][:, :3] = 255
            images.append(img)
            labels.append(c)
    labels = np.array(labels)
    return ImageDataset("toy", np.stack(images), labels, ["big", "tiny"], stratified_splits(labels, seed=0))


def test_captions_follow_measurements_and_ground_truth_matches_caption_text(tmp_path):
    ds = _toy_dataset()
    cs = C.build_captions(ds, C.CaptionConfig(p_mention=0.7, seed=1))
    assert len(cs.captions) == len(ds)
    assert cs.captions == C.build_captions(ds, C.CaptionConfig(p_mention=0.7, seed=1)).captions  # seeded
    # every written word agrees with the measured value and the training-split tertiles
    for name, (lo, hi) in cs.thresholds.items():
        a = C.ATTRIBUTES[name]
        v, w = cs.values[name].to_numpy(), cs.words[name].to_numpy()
        assert (v[w == a.high] > hi).all() and (v[w == a.low] < lo).all()
    # the planted association: big -> large, tiny -> small
    gt = C.save_ground_truth(cs, tmp_path / "gt.csv", ds.split("train"))
    rates = C.rate_table(gt)
    assert rates.loc["big", "size"] > 0.9 and rates.loc["tiny", "size"] < 0.1
    assert rates.loc["big", "shape"] > 0.9 and rates.loc["tiny", "shape"] < 0.1
    # the saved rates are the rates of the words in the caption text itself
    train = ds.split("train")
    for cname in ds.class_names:
        sel = [i for i in train if ds.class_names[ds.labels[i]] == cname]
        text = [cs.captions[i].split() for i in sel]
        n_large = sum("large" in t for t in text)
        n_small = sum("small" in t for t in text)
        n_right = sum(t[-2:] == ["facing", "right"] for t in text)
        row = gt[(gt["class"] == cname) & (gt["attribute"] == "size")].iloc[0]
        assert (row.n_high, row.n_low) == (n_large, n_small)
        assert gt[(gt["class"] == cname) & (gt["attribute"] == "facing")].iloc[0].n_high == n_right
    back = pd.read_csv(tmp_path / "gt.csv")
    np.testing.assert_allclose(back["rate"].to_numpy(), gt["rate"].to_numpy(), equal_nan=True)


def test_mention_probability_and_prompts():
    ds = _toy_dataset()
    every = C.build_captions(ds, C.CaptionConfig(p_mention=1.0))
    none = C.build_captions(ds, C.CaptionConfig(p_mention=0.0))
    assert set(none.captions) == {"a drawing of a big", "a drawing of a tiny"}
    # with p=1 every image outside the middle tertile carries the word: about 2/3 of the images
    for a in ("size", "shape"):
        assert 0.55 < (every.words[a] != "").mean() < 0.75
    assert (every.words["texture"] == "").all()  # all-plain toy images tie at the thresholds: no word either way
    assert C.neutral_prompt("cat") == "a drawing of a cat"
    assert C.attribute_prompt("cat", "size", "large") == "a drawing of a large cat"
    assert C.attribute_prompt("cat", "facing", "left") == "a drawing of a cat facing left"
    with pytest.raises(ValueError, match="valid"):
        C.attribute_prompt("cat", "size", "huge")
    with pytest.raises(ValueError, match="p_mention"):
        C.build_captions(ds, C.CaptionConfig(p_mention=1.5))


def test_caption_hook_is_wired_into_the_text_model():
    from revelio_nb.models import EMBEDDED_MODELS, _resolve, build_denoiser

    spec = EMBEDDED_MODELS["animals-unet-text"]
    assert spec.conditioning == "text" and _resolve(spec.captions) is C.animal_captions
    assert spec.dataset == "animal-mnist+facing"  # Decoding Diffusion's model: planted facing association
    ref = EMBEDDED_MODELS["animals-unet-text-ref"]  # the comparisons' text model: the others' plain images
    assert ref.dataset == "animal-mnist" and ref.conditioning == "text" and ref.train.steps == 250
    net = build_denoiser(spec, 10, 1)
    out = net(torch.zeros(2, 1, 32, 32), torch.tensor([3, 500]), encoder_hidden_states=torch.zeros(2, 16, 384)).sample
    assert out.shape == (2, 1, 32, 32)


def test_planted_facing_sets_each_class_rate_by_mirroring_only(animals):
    from revelio_nb.data import DatasetError, load_dataset

    planted = load_dataset("animal-mnist+facing")
    assert planted.name == "animal-mnist+facing"
    assert np.array_equal(planted.labels, animals.labels)
    assert all(np.array_equal(planted.split(s), animals.split(s)) for s in ("train", "val", "test"))
    before, after = C.facing(animals.images), C.facing(planted.images)
    mirrored = np.sign(before) != np.sign(after)
    assert 0.2 < mirrored.mean() < 0.8
    # every image is either untouched or exactly its mirror image
    assert np.array_equal(planted.images[~mirrored], animals.images[~mirrored])
    assert np.array_equal(planted.images[mirrored], animals.images[mirrored][:, :, ::-1])
    # the measured right-facing share per class follows the planted rates (natural data: 0.3-0.6 for all)
    for c, name in enumerate(planted.class_names):
        v = after[(planted.labels == c) & (after != 0)]
        assert (v > 0).mean() == pytest.approx(C.PLANTED_FACING_RIGHT[name], abs=0.06), name
    # the ground truth written from the planted captions spreads as planted
    gt = C.rate_table(C.ground_truth(C.build_captions(planted), planted.split("train")))["facing"]
    rates = pd.Series(C.PLANTED_FACING_RIGHT)[gt.index]
    assert np.corrcoef(gt, rates)[0, 1] > 0.95 and gt.max() - gt.min() > 0.7
    # a class subset of the planted data keeps the planted images
    sub = load_dataset("animal-mnist+facing", classes=[2])
    assert np.array_equal(sub.images, planted.images[planted.labels == 2])
    with pytest.raises(DatasetError, match=r"valid: \['animal-mnist\+facing'\]"):
        load_dataset("animal-mnist+size")
    with pytest.raises(ValueError, match="missing"):
        C.plant_facing(animals, {"bear": 0.5})
