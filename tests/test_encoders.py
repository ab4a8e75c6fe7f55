"""Vision encoders as feature sources: tiny random CLIP-vision / DINOv2 folders saved to disk and loaded by path,
stores in the diffusion store format, probes on them, the allow-list, preprocessing against hand computations and
transformers' own (PIL) image processors, cache keys and resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from revelio_nb import artifacts
from revelio_nb import encoders as E
from revelio_nb.features import FeatureStore, StoreMismatchError, stratified_subset
from revelio_nb.probes import DiffCConfig, encoder_runs, probe_data


@pytest.fixture(scope="module")
def digits():
    from revelio_nb.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of tiny random encoders: {kind: path}."""
    root = tmp_path_factory.mktemp("tiny-encoders")
    return {k: E.save_tiny_random(root / k, k) for k in ("clip", "dinov2")}


def _cfg(folder, **kw):
    kw.setdefault("dataset", "digits")
    return E.EncoderExtractionConfig(encoder=str(folder), **kw)


# ------------------------------------------------------------------------------------------ stores


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_tiny_encoder_by_path_fills_a_feature_store(kind, tiny, digits):
    enc = E.load_encoder(tiny[kind])
    assert enc.arch == {"clip": "CLIPVisionModel", "dinov2": "Dinov2Model"}[kind]
    store = E.extract_encoder_features(_cfg(tiny[kind], split="val", max_images=30, batch_size=16), enc, digits,
                                       progress=False)
    # the same manifest fields as a diffusion store: probes and SAEs read it unchanged
    m = store.manifest
    assert m["format"] == "revelio-feature-store/1" and m["status"] == "complete"
    assert m["weights_hash"] == enc.weights_hash and m["class_names"] == digits.class_names
    assert (m["n_rows"], m["chunk_size"], m["n_chunks"]) == (30, 16, 2)
    assert store.config["model"] == str(tiny[kind]) and store.config["dataset"] == "digits"
    assert store.blocks == ["cls", "mean", "patch"] and store.timesteps == [E.NO_TIMESTEP]
    # stored grid shapes: a 4x4 patch grid (CLIP: 32 px / patch 8; DINOv2: crop 28 / patch 7), 32 channels
    assert store.array("patch", E.NO_TIMESTEP).shape == (30, 32, 4, 4)
    assert store.array("cls", E.NO_TIMESTEP).shape == (30, 32) and store.array("mean", E.NO_TIMESTEP).shape == (30, 32)
    patch = np.asarray(store.array("patch", E.NO_TIMESTEP), dtype=np.float32)
    np.testing.assert_allclose(store.array("mean", E.NO_TIMESTEP), patch.mean(axis=(2, 3)), atol=2e-2, rtol=1e-2)
    # row i is image indices[i] of the split (the seeded stratified subset), with its label
    val = digits.split("val")
    idx = stratified_subset(val, digits.labels[val], 30, 0)
    np.testing.assert_array_equal(store.indices, idx)
    np.testing.assert_array_equal(store.labels, digits.labels[idx])
    direct = enc.features(enc.preprocess(digits.images[idx[[0, 17, 29]]]), ["cls", "patch"])
    np.testing.assert_allclose(store.array("cls", E.NO_TIMESTEP)[[0, 17, 29]], direct["cls"].numpy(), atol=2e-2,
                               rtol=1e-2)
    np.testing.assert_allclose(patch[[0, 17, 29]], direct["patch"].numpy(), atol=2e-2, rtol=1e-2)
    assert FeatureStore.open(store.path).verify() == []


def test_intermediate_layers_are_grids_and_blocks_are_checked(tiny, digits):
    enc = E.load_encoder(tiny["clip"])
    store = E.extract_encoder_features(_cfg(tiny["clip"], split="test", blocks=["layers.0", "layers.2"],
                                            max_images=20, batch_size=20), enc, digits, progress=False)
    assert store.array("layers.0", -1).shape == store.array("layers.2", -1).shape == (20, 32, 4, 4)
    assert not np.allclose(store.array("layers.0", -1), store.array("layers.2", -1))
    with pytest.raises(E.EncoderError, match="valid.*layers.2"):
        enc.check_blocks(["cls", "layers.3"])
    with pytest.raises(E.EncoderError, match="not the encoder passed"):
        E.extract_encoder_features(_cfg(tiny["dinov2"]), enc, digits)


@pytest.mark.parametrize("kind", E.TINY_KINDS)
def test_every_allowed_family_gives_every_block(kind, tmp_path, digits):
    enc = E.load_encoder(E.save_tiny_random(tmp_path / kind, kind))
    feats = enc.features(enc.preprocess(digits.images[:3]), enc.valid_blocks())
    grid = feats["patch"].shape[-2:]
    assert all(f.ndim == 2 and f.shape[0] == 3 for b, f in feats.items() if b in ("cls", "mean"))
    assert all(f.ndim == 4 and f.shape[0] == 3 for b, f in feats.items() if b not in ("cls", "mean"))
    assert grid == (4, 4) and torch.isfinite(torch.cat([f.flatten() for f in feats.values()])).all()
    assert not torch.allclose(feats["cls"][0], feats["cls"][1])  # different images, different vectors


def test_a_whole_clip_checkpoint_loads_its_vision_tower(tmp_path):
    import transformers

    folder = E.save_tiny_random(tmp_path / "clip-full", "clip-full")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["CLIPModel"]
    enc = E.load_encoder(folder)
    full = transformers.CLIPModel.from_pretrained(folder, use_safetensors=True).state_dict()
    tower = enc.model.state_dict()
    assert enc.arch == "CLIPVisionModel" and len(tower) > 10
    for k, v in tower.items():  # every vision weight is the checkpoint's (not a fresh random init)
        assert torch.equal(v, full.get(f"vision_model.{k}", full.get(k))), k


# ------------------------------------------------------------------------------------------ probes


def test_probes_run_on_encoder_features(tiny, digits):
    df = encoder_runs(tiny["dinov2"], digits, seeds=(0, 1), max_images=120,
                      diffc=DiffCConfig(width=8, max_epochs=2), progress=False)
    assert df.groupby(["block", "method"]).size().to_dict() == {("cls", "linear"): 1, ("mean", "linear"): 1,
                                                                ("patch", "diffc"): 2}
    assert set(df["features"]) == {"encoder: dinov2"} and set(df["dataset"]) == {"digits"}
    assert df["t"].eq(E.NO_TIMESTEP).all() and df["n_train"].eq(120).all() and df["test_acc"].between(0, 1).all()
    # rows stay aligned with labels: even random ViT features separate digits far above chance (10 %)
    assert df[(df.method == "linear") & (df.block == "mean")]["test_acc"].iloc[0] > 0.3
    enc = E.load_encoder(tiny["dinov2"])
    stores = E.extract_encoder_splits(_cfg(tiny["dinov2"], max_images=120), enc, digits, progress=False)
    assert probe_data(stores, ("patch", E.NO_TIMESTEP)).spatial  # the probes' reader takes the store as is


# ------------------------------------------------------------------------------------------ allow-list, sources


def _copy(src, dst, **config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_only_allowed_classes_load(tiny, tmp_path):
    for archs in (["BertModel"], ["MyRemoteVisionModel"]):
        bad = _copy(tiny["clip"], tmp_path / archs[0], architectures=archs, auto_map={"AutoModel": "x.MyModel"})
        with pytest.raises(E.EncoderError, match=rf"{archs[0]}.*not an allowed.*Dinov2Model"):
            E.load_encoder(bad)
    no_w = _copy(tiny["clip"], tmp_path / "no-weights")
    (no_w / "model.safetensors").rename(no_w / "pytorch_model.bin")
    with pytest.raises(E.EncoderError, match="safetensors"):
        E.load_encoder(no_w)
    no_pp = _copy(tiny["clip"], tmp_path / "no-pp")
    (no_pp / "preprocessor_config.json").unlink()
    with pytest.raises(E.EncoderError, match="preprocessor_config.json"):
        E.load_encoder(no_pp)
    with pytest.raises(E.EncoderError, match="unsupported image processor.*CLIPImageProcessor"):
        E.Preprocess.from_config({"image_processor_type": "LlavaImageProcessor"})


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(E.EncoderError, match="facebook/dinov2-small.*offline.*local folder"):
        E.load_encoder("facebook/dinov2-small")
    with pytest.raises(E.EncoderError, match="not an existing folder"):
        E.load_encoder("no-such-encoder")


# ------------------------------------------------------------------------------------------ preprocessing


def test_preprocessing_matches_a_hand_computation():
    img = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) * 16  # one grayscale 4x4 image
    pp = E.Preprocess(resize=("exact", 2, 2), crop=None, resample=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    out = pp(img).numpy()
    means = np.array([[40.0, 72.0], [168.0, 200.0]])  # box filter: the mean of each 2x2 block (e.g. 0,16,64,80)
    assert out.shape == (1, 3, 2, 2)
    for c, (m, s) in enumerate(zip(pp.mean, pp.std)):  # grayscale repeated to 3 channels, then normalised
        np.testing.assert_allclose(out[0, c], (means / 255 - m) / s, rtol=1e-6)
    # nearest neighbour (source = floor((i + 0.5) * in / out)): the shorter side to 3 (5x10 -> 3x6, aspect kept)
    # takes rows 0, 2, 4 and columns 0, 2, 4, 5, 7, 9; the 2x2 centre crop (top (3-2)//2 = 0, left (6-2)//2 = 2)
    # keeps rows 0, 2 and columns 4, 5
    pp = E.Preprocess(resize=("shortest_edge", 3), crop=(2, 2), resample=0, mean=(0,) * 3, std=(1,) * 3,
                      rescale_factor=1.0)
    x = np.random.default_rng(0).integers(0, 255, (1, 5, 10, 3), dtype=np.uint8)
    assert pp.output_size(5, 10) == (2, 2)
    np.testing.assert_array_equal(pp(x)[0].permute(1, 2, 0).numpy(), x[0][np.ix_([0, 2], [4, 5])].astype(np.float32))


@pytest.mark.parametrize("name", ["clip", "bit", "vit", "siglip", "convnext"])
def test_preprocessing_matches_transformers_pil_processors(name):
    import transformers as T

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref, cfg, shape = {
        "clip": (T.CLIPImageProcessorPil(), {"image_processor_type": "CLIPImageProcessor"}, (28, 28, 1)),
        "bit": (T.BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                       image_mean=mean, image_std=std),
                {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 64},
                 "crop_size": {"height": 56, "width": 56}, "image_mean": mean, "image_std": std}, (90, 70, 3)),
        "vit": (T.ViTImageProcessorPil(), {"feature_extractor_type": "ViTFeatureExtractor", "size": 224}, (28, 28, 3)),
        "siglip": (T.SiglipImageProcessorPil(), {"image_processor_type": "SiglipImageProcessor"}, (50, 40, 3)),
        "convnext": (T.ConvNextImageProcessorPil(size={"shortest_edge": 224}, image_mean=mean, image_std=std),
                     {"feature_extractor_type": "ConvNextFeatureExtractor", "size": 224, "crop_pct": 0.875,
                      "image_mean": mean, "image_std": std}, (28, 28, 3)),
    }[name]
    imgs = np.random.default_rng(1).integers(0, 256, size=(2, *shape), dtype=np.uint8)
    want = np.stack([ref(images=np.repeat(im, 3, -1) if shape[-1] == 1 else im, return_tensors="np")["pixel_values"][0]
                     for im in imgs])
    pp = E.Preprocess.from_config(cfg)
    got = pp(imgs).numpy()
    assert got.shape == want.shape and pp.output_size(*shape[:2]) == want.shape[-2:]
    diff = np.abs(got - want)
    assert diff.max() <= 1.01 / 255 / min(pp.std)  # at most one grey level (PIL's fixed-point rounding)
    assert (diff > 1e-4).mean() < 1e-3


# ------------------------------------------------------------------------------------------ cache keys, resume


def test_cache_key_and_resume(tiny, digits, tmp_path):
    enc = E.load_encoder(tiny["clip"])
    cfg = _cfg(tiny["clip"], split="train", max_images=40, batch_size=16)
    store = E.extract_encoder_features(cfg, enc, digits, progress=False)
    ref = np.array(store.array("patch", -1))

    def boom(*a, **k):
        raise AssertionError("a complete store must not be recomputed")

    real = enc.features
    enc.features = boom
    assert E.extract_encoder_features(cfg, enc, digits, progress=False).path == store.path
    enc.features = real
    # a damaged chunk is found by its checksum and only it is recomputed
    arr = np.load(store.path / "patch@t-1.npy", mmap_mode="r+")
    arr[20] = 0
    arr.flush()
    del arr
    with pytest.warns(UserWarning, match="checksums"):
        again = E.extract_encoder_features(cfg, enc, digits, progress=False)
    np.testing.assert_array_equal(again.array("patch", -1), ref)
    # the key: the encoder's weights, its preprocessing and the dataset rows change it
    idx = store.indices
    key = artifacts.encoder_store_dir(cfg, enc, digits, idx)
    assert key == store.path
    other_w = E.load_encoder(E.save_tiny_random(tmp_path / "clip-seed1", "clip", seed=1))
    pp_dir = shutil.copytree(tiny["clip"], tmp_path / "clip-pp")
    pp = json.loads((pp_dir / "preprocessor_config.json").read_text())
    (pp_dir / "preprocessor_config.json").write_text(json.dumps({**pp, "image_mean": [0.5, 0.5, 0.5]}))
    other_pp = E.load_encoder(pp_dir)
    assert other_pp.weights_hash == enc.weights_hash
    keys = {artifacts.encoder_store_dir(_cfg(e.encoder_id, split="train", max_images=40, batch_size=16), e, digits, idx).name
            for e in (other_w, other_pp)}
    assert len(keys | {key.name}) == 3
    assert artifacts.encoder_store_dir(cfg, enc, digits, idx[:-1]) != key
    from revelio_nb.data import ImageDataset

    flipped = ImageDataset(digits.name, digits.images[:, :, ::-1].copy(), digits.labels, digits.class_names,
                           digits.splits, digits.split_seed)
    assert artifacts.encoder_store_dir(cfg, enc, flipped, idx) != key  # same name, other pixels
    assert store.manifest["key"] == key.name.rsplit("-", 1)[1]
    with pytest.raises(StoreMismatchError, match="another encoder, preprocessing or dataset rows"):
        E.extract_encoder_features(cfg, enc, flipped, out_dir=store.path, progress=False)  # same config, other rows
