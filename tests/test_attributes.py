"""Attribute library: known answers on synthetic images, any format, undefined attributes skipped (never a crash)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from revelio_nb import attributes as A


def canvas(n=1, size=32, channels=None):
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return np.zeros(shape, dtype=np.uint8)


def square(y0, x0, h, w, value=255, size=32):
    img = canvas(size=size)[0]
    img[y0:y0 + h, x0:x0 + w] = value
    return img


def test_brightness_and_size_grow_with_a_brighter_or_larger_square():
    dim, bright = square(8, 8, 10, 10, 120), square(8, 8, 10, 10, 250)
    small, large = square(8, 8, 6, 6), square(4, 4, 20, 20)
    v = A.measure(np.stack([dim, bright, small, large]), ["brightness", "size", "contrast"])
    assert v.brightness[1] > v.brightness[0] and v["size"][3] > v["size"][2]
    assert v["size"][2] == pytest.approx(36 / 1024) and v["size"][3] == pytest.approx(400 / 1024)
    assert v.contrast[1] > v.contrast[0]


def test_centroid_follows_the_shape():
    left, right, low = square(10, 2, 8, 8), square(10, 20, 8, 8), square(22, 2, 8, 8)
    v = A.measure(np.stack([left, right, low]), ["centroid_x", "centroid_y"])
    assert v.centroid_x[1] > v.centroid_x[0] + 0.4
    assert v.centroid_y[2] > v.centroid_y[0] + 0.3 and v.centroid_x[2] == pytest.approx(v.centroid_x[0])


def test_stripes_have_more_high_frequency_energy_and_edges_than_a_flat_square():
    flat = square(4, 4, 24, 24)
    stripes = flat.copy()
    stripes[4:28, 6:28:3] = 60  # dark one-pixel vertical stripes every 3 pixels inside the square
    v = A.measure(np.stack([flat, stripes]), ["high_freq", "edge_density", "texture"])
    assert v.high_freq[1] > 3 * v.high_freq[0]
    assert v.edge_density[1] > 2 * v.edge_density[0]
    assert v.texture[1] > v.texture[0]


def test_tilt_facing_and_shape_signs():
    rising = canvas()[0]
    for i in range(24):  # a thick diagonal going up to the right
        rising[28 - i, 4 + i : 7 + i] = 255
    falling = rising[:, ::-1]
    wide, tall = square(12, 2, 6, 28), square(2, 12, 28, 6)
    v = A.measure(np.stack([rising, falling, wide, tall]), ["tilt", "shape"])
    assert v.tilt[0] > 0.5 and v.tilt[1] == pytest.approx(-v.tilt[0])
    assert abs(v.tilt[2]) < 1e-9 and v["shape"][2] > 0 > v["shape"][3]
    head_right = square(14, 4, 10, 20)
    head_right[8:14, 18:24] = 255  # a head above the right end of the body
    f = A.facing(np.stack([head_right, head_right[:, ::-1]]))
    assert f[0] > 0 and f[1] == pytest.approx(-f[0])


def test_colour_attributes_on_rgb_and_undefined_on_grayscale():
    red, green, gray = canvas(channels=3)[0], canvas(channels=3)[0], canvas(channels=3)[0]
    red[..., 0] = 200
    green[..., 1] = 200
    gray[...] = 90
    rgb = np.stack([red, green, gray])
    v = A.measure(rgb, ["saturation", "hue_cos", "hue_sin"], keep_undefined=True)
    assert v.saturation.tolist() == pytest.approx([1, 1, 0])
    assert v.hue_cos[0] == pytest.approx(1) and v.hue_sin[0] == pytest.approx(0, abs=1e-6)
    assert v.hue_cos[1] == pytest.approx(-0.5, abs=1e-6) and v.hue_sin[1] == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(v.hue_cos[2])  # no colourful pixel: no hue
    gray_ds = np.stack([square(8, 8, 10, 10), square(2, 2, 20, 20)])
    out = A.measure(gray_ds)  # every attribute asked; colour ones are skipped and reported, not an error
    assert "saturation" not in out.columns and "hue_cos" not in out.columns and "size" in out.columns
    assert set(out.attrs["undefined"]) >= {"saturation", "hue_cos", "hue_sin"}


def test_silhouette_measures_are_undefined_on_photo_like_images():
    rng = np.random.default_rng(0)
    photos = rng.integers(60, 255, size=(5, 24, 24, 3), dtype=np.uint8)  # bright border: no dark background
    out = A.measure(photos)
    for name in ("size", "shape", "facing", "centroid_x", "texture"):
        assert name not in out.columns and "undefined" in out.attrs["undefined"][name]
    assert {"brightness", "saturation", "high_freq"} <= set(out.columns)
    assert np.isnan(A.size(photos)).all()


def test_input_formats_agree():
    imgs = np.stack([square(8, 4, 10, 12), square(3, 9, 20, 6, 180)])
    ref = A.measure(imgs, keep_undefined=True)
    as_float = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1)[:, None]  # (N, 1, H, W) in [-1, 1]
    nhwc = imgs[..., None]
    for other in (A.measure(as_float, keep_undefined=True), A.measure(nhwc, keep_undefined=True)):
        pd.testing.assert_frame_equal(ref, other, atol=1e-5)


def test_unknown_names_and_bad_inputs_are_clear_errors():
    with pytest.raises(A.AttributeMeasureError, match="valid: .*brightness"):
        A.measure(canvas(), ["brightness", "colourfulness"])
    with pytest.raises(A.AttributeMeasureError, match="channel axis"):
        A.measure(np.zeros((2, 5, 8, 8), np.float32))


def test_drop_redundant_keeps_the_first_of_a_correlated_pair():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    df = pd.DataFrame({"size": a, "brightness": a * 2 + 0.01 * rng.normal(size=200), "facing": rng.normal(size=200)})
    kept, dropped = A.drop_redundant(df, 0.9)
    assert list(kept.columns) == ["size", "facing"] and dropped["brightness"].startswith("size")


def test_measure_dataset_reports_every_registered_attribute(animals):
    df = A.measure_dataset(animals, animals.split("test")[:64])
    assert len(df) == 64 and set(df.columns) | set(df.attrs["undefined"]) == set(A.ATTRIBUTES)
    assert {"size", "facing", "brightness"} <= set(df.columns)
    assert A.describe().attribute.tolist() == list(A.ATTRIBUTES)
