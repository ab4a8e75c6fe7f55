"""What a probe reads and what it returns: :class:`ProbeData` (features and labels of the train / val / test
splits; :func:`probe_data` builds it from feature stores) and :class:`ProbeResult` (what was selected on validation
and the single test evaluation after it); :class:`ProbeError` for bad probe input or configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..features import FeatureStore
from ..pooling import FLAT, MEAN, PROBE_POOLINGS, check_pooling


SPLITS = ("train", "val", "test")


class ProbeError(ValueError):
    """Bad probe input or configuration."""


# ------------------------------------------------------------------------------------------ data


@dataclass
class ProbeData:
    """Features and labels of the train / val / test splits for one probe.

    ``x_*`` are (N, D) vectors or (N, C, h, w) maps (numpy arrays or read-only memmaps of a feature store).
    ``pool`` says how the linear probe turns maps into vectors (:mod:`revelio_nb.pooling`): ``MEAN`` (``"mean"``,
    the spatial average, Revelio's image-level vector) or ``FLAT`` (``"flat"``, the map flattened, e.g. raw pixels).
    The test arrays are optional.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    name: str = ""
    pool: str = MEAN
    n_classes: int | None = None

    def __post_init__(self) -> None:
        check_pooling(self.pool, PROBE_POOLINGS, "pool", error=ProbeError)
        pairs = [("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val)]
        if self.x_test is not None or self.y_test is not None:
            if self.x_test is None or self.y_test is None:
                raise ProbeError("give both x_test and y_test, or neither")
            pairs.append(("test", self.x_test, self.y_test))
        for split, x, y in pairs:
            if len(x) != len(y):
                raise ProbeError(f"{split}: {len(x)} feature rows but {len(y)} labels")
            if len(x) == 0:
                raise ProbeError(f"{split} split is empty")
            if x.ndim not in (2, 4):
                raise ProbeError(f"{split} features must be (N, D) or (N, C, h, w), got shape {tuple(x.shape)}")
            if x.shape[1:] != self.x_train.shape[1:]:
                raise ProbeError(f"{split} features {tuple(x.shape[1:])} differ from train {tuple(self.x_train.shape[1:])}")
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_val = np.asarray(self.y_val, dtype=np.int64)
        if self.y_test is not None:
            self.y_test = np.asarray(self.y_test, dtype=np.int64)
        seen = int(max(self.y_train.max(), self.y_val.max())) + 1
        self.n_classes = max(int(self.n_classes or 0), seen)

    @property
    def spatial(self) -> bool:
        return self.x_train.ndim == 4

    @property
    def has_test(self) -> bool:
        return self.x_test is not None

    def vectors(self, split: str) -> np.ndarray:
        """(N, D) float32 vectors of a split (maps are averaged or flattened according to ``pool``)."""
        x = {"train": self.x_train, "val": self.x_val, "test": self.x_test}[split]
        if x is None:
            raise ProbeError(f"this ProbeData has no {split} split")
        if x.ndim == 2:
            return np.asarray(x, dtype=np.float32)
        if self.pool == FLAT:
            return np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        out = np.empty((len(x), x.shape[1]), dtype=np.float32)
        for i in range(0, len(x), 1024):  # chunked: memmapped maps need not fit in memory at once
            out[i : i + 1024] = np.asarray(x[i : i + 1024], dtype=np.float32).mean(axis=(2, 3))
        return out

    def sizes(self) -> dict[str, int]:
        return {"n_train": len(self.y_train), "n_val": len(self.y_val),
                "n_test": len(self.y_test) if self.y_test is not None else 0}


def probe_data(stores: dict[str, FeatureStore], cells: tuple[str, int] | Sequence[tuple[str, int]],
               name: str | None = None) -> ProbeData:
    """ProbeData from feature stores of the train / val / test splits (``{"train": store, ...}``).

    ``cells`` is one ``(block, t)`` or a list of them; several cells are concatenated along the feature axis
    (pooled vectors, or maps of the same spatial size).
    """
    missing = [s for s in ("train", "val") if s not in stores]
    if missing:
        raise ProbeError(f"probe_data needs stores for train and val (test optional); missing {missing}")
    cells = [cells] if isinstance(cells, tuple) and len(cells) == 2 and isinstance(cells[0], str) else list(cells)
    if not cells:
        raise ProbeError("no (block, t) cells given")

    def get(split):
        if split not in stores:
            return None, None
        st = stores[split]
        arrs = [st.array(b, int(t)) for b, t in cells]
        if len(arrs) == 1:
            return arrs[0], st.labels
        if any(a.shape[2:] != arrs[0].shape[2:] for a in arrs):
            raise ProbeError(f"cannot concatenate cells {cells}: shapes {[a.shape[1:] for a in arrs]} differ in space")
        return np.concatenate([np.asarray(a, dtype=np.float32) for a in arrs], axis=1), st.labels

    xtr, ytr = get("train")
    xva, yva = get("val")
    xte, yte = get("test")
    n_classes = len(stores["train"].class_names)
    label = name or "+".join(f"{b}@t{t}" for b, t in cells)
    return ProbeData(xtr, ytr, xva, yva, xte, yte, name=label, n_classes=n_classes)


# ------------------------------------------------------------------------------------------ results


@dataclass
class ProbeResult:
    """One fitted probe: what was selected on validation and the single test evaluation after it."""

    method: str
    features: str
    val_acc: float
    test_acc: float | None
    selected: dict[str, Any]
    seed: int
    seconds: float
    n_train: int
    n_val: int
    n_test: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def row(self, **extra: Any) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("history", "selected")}
        d.update({f"sel_{k}": v for k, v in self.selected.items()})
        d.update(extra)
        return d


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean())
