import json

import numpy as np
import pytest

from revelio_nb import features as F
from revelio_nb.features import store as S
from revelio_nb.models import load_model


@pytest.fixture(scope="module")
def unet(tiny_unet_path):
    return load_model(tiny_unet_path)


def cfg(path, **kw):
    base = dict(model=str(path), blocks=["mid_block", "up_blocks.0"], timesteps=[10, 200], max_images=40,
                batch_size=16, split="test")
    base.update(kw)
    return F.ExtractionConfig(**base)


def test_store_roundtrip_rows_aligned(unet, animals, tiny_unet_path, tmp_path):
    c = cfg(tiny_unet_path)
    store = F.extract_features(c, model=unet, dataset=animals, out_dir=tmp_path / "s", progress=False)
    assert store.manifest["status"] == "complete" and len(store) == 40
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for key in ("model_id", "weights_hash", "dataset", "split", "image_size", "package_version"):
        assert key in m
    assert m["config"]["blocks"] == ["mid_block", "up_blocks.0"] and m["config"]["timesteps"] == [10, 200]
    a = F.FeatureStore.open(tmp_path / "s").array("mid_block", 200)
    assert isinstance(a, np.memmap) and a.shape == (40, 16)
    # class-stratified subset of the test split, rows aligned with labels
    assert set(store.indices) <= set(animals.split("test"))
    np.testing.assert_array_equal(store.labels, animals.labels[store.indices])
    assert np.bincount(store.labels).tolist() == [4] * 10
    # row i really is image indices[i]: recompute one row by hand
    i = 7
    x0 = unet.encode_images(animals.tensor([store.indices[i]], size=32))
    noise = F.noise_for(store.indices[i], 200, 0, 0, tuple(x0.shape[1:]))[None]
    from revelio_nb.capture import FeatureCapture
    with FeatureCapture(unet, ["mid_block"]) as cap:
        ref = cap.run(unet.add_noise(x0, noise, 200), 200)["mid_block"].mean((2, 3))
    np.testing.assert_allclose(a[i], ref[0].numpy(), rtol=1e-5, atol=1e-5)


def test_deterministic_and_seed_sensitive(unet, animals, tiny_unet_path, tmp_path):
    a = F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "a", progress=False)
    b = F.extract_features(cfg(tiny_unet_path, batch_size=16), model=unet, dataset=animals, out_dir=tmp_path / "b",
                           progress=False)
    c = F.extract_features(cfg(tiny_unet_path, seed=1), model=unet, dataset=animals, out_dir=tmp_path / "c",
                           progress=False)
    for key in [("mid_block", 10), ("up_blocks.0", 200)]:
        np.testing.assert_array_equal(a.array(*key), b.array(*key))
        assert not np.array_equal(a.array(*key)[:], c.array(*key)[:])  # other seed (and other images) differ


def test_spatial_and_noise_averaging(unet, animals, tiny_unet_path, tmp_path):
    st = F.extract_features(cfg(tiny_unet_path, pooling="map", timesteps=[50], n_noise=3), model=unet,
                            dataset=animals, out_dir=tmp_path / "sp", progress=False)
    assert st.array("up_blocks.0", 50).shape == (40, 16, 32, 32)
    one = F.extract_features(cfg(tiny_unet_path, pooling="map", timesteps=[50], n_noise=1), model=unet,
                             dataset=animals, out_dir=tmp_path / "sp1", progress=False)
    assert not np.allclose(st.array("mid_block", 50), one.array("mid_block", 50))


class Boom(RuntimeError):
    pass


def test_resume_after_crash_is_identical(unet, animals, tiny_unet_path, tmp_path, monkeypatch):
    ref = F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "ref", progress=False)
    calls = {"n": 0}
    real = S._Writer.record

    def crash_after_two(self, chunk, sums):
        if calls["n"] == 2:
            raise Boom("simulated crash")
        calls["n"] += 1
        real(self, chunk, sums)

    monkeypatch.setattr(S._Writer, "record", crash_after_two)
    with pytest.raises(Boom):
        F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "x", progress=False)
    monkeypatch.setattr(S._Writer, "record", real)
    with pytest.raises(F.StoreIncompleteError, match="2/3 chunks"):
        F.FeatureStore.open(tmp_path / "x")
    done_before = F.FeatureStore.open(tmp_path / "x", allow_incomplete=True).done_chunks()
    assert done_before == {0, 1}
    resumed = F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "x",
                                 progress=False)
    for key in resumed.keys():
        np.testing.assert_array_equal(resumed.array(*key), ref.array(*key))


def test_corrupted_chunk_detected_and_recomputed(unet, animals, tiny_unet_path, tmp_path):
    st = F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "c", progress=False)
    good = np.array(st.array("mid_block", 10))
    arr = np.load(tmp_path / "c" / st.manifest["arrays"]["mid_block@t10"]["file"], mmap_mode="r+")
    arr[20] = 0.0  # chunk 1 (rows 16..31)
    arr.flush()
    del arr
    assert F.FeatureStore.open(tmp_path / "c").verify() == [1]
    fixed = F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(fixed.array("mid_block", 10), good)


def test_mismatch_refused(unet, animals, tiny_unet_path, tmp_path, tiny_dit_path):
    F.extract_features(cfg(tiny_unet_path), model=unet, dataset=animals, out_dir=tmp_path / "m", progress=False)
    with pytest.raises(F.StoreMismatchError, match="timesteps"):
        F.extract_features(cfg(tiny_unet_path, timesteps=[10]), model=unet, dataset=animals, out_dir=tmp_path / "m")
    from conftest import save_tiny_unet
    other = load_model(save_tiny_unet(tmp_path / "other", seed=1))
    with pytest.raises(F.StoreMismatchError, match="weights_hash"):
        F.extract_features(cfg(tiny_unet_path), model=other, dataset=animals, out_dir=tmp_path / "m")
    with pytest.raises(F.StoreMismatchError, match="weights_hash"):
        F.FeatureStore.open(tmp_path / "m", weights_hash=other.weights_hash)


def test_bad_inputs(unet, animals, tiny_unet_path, tmp_path):
    with pytest.raises(ValueError, match="0..999"):
        F.extract_features(cfg(tiny_unet_path, timesteps=[1000]), model=unet, dataset=animals, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="multiple of 2"):
        F.extract_features(cfg(tiny_unet_path, image_size=31), model=unet, dataset=animals, out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="pooling 'max' is not one of"):
        F.extract_features(cfg(tiny_unet_path, pooling="max"), model=unet, dataset=animals, out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="valid: \\['test', 'train', 'val'\\]"):
        F.extract_features(cfg(tiny_unet_path, split="dev"), model=unet, dataset=animals, out_dir=tmp_path / "d")
    from revelio_nb.data import DatasetError, ImageDataset
    empty = ImageDataset("e", animals.images[:3], animals.labels[:3], animals.class_names,
                         {"train": np.arange(3), "val": np.arange(0), "test": np.arange(0)})
    with pytest.raises(DatasetError, match="empty"):
        F.extract_features(cfg(tiny_unet_path, split="val"), model=unet, dataset=empty, out_dir=tmp_path / "e")
    from revelio_nb.capture import BlockNotFoundError
    with pytest.raises(BlockNotFoundError, match="mid_block"):
        F.extract_features(cfg(tiny_unet_path, blocks=["bottleneck"]), model=unet, dataset=animals, out_dir=tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_latent_sd_pipeline_by_path(tiny_sd_pipeline, animals, tmp_path):
    """A tiny SD-style pipeline saved to disk goes through the same loader as hub ids, then extraction."""
    sd = load_model(str(tiny_sd_pipeline))
    assert sd.kind == "unet_cond" and sd.vae is not None and sd.native_image_size == 64
    c = F.ExtractionConfig(model=str(tiny_sd_pipeline), blocks=["mid_block", "up_blocks.1"], timesteps=[25],
                           max_images=20, batch_size=10, split="val")
    st = F.extract_features(c, model=sd, dataset=animals, out_dir=tmp_path / "sd", progress=False)
    assert st.array("mid_block", 25).shape == (20, 16) and st.array("up_blocks.1", 25).shape == (20, 8)
    assert np.isfinite(st.array("up_blocks.1", 25)).all()
    prompted = F.extract_features(F.ExtractionConfig(**{**c.__dict__, "prompt": "a cat"}), model=sd, dataset=animals,
                                  out_dir=tmp_path / "sd2", progress=False)
    assert not np.allclose(prompted.array("mid_block", 25), st.array("mid_block", 25))


def test_dit_extraction(tiny_dit_path, animals, tmp_path):
    dit = load_model(tiny_dit_path)
    c = F.ExtractionConfig(model=str(tiny_dit_path), blocks=["transformer_blocks.0"], timesteps=[25], max_images=20,
                           batch_size=10, image_size=16, pooling="map")
    st = F.extract_features(c, model=dit, dataset=animals, out_dir=tmp_path / "dit", progress=False)
    assert st.array("transformer_blocks.0", 25).shape == (20, 16, 4, 4)
    with pytest.raises(ValueError, match="fixed position embeddings"):
        F.extract_features(F.ExtractionConfig(**{**c.__dict__, "image_size": 32}), model=dit, dataset=animals,
                           out_dir=tmp_path / "dit2")
