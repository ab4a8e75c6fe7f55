"""Image folders as users have them: junk files, odd modes, mixed sizes, tiny classes, channel mismatches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from revelio_nb import data, image_folders


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def _rgb(rng, h, w):
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _class_of(root, name, n, rng, h=16, w=16):
    for i in range(n):
        _save(root / name / f"{i:02d}.png", _rgb(rng, h, w))


def _load_warned(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_dataset(str(path), **kw)
    ours = [w for w in caught if issubclass(w.category, data.DatasetWarning)]
    return ds, ours


def test_messy_folder_skips_junk_with_one_warning(tmp_path):
    """A truncated PNG used to abort the whole load with PIL's raw OSError."""
    rng = np.random.default_rng(0)
    _class_of(tmp_path, "cats", 7, rng)
    _class_of(tmp_path, "dogs", 7, rng)
    good = tmp_path / "cats" / "00.png"
    (tmp_path / "cats" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "cats" / "not_really.jpg").write_text("this is text, not a JPEG")
    (tmp_path / "cats" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "dogs" / "._00.png").write_bytes(b"AppleDouble")  # macOS resource fork, image suffix
    (tmp_path / "dogs" / "notes.txt").write_text("the good dogs")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _save(tmp_path / ".ipynb_checkpoints" / "x.png", _rgb(rng, 16, 16))
    _save(tmp_path / "dogs" / ".hidden" / "y.png", _rgb(rng, 16, 16))
    (tmp_path / "README.txt").write_text("my dataset")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "only_junk").mkdir()
    (tmp_path / "only_junk" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")

    ds, warned = _load_warned(tmp_path)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 14 and ds.images.shape[1:] == (16, 16, 3)
    assert len(warned) == 1, [str(w.message) for w in warned]
    msg = str(warned[0].message)
    for name in ("truncated.png", "not_really.jpg", ".DS_Store", "._00.png", "notes.txt", ".ipynb_checkpoints",
                 ".hidden", "README.txt", "empty_class", "only_junk"):
        assert name in msg, (name, msg)
    assert "loaded 14 images of 2 classes at 16x16" in msg


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(data.DatasetError, match=r"(?s)no readable image.*bad\.png"):
        data.load_dataset(str(tmp_path))


def test_modes_rgba_palette_16bit_gray_mix(tmp_path):
    rng = np.random.default_rng(1)
    _class_of(tmp_path, "rgb", 6, rng)
    # RGBA: left half fully transparent red, right half opaque blue -> composited on the white background
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)
    rgba[:, 8:] = (0, 0, 255, 255)
    # 16-bit grayscale covering the whole range: 65535 must be white (255), not clipped from 65535 to 255 early
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    pal = Image.fromarray(_rgb(rng, 16, 16)).convert("P", palette=Image.ADAPTIVE, colors=8)
    (tmp_path / "odd").mkdir()
    _save(tmp_path / "odd" / "a_rgba.png", rgba)
    Image.fromarray(ramp).save(tmp_path / "odd" / "b_16bit.png")
    assert Image.open(tmp_path / "odd" / "b_16bit.png").mode.startswith("I")
    pal.save(tmp_path / "odd" / "c_palette.png")
    for i in range(3):
        _save(tmp_path / "odd" / f"d_gray{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))

    ds, warned = _load_warned(tmp_path)
    assert ds.channels == 3 and len(ds) == 12
    odd = ds.images[ds.labels == ds.class_names.index("odd")]
    a, b, c, gray = odd[0], odd[1], odd[2], odd[3:]
    assert (a[:, :8] == 255).all() and (a[:, 8:] == (0, 0, 255)).all()  # transparent red -> white, not red/black
    assert b.min() == 0 and b.max() == 255 and len(np.unique(b)) > 200  # rescaled over 0..255, not clipped
    assert np.array_equal(b[..., 0], b[..., 1])
    assert np.array_equal(c, np.asarray(pal.convert("RGB")))
    assert all(np.array_equal(g[..., 0], g[..., 2]) for g in gray)  # grayscale stored as RGB next to colour
    msg = str(warned[0].message)
    assert "transparency composited on RGB(255, 255, 255)" in msg and "rescaled to 8 bits" in msg
    ds_black = data.load_dataset(str(tmp_path), background=(0, 0, 0))
    assert (ds_black.images[ds_black.labels == ds_black.class_names.index("odd")][0][:, :8] == 0).all()
    with pytest.raises(data.DatasetError, match="background"):
        data.load_dataset(str(tmp_path), background=(0, 0, 300))


def test_all_grayscale_stays_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        for i in range(6):
            _save(tmp_path / c / f"{i}.png", rng.integers(0, 255, (12, 12), dtype=np.uint8))
    ds, warned = _load_warned(tmp_path)
    assert ds.images.shape == (12, 12, 12, 1) and not warned  # a clean folder loads without any warning


def test_mixed_sizes_shorter_side_and_centre_crop_never_stretched(tmp_path):
    """64x64, 80x60, 48x72, 100x100 used to come back all stretched to the first image's size."""
    (tmp_path / "a").mkdir()
    sizes = {"0_sq64": (64, 64), "1_wide": (80, 60), "2_tall": (48, 72), "3_sq100": (100, 100)}
    for name, (w, h) in sizes.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 4, 0] = 255  # red: the left quarter of the columns
        img[: h // 4, :, 1] = 255  # green: the top quarter of the rows
        _save(tmp_path / "a" / f"{name}.png", img)
    for i in range(2):
        _save(tmp_path / "a" / f"9_extra{i}.png", np.zeros((64, 64, 3), np.uint8))
    for i in range(6):
        _save(tmp_path / "b" / f"{i}.png", np.zeros((64, 64, 3), np.uint8))
    ds = data.load_dataset(str(tmp_path))
    assert ds.images.shape[1:] == (64, 64, 3)  # the most common shorter side (64 x 8 images)
    red_cols = lambda im: int((im[32, :, 0] > 127).sum())  # noqa: E731
    green_rows = lambda im: int((im[:, 32, 1] > 127).sum())  # noqa: E731
    assert red_cols(ds.images[0]) == 16 and green_rows(ds.images[0]) == 16
    # 80x60 -> 85x64, centre crop drops 10 columns left: red 21 - 10 = 11 columns (stretched: 16), green 16 rows
    assert abs(red_cols(ds.images[1]) - 11) <= 1 and abs(green_rows(ds.images[1]) - 16) <= 1
    # 48x72 -> 64x96, centre crop drops 16 rows at the top: green 24 - 16 = 8 rows (stretched: 16), red 16 columns
    assert abs(green_rows(ds.images[2]) - 8) <= 1 and abs(red_cols(ds.images[2]) - 16) <= 1
    assert red_cols(ds.images[3]) == 16 and green_rows(ds.images[3]) == 16  # 100x100: downscaled, nothing cut
    small = data.load_dataset(str(tmp_path), image_size=24)
    assert small.images.shape[1:] == (24, 24, 3)
    with pytest.raises(data.DatasetError, match="image_size must be None or a positive integer, got 0"):
        data.load_dataset(str(tmp_path), image_size=0)


def test_aspect_kept_not_stretched():
    """The crop keeps a circle round in a wide image (stretching would make it an ellipse)."""
    yy, xx = np.mgrid[:60, :120]
    circle = (((yy - 30) ** 2 + (xx - 60) ** 2) < 20 ** 2).astype(np.uint8) * 255
    out = np.asarray(image_folders.resize_shorter_side_crop(Image.fromarray(circle), 30))
    cols = (out > 127).any(0).sum()
    rows = (out > 127).any(1).sum()
    assert abs(int(cols) - int(rows)) <= 1 and 18 <= rows <= 22


def test_too_few_images_for_a_stratified_split(tmp_path):
    rng = np.random.default_rng(3)
    _class_of(tmp_path, "many", 10, rng)
    _class_of(tmp_path, "few", 4, rng)
    assert data.min_images_per_class() == 6
    with pytest.raises(data.DatasetError, match=r"\{'few': 4\}.*fewer than 6"):
        data.load_dataset(str(tmp_path))
    ok = data.load_dataset(str(tmp_path), split_fractions=(0.75, 0.0, 0.25))
    assert set(ok.labels[ok.split("test")]) == {0, 1}


def test_channel_mismatch_converts_with_a_note():
    rgb = data.ImageDataset("rgb", np.full((2, 8, 8, 3), (255, 0, 0), np.uint8), np.array([0, 1]), ["a", "b"])
    gray = data.ImageDataset("gray", np.full((2, 8, 8, 1), 255, np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.warns(data.DatasetWarning, match="averaged to 1 channel"):
        x = rgb.tensor([0, 1], channels=1)
    assert x.shape == (2, 1, 8, 8) and torch_close(x, (255 / 3) / 127.5 - 1)
    with pytest.warns(data.DatasetWarning, match="repeated to 3 channels"):
        assert gray.tensor([0], channels=3).shape == (1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rgb.tensor([0], channels=3).shape == (1, 3, 8, 8)  # no conversion, no note
    with pytest.raises(data.DatasetError, match="model taking 4 image channels: only 1 .* and 3"):
        rgb.tensor([0], channels=4)


def torch_close(x, value):
    return bool((x - value).abs().max() < 1e-5)


def test_hub_dataset_images_are_cropped_not_stretched(monkeypatch):
    """Hub datasets go through the same conversion (they used to be stretched to the first image's size)."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(4)
    images = [Image.fromarray(_rgb(rng, h, w)) for h, w in [(40, 40), (30, 50), (60, 40)] * 4]
    images[0] = Image.fromarray(np.zeros((40, 40, 4), np.uint8))  # a transparent RGBA
    table = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 6})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    ds = data.load_dataset("hf:fake/tiny", split_fractions=(0.5, 0.0, 0.5))
    assert ds.images.shape == (12, 40, 40, 3)  # the most common shorter side (40 x 8, 30 x 4)
    assert (ds.images[0] == 255).all()


def test_missing_optional_dependency_is_one_line(monkeypatch):
    import sys

    from revelio_nb.optional import MissingDependency, require

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ModuleNotFoundError
    with pytest.raises(MissingDependency) as e:
        data.load_dataset("hf:cifar10")
    assert "pip install 'datasets==" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__ is False
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(MissingDependency, match="pip install 'ipywidgets=="):
        require("ipywidgets")


def test_latent_browser_without_ipywidgets_is_one_line(monkeypatch, tmp_path):
    import sys

    from revelio_nb import browse
    from revelio_nb.optional import MissingDependency

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(MissingDependency, match=r"^ipywidgets is not installed .*pip install 'ipywidgets==8"):
        browse.LatentBrowser(tmp_path)
