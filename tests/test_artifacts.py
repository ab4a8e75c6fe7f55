"""Cache keys that never serve a stale result (issue 12, section 3).

Each key is exactly "everything that changes the numbers", computed in :mod:`revelio_nb.artifacts`: change one
such input and the key (the cache folder) changes; change a harmless field (device, checkpoint cadence, labels,
descriptions, the dataset's display name) and the cached result is reused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from revelio_nb import artifacts, models
from revelio_nb import features as F
from revelio_nb import hookpoint_saes as hp
from revelio_nb import sae
from revelio_nb.data import ImageDataset, load_dataset
from revelio_nb.directions import SampleConfig


@pytest.fixture(scope="module")
def unet(tiny_unet_path):
    return models.load_model(tiny_unet_path)


@pytest.fixture(scope="module")
def other_scheduler(tiny_unet_path, tmp_path_factory):
    """The same weights under the same id, with another noise schedule (linear betas instead of cosine)."""
    folder = tmp_path_factory.mktemp("other-scheduler") / "m"
    shutil.copytree(tiny_unet_path, folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["beta_schedule"] == "squaredcos_cap_v2"
    cfg_file.write_text(json.dumps({**cfg, "beta_schedule": "linear"}))
    return models.load_from_folder(folder, model_id=str(tiny_unet_path))


def config(path, **kw) -> F.ExtractionConfig:
    base = dict(model=str(path), dataset="animal-mnist", split="test", blocks=["mid_block"], timesteps=[200],
                max_images=16, batch_size=8)
    return F.ExtractionConfig(**{**base, **kw})


def with_images(ds: ImageDataset, images: np.ndarray) -> ImageDataset:
    return dataclasses.replace(ds, images=images)


# ------------------------------------------------------------------------------------------ datasets


def test_dataset_fingerprint_covers_content_labels_names_and_split(animals):
    fp = animals.fingerprint
    assert fp == load_dataset("animal-mnist").fingerprint  # a fresh load of the same data
    assert fp == dataclasses.replace(animals, name="renamed").fingerprint  # the display name is harmless
    images = animals.images.copy()
    images[123, 5, 5, 0] ^= 1  # one bit of one pixel
    labels = animals.labels.copy()
    labels[0] = (labels[0] + 1) % len(animals.class_names)
    assert len({fp, with_images(animals, images).fingerprint,
                dataclasses.replace(animals, labels=labels).fingerprint,
                dataclasses.replace(animals, class_names=list(reversed(animals.class_names))).fingerprint,
                load_dataset("animal-mnist", split_seed=1).fingerprint,
                load_dataset("animal-mnist", classes=[0, 1]).fingerprint,
                load_dataset("animal-mnist", split_fractions=(0.6, 0.2, 0.2)).fingerprint}) == 7
    ds = copy.copy(animals)
    ds.images = images  # replacing an array (not editing it in place) is noticed despite the cache
    assert ds.fingerprint == with_images(animals, images).fingerprint != fp


# ------------------------------------------------------------------------------------------ feature stores


def test_store_key_covers_dataset_content_split_subset_and_scheduler(unet, other_scheduler, animals,
                                                                     tiny_unet_path):
    c = config(tiny_unet_path)
    key = artifacts.store_key(c, unet, animals)
    images = animals.images.copy()
    images[animals.split("test")[0]] = 255 - images[animals.split("test")[0]]
    changed = {
        "pixels": artifacts.store_key(c, unet, with_images(animals, images)),
        "split seed": artifacts.store_key(c, unet, load_dataset("animal-mnist", split_seed=3)),
        "class subset object": artifacts.store_key(c, unet, load_dataset("animal-mnist", classes=[2, 3, 4])),
        "scheduler": artifacts.store_key(c, other_scheduler, animals),
        "seed": artifacts.store_key(config(tiny_unet_path, seed=1), unet, animals),
        "timesteps": artifacts.store_key(config(tiny_unet_path, timesteps=[201]), unet, animals),
    }
    assert len(set(changed.values()) | {key}) == len(changed) + 1, changed
    assert artifacts.store_key(config(tiny_unet_path, device="cpu"), unet, animals) == key  # harmless
    assert artifacts.store_key(c, unet, load_dataset("animal-mnist")) == key  # same content, new object
    assert F.default_store_dir(c, unet, animals).name.endswith(key)


def test_cached_store_is_not_served_for_other_data_or_schedule(unet, other_scheduler, animals, tiny_unet_path,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("REVELIO_CACHE", str(tmp_path / "cache"))
    c = config(tiny_unet_path)
    ref = F.extract_features(c, unet, animals, progress=False)
    again = F.extract_features(config(tiny_unet_path, device="cpu"), unet, load_dataset("animal-mnist"),
                               progress=False)
    assert again.path == ref.path  # harmless changes reuse the store

    images = animals.images.copy()
    images[ref.indices] = 255 - images[ref.indices]  # the very images of the store, inverted
    inverted = F.extract_features(c, unet, with_images(animals, images), progress=False)
    rescheduled = F.extract_features(c, other_scheduler, animals, progress=False)
    assert len({ref.path, inverted.path, rescheduled.path}) == 3
    for other in (inverted, rescheduled):
        assert not np.allclose(other.array("mid_block", 200), ref.array("mid_block", 200))

    # an explicit out_dir holding a store of other images is refused, not served
    with pytest.raises(F.StoreMismatchError, match="another dataset content .* dataset fingerprint"):
        F.extract_features(c, unet, with_images(animals, images), out_dir=ref.path, progress=False)
    assert F.FeatureStore.open(ref.path).manifest["key"] == artifacts.store_key(c, unet, animals)


# ------------------------------------------------------------------------------------------ k-SAEs


def small_run(path, **sae_kw) -> hp.HookpointRun:
    cfg = sae.TrainConfig(sae=sae.SaeConfig(k=4, expansion_factor=2), epochs=3, batch_size=32, **sae_kw)
    return hp.HookpointRun(model=str(path), store_blocks=["mid_block", "up_blocks.0"], store_timesteps=[10, 100],
                           pooling="mean", max_images=40, sae=cfg, top_n=4)


def test_sae_key_is_the_training_that_matters_and_the_store_identity(tiny_unet_path):
    row = hp.train_hookpoint(small_run(tiny_unet_path), "mid_block", 10, progress=False)
    weights = os.path.join(row["sae_dir"], "sae.safetensors")
    before = os.stat(weights).st_mtime_ns
    # device and checkpoint cadence do not change the weights: the same SAE folder, not retrained
    same = hp.train_hookpoint(small_run(tiny_unet_path, device="cpu", checkpoint_every=7), "mid_block", 10,
                              progress=False)
    assert same["sae_dir"] == row["sae_dir"] and os.stat(weights).st_mtime_ns == before
    assert same["latents_dir"] == row["latents_dir"]

    store = F.FeatureStore.open(row["store_dir"])  # (the eval store: any store works for the key's arithmetic)
    base = small_run(tiny_unet_path).sae
    key = artifacts.sae_key(base, store, "mid_block", 10)
    labelled = copy.deepcopy(base)
    labelled.sae.hookpoint, labelled.sae.timestep, labelled.sae.model_id = "x", 3, "y"  # cfg.json labels
    assert artifacts.sae_key(labelled, store, "mid_block", 10) == key
    other_store = copy.copy(store)
    other_store.manifest = {**store.manifest, "key": "another-store"}
    changed = [artifacts.sae_key(dataclasses.replace(base, sae=dataclasses.replace(base.sae, k=3)), store,
                                 "mid_block", 10),
               artifacts.sae_key(dataclasses.replace(base, lr=1e-3), store, "mid_block", 10),
               artifacts.sae_key(dataclasses.replace(base, seed=1), store, "mid_block", 10),
               artifacts.sae_key(base, store, "mid_block", 100),
               artifacts.sae_key(base, other_store, "mid_block", 10)]
    assert len(set(changed) | {key}) == len(changed) + 1


def test_sae_resume_on_other_features_of_the_same_shape_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    cfg = sae.TrainConfig(sae=sae.SaeConfig(k=4, expansion_factor=2), steps=40, batch_size=64, checkpoint_every=10,
                          device="cpu")
    sae.train_sae(x, cfg, tmp_path / "run", stop_after=20, progress=False)
    y = x.copy()
    y[300, 7] += 1.0  # one value of one row
    with pytest.raises(sae.SaeError, match="another config or other features"):
        sae.train_sae(y, cfg, tmp_path / "run", progress=False)
    # the same features from a memory-mapped file, another device string and checkpoint cadence: resumed
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert sae.ArraySource(mm).fingerprint() == sae.ArraySource(x).fingerprint()
    done = sae.train_sae(mm, dataclasses.replace(cfg, device="auto", checkpoint_every=5), tmp_path / "run",
                         progress=False)
    assert sae.checkpoint_metadata(tmp_path / "run")["step"] == "40" and done.num_latents == 32


# ------------------------------------------------------------------------------------------ prompt latents, browser


def test_prompt_h_key_follows_the_model_identity(unet, other_scheduler):
    cfg, prompts = SampleConfig(steps=4, n_seeds=2), ["a cat", "a dog"]
    folder = artifacts.prompt_h_dir(unet, prompts, cfg, False)
    assert folder.parent.name == "directions" and folder.name.startswith("latents-")
    assert artifacts.prompt_h_dir(unet, prompts, dataclasses.replace(cfg, h_condition="neutral"), False) \
        == folder  # one sampling run records both passes
    assert artifacts.prompt_h_dir(copy.copy(unet), list(prompts), SampleConfig(steps=4, n_seeds=2), False) \
        == folder
    other_weights = dataclasses.replace(unet, weights_hash="0" * 16)
    changed = [artifacts.prompt_h_dir(other_scheduler, prompts, cfg, False),
               artifacts.prompt_h_dir(other_weights, prompts, cfg, False),
               artifacts.prompt_h_dir(unet, prompts[:1], cfg, False),
               artifacts.prompt_h_dir(unet, prompts, dataclasses.replace(cfg, steps=5), False),
               artifacts.prompt_h_dir(unet, prompts, cfg, True)]
    assert len(set(changed) | {folder}) == len(changed) + 1


def test_browser_cache_keys(tmp_path):
    store = F.FeatureStore(tmp_path, {"key": "k1", "config": {}})
    key = artifacts.embedding_cache_key(store, "mid_block", 10, "pca", 0, 5000)
    assert artifacts.embedding_cache_key(store, "mid_block", 10, "pca", 0, 100) == key  # PCA uses every image
    other = F.FeatureStore(tmp_path, {"key": "k2", "config": {}})
    changed = [artifacts.embedding_cache_key(other, "mid_block", 10, "pca", 0, 5000),
               artifacts.embedding_cache_key(store, "mid_block", 11, "pca", 0, 5000),
               artifacts.embedding_cache_key(store, "mid_block", 10, "pca", 1, 5000),
               artifacts.embedding_cache_key(store, "mid_block", 10, "tsne", 0, 5000),
               artifacts.embedding_cache_key(store, "mid_block", 10, "tsne", 0, 100)]
    assert len(set(changed) | {key}) == len(changed) + 1


# ------------------------------------------------------------------------------------------ embedded models


def test_embedded_model_folder_changes_with_training_not_with_description(monkeypatch):
    _, folder = models.embedded_folder("animals-unet")
    assert models.embedded_folder("animals-unet", train_steps=10)[1] != folder
    spec = copy.deepcopy(models.EMBEDDED_MODELS["animals-unet"])
    spec.description = "another description"
    spec.train.checkpoint_every, spec.train.num_threads = 7, 3
    monkeypatch.setitem(models.EMBEDDED_MODELS, "animals-unet", spec)
    assert models.embedded_folder("animals-unet")[1] == folder
    spec = copy.deepcopy(spec)
    spec.train.lr *= 2
    monkeypatch.setitem(models.EMBEDDED_MODELS, "animals-unet", spec)
    assert models.embedded_folder("animals-unet")[1] != folder
