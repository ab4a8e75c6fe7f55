"""Image datasets with fixed, seeded, stratified train/val/test splits.

One call, :func:`load_dataset`, serves every source:

* ``"animal-mnist"`` (embedded default): 10k real 28x28 animal silhouettes shipped in the PyPI package
  ``animal-mnist``. Its files are pickles; we read them with a restricted unpickler that only admits numpy
  array reconstruction, so no arbitrary code can run.
* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images).
* ``"hf:<name>"`` or any other name: a Hugging Face ``datasets`` dataset (needs the network or a local copy).
* a local folder with one sub-folder of images per class.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset_errors import DatasetError, DatasetWarning
from .image_folders import DEFAULT_BACKGROUND, images_to_array, load_image_folder, to_l_or_rgb

EMBEDDED_DATASETS = ("animal-mnist", "digits")
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ImageDataset:
    """Images with labels and fixed splits.

    ``images`` is uint8 (N, H, W, C) with C in {1, 3}; ``splits[name]`` holds sorted indices into ``images``.
    Row ``i`` of any feature store built on split ``s`` is image ``splits[s][i]``.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.images.ndim == 3:
            self.images = self.images[..., None]
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise DatasetError(f"images must be (N, H, W, 1|3), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def fingerprint(self) -> str:
        """Content hash of everything in the dataset that changes a result computed on it: the image bytes (and
        their shape), the labels, the class names and the split (seed and assignment); not its display name.

        sha256, about 0.1 s for 70k 28x28 images; cached on the object (recomputed when ``images``, ``labels``,
        ``splits``, ``class_names`` or ``split_seed`` are replaced, not when an array is edited in place).
        """
        arrays = (self.images, self.labels, *self.splits.values())
        token = (tuple((id(a), a.__array_interface__["data"][0], a.shape) for a in arrays), tuple(self.splits),
                 tuple(self.class_names), self.split_seed)
        cached = self.__dict__.get("_fingerprint")
        if cached is not None and cached[0] == token:
            return cached[1]
        h = hashlib.sha256()
        h.update(json.dumps({"images": [list(self.images.shape), str(self.images.dtype)],
                             "class_names": [str(c) for c in self.class_names], "split_seed": int(self.split_seed),
                             "splits": {k: len(v) for k, v in sorted(self.splits.items())}}).encode())
        for start in range(0, len(self.images), 4096):  # in row blocks: no copy of the whole array
            h.update(np.ascontiguousarray(self.images[start:start + 4096]).view(np.uint8).reshape(-1))
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        for name in sorted(self.splits):
            h.update(name.encode() + b"\0" + np.ascontiguousarray(self.splits[name], dtype=np.int64).tobytes())
        fingerprint = h.hexdigest()[:16]
        self.__dict__["_fingerprint"] = (token, fingerprint)
        return fingerprint

    def split(self, name: str) -> np.ndarray:
        """Indices of one split; unknown names and empty splits are clear errors."""
        if name not in self.splits:
            raise DatasetError(f"unknown split {name!r} for dataset {self.name!r}; valid: {sorted(self.splits)}")
        idx = self.splits[name]
        if len(idx) == 0:
            raise DatasetError(f"split {name!r} of dataset {self.name!r} is empty")
        return idx

    def tensor(self, indices, size: int | None = None, channels: int | None = None) -> torch.Tensor:
        """Float tensor (B, C, size, size) in [-1, 1] for the given dataset indices.

        Images smaller than ``size`` are zero-padded (black border, e.g. 28 -> 32 as in MNIST diffusion work);
        larger ones are resized (bilinear, antialiased) after a centre square crop.
        ``channels`` (the model's): grayscale images are repeated to RGB, RGB images averaged to grayscale, each
        with a :class:`DatasetWarning` note; any other pair is a :class:`DatasetError`.
        """
        if channels is not None and channels not in (1, 3):
            raise DatasetError(f"cannot feed images of dataset {self.name!r} to a model taking {channels} image "
                               "channels: only 1 (grayscale) and 3 (RGB) are supported")
        x = torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(indices)])).permute(0, 3, 1, 2).float()
        x = x / 127.5 - 1.0
        if channels is not None and channels != x.shape[1]:
            import warnings

            how = "repeated to 3 channels" if channels == 3 else "averaged to 1 channel"
            warnings.warn(f"dataset {self.name!r} has {x.shape[1]}-channel images and the model takes {channels}: "
                          f"images {how}", DatasetWarning, stacklevel=2)
            x = x.expand(-1, 3, -1, -1) if channels == 3 else x.mean(1, keepdim=True)
        return resize_square(x, size) if size is not None else x

    def subset_classes(self, classes: list[int], name: str | None = None) -> "ImageDataset":
        """A dataset restricted to some classes (labels re-numbered 0..len(classes)-1, splits kept)."""
        keep = np.isin(self.labels, classes)
        old_to_new = -np.ones(len(self.images), dtype=np.int64)
        old_to_new[np.where(keep)[0]] = np.arange(int(keep.sum()))
        remap = {c: i for i, c in enumerate(classes)}
        labels = np.array([remap[int(c)] for c in self.labels[keep]], dtype=np.int64)
        splits = {s: old_to_new[idx[keep[idx]]] for s, idx in self.splits.items()}
        return ImageDataset(
            name=name or f"{self.name}[{','.join(map(str, classes))}]",
            images=self.images[keep],
            labels=labels,
            class_names=[self.class_names[c] for c in classes],
            splits=splits,
            split_seed=self.split_seed,
        )


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (if smaller, value -1 = black) or centre-crop + resize (if larger) a batch to size x size."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top : top + side, left : left + side]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def stratified_splits(
    labels: np.ndarray, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded stratified split: each class is shuffled and cut by ``fractions`` (train, val, test)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        out["train"].append(idx[:n_train])
        out["val"].append(idx[n_train : n_train + n_val])
        out["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(v)).astype(np.int64) for s, v in out.items()}


# ---------------------------------------------------------------------------------------------- loaders


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what numpy needs to rebuild plain arrays; anything else is refused before it runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; both spellings load the same function
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def safe_load_numpy_pickle(raw: bytes) -> np.ndarray:
    """Load a pickled numpy array, refusing any other object (no arbitrary code execution)."""
    obj = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"expected a numpy array, got {type(obj).__name__}")
    return obj


def _animal_mnist_dir() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("animal_mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the embedded dataset 'animal-mnist' needs the PyPI package animal-mnist: "
            "pip install --no-deps animal-mnist==0.4 (make venv does this)"
        )
    # Locate files without importing the package (its __init__ imports TensorFlow loaders we do not use).
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def _load_animal_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    folder = _animal_mnist_dir()
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = safe_load_numpy_pickle(f.read())
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = safe_load_numpy_pickle(f.read())
    return images.astype(np.uint8), labels.astype(np.int64), list(ANIMAL_CLASSES)


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images / 16.0 * 255.0, 0, 255).round().astype(np.uint8)  # 0..16 -> 0..255
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def min_images_per_class(fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> int:
    """The fewest images a class needs so that :func:`stratified_splits` gives it at least one image in every split
    with a non-zero fraction (6 for the default 0.7 / 0.1 / 0.2)."""
    for n in range(1, 10_000):
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        counts = (n_train, n_val, n - n_train - n_val)
        if all(c >= 1 for c, f in zip(counts, fractions) if f > 0):
            return n
    raise DatasetError(f"split fractions {fractions} leave some split empty for any class size")


def _check_class_sizes(labels: np.ndarray, class_names: list[str], fractions, key: str) -> None:
    """User data (folders, hub datasets): every class needs an image in every split, or the error says which."""
    need = min_images_per_class(fractions)
    counts = np.bincount(labels, minlength=len(class_names))
    small = {class_names[c]: int(counts[c]) for c in range(len(class_names)) if counts[c] < need}
    if small:
        raise DatasetError(
            f"dataset {key!r}: classes {small} (name: images) have fewer than {need} images, the minimum for a "
            f"stratified train/val/test split with fractions {tuple(fractions)} (each class needs an image in every "
            "split). Add images, remove those class folders, or pass split_fractions (e.g. (0.8, 0.0, 0.2) needs "
            f"{min_images_per_class((0.8, 0.0, 0.2))})."
        )


def _load_hf(name: str, image_column: str | None, label_column: str | None, max_images: int | None,
             image_size: int | None = None, background: tuple[int, int, int] = DEFAULT_BACKGROUND):
    from .optional import require

    datasets = require("datasets")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, auth ...
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {str(e)[:200]}). "
            f"Offline? The embedded datasets work without a network: {list(EMBEDDED_DATASETS)}, "
            "or pass a local folder with one sub-folder of images per class."
        ) from e
    cols = ds.column_names
    image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in cols), None)
    label_column = label_column or next((c for c in ("label", "labels", "fine_label") if c in cols), None)
    if image_column is None or label_column is None:
        raise DatasetError(f"dataset {name!r} columns {cols}: pass image_column= and label_column=")
    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    feat = ds.features[label_column]
    class_names = list(getattr(feat, "names", None) or sorted({str(v) for v in ds[label_column]}))
    decoded = [to_l_or_rgb(im, background)[0] for im in ds[image_column]]  # same modes and sizes as folders
    images, _, _ = images_to_array(decoded, image_size)
    labels = np.asarray(ds[label_column], dtype=np.int64)
    return images, labels, class_names


def load_dataset(
    name: str = "animal-mnist",
    *,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    split_seed: int = 0,
    classes: list[int] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_images: int | None = None,
    image_size: int | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> ImageDataset:
    """Load a dataset by name with fixed stratified splits.

    ``name``: ``"animal-mnist"`` | ``"digits"`` | a local class-per-subfolder image folder |
    ``"hf:<hub name>"`` (or any other string, tried on the Hugging Face hub); ``"<name>+facing"``: that dataset
    with a planted class-facing association (:func:`revelio_nb.captions.plant_facing`, the text model's data).
    ``classes`` keeps only those class ids (re-numbered), after splitting, so splits stay the same images.

    Folders and hub datasets (user data): images are stored at ``image_size`` x ``image_size``, each resized by
    its shorter side and centre-cropped (default: the most common shorter side, at most
    :data:`revelio_nb.image_folders.FOLDER_MAX_IMAGE_SIZE`); transparency is composited on ``background`` (RGB, default white); 16-bit
    images are rescaled. What a folder load skipped or converted is listed in one :class:`DatasetWarning` (see
    :func:`revelio_nb.image_folders.load_image_folder`). Every class needs :func:`min_images_per_class` images (6 for the default
    fractions), else a :class:`DatasetError` names the classes. ``max_images`` caps a hub dataset's rows.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise DatasetError(f"dataset name must be a non-empty string, got {name!r}; embedded: {list(EMBEDDED_DATASETS)}")
    for arg, value in (("image_size", image_size), ("max_images", max_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DatasetError(f"{arg} must be None or a positive integer, got {value!r}")
    if len(tuple(background)) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in background):
        raise DatasetError(f"background must be an RGB triple of integers 0..255, got {background!r}")
    key = str(name)
    base, plus, plant = key.rpartition("+")
    if plus and base and not Path(key).expanduser().exists():  # "<dataset>+<plant>": a planted association
        from .captions import PLANTS

        if plant not in PLANTS:
            raise DatasetError(f"unknown planted variant {plant!r} in dataset {key!r}; valid: "
                               f"{[f'{base}+{p}' for p in PLANTS]}")
        ds = PLANTS[plant](load_dataset(base, split_fractions=split_fractions, split_seed=split_seed,
                                        image_column=image_column, label_column=label_column, max_images=max_images,
                                        image_size=image_size, background=tuple(background)))
        return _subset(ds, classes, key)
    user_data = True
    if key in EMBEDDED_DATASETS:
        if image_size is not None:
            raise DatasetError(f"image_size={image_size} applies to image folders and hub datasets; the embedded "
                               f"dataset {key!r} keeps its native size (ImageDataset.tensor(size=...) resizes)")
        images, labels, class_names = _load_animal_mnist() if key == "animal-mnist" else _load_digits()
        user_data = False
    elif Path(key).expanduser().is_dir():
        images, labels, class_names = load_image_folder(Path(key).expanduser(), image_size=image_size,
                                                         background=tuple(background))
    elif Path(key).expanduser().exists():
        raise DatasetError(f"{key!r} is a file; a local dataset must be a folder with one sub-folder per class")
    else:
        hub = key[3:] if key.startswith("hf:") else key
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise DatasetError(
                f"dataset {key!r} is neither embedded nor a local folder, and the hub is offline "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1). Embedded choices: {list(EMBEDDED_DATASETS)}"
            )
        images, labels, class_names = _load_hf(hub, image_column, label_column, max_images, image_size,
                                               tuple(background))
    splits = stratified_splits(labels, split_fractions, split_seed)
    if user_data:
        _check_class_sizes(labels, class_names, split_fractions, key)
    return _subset(ImageDataset(key, images, labels, class_names, splits, split_seed), classes, key)


def _subset(ds: ImageDataset, classes: list[int] | None, key: str) -> ImageDataset:
    if classes is None:
        return ds
    bad = [c for c in classes if not 0 <= int(c) < len(ds.class_names)]
    if bad or not classes:
        raise DatasetError(f"classes {classes} invalid for {key!r}: valid ids 0..{len(ds.class_names) - 1} "
                           f"({ds.class_names})")
    return ds.subset_classes([int(c) for c in classes])
