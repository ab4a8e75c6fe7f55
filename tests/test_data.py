import pickle

import numpy as np
import pytest

from revelio_nb import data


def test_animal_mnist_is_real_and_split(animals):
    assert animals.images.shape == (10000, 28, 28, 1) and animals.images.dtype == np.uint8
    assert animals.class_names[0] == "bear" and len(animals.class_names) == 10
    assert np.bincount(animals.labels).tolist() == [1000] * 10
    tr, va, te = (animals.split(s) for s in ("train", "val", "test"))
    assert len(tr) == 7000 and len(va) == 1000 and len(te) == 2000
    assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
    for idx in (tr, va, te):  # stratified: every class in proportion
        counts = np.bincount(animals.labels[idx], minlength=10)
        assert counts.max() - counts.min() == 0
    again = data.load_dataset("animal-mnist")
    assert all(np.array_equal(again.split(s), animals.split(s)) for s in ("train", "val", "test"))
    other = data.load_dataset("animal-mnist", split_seed=1)
    assert not np.array_equal(other.split("train"), animals.split("train"))


def test_tensor_pads_to_32_in_range(animals):
    x = animals.tensor([0, 1, 2], size=32)
    assert x.shape == (3, 1, 32, 32)
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    assert float(x[0, 0, :2].max()) == -1.0  # the 2-pixel pad is black
    assert animals.tensor([0], size=32, channels=3).shape == (1, 3, 32, 32)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_code():
    ok = pickle.dumps(np.arange(5))
    assert data.safe_load_numpy_pickle(ok).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        data.safe_load_numpy_pickle(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="expected a numpy array"):
        data.safe_load_numpy_pickle(pickle.dumps([1, 2]))


def test_digits_and_subset():
    d = data.load_dataset("digits")
    assert d.images.shape[1:] == (8, 8, 1) and len(d.class_names) == 10
    sub = data.load_dataset("animal-mnist", classes=[5, 7])
    assert sub.class_names == ["elephant", "horse"] and set(np.unique(sub.labels)) == {0, 1}
    assert len(sub) == 2000 and len(sub.split("test")) == 400
    with pytest.raises(data.DatasetError, match="valid ids 0..9"):
        data.load_dataset("animal-mnist", classes=[12])


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = data.load_dataset(str(tmp_path))
    assert d.class_names == ["cats", "dogs"] and d.images.shape == (20, 12, 12, 3)
    assert sum(len(d.split(s)) for s in ("train", "val", "test")) == 20
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no class sub-folders"):
        data.load_dataset(str(tmp_path / "empty"))


def test_hub_dataset_offline_names_embedded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DatasetError, match="animal-mnist"):
        data.load_dataset("hf:cifar10")


def test_bad_split_and_empty_split(animals):
    with pytest.raises(data.DatasetError, match="valid: \\['test', 'train', 'val'\\]"):
        animals.split("validation")
    tiny = data.ImageDataset("t", np.zeros((3, 4, 4), np.uint8), np.array([0, 1, 2]), ["a", "b", "c"],
                             data.stratified_splits(np.array([0, 1, 2])))
    with pytest.raises(data.DatasetError, match="empty"):
        tiny.split("val")
