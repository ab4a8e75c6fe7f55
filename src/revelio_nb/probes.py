"""Probes on frozen diffusion features (Revelio, METHODS.md section 1) and the baselines they are judged against.

* :func:`fit_linear_probe`: multinomial logistic regression on standardised pooled features; the inverse
  regularisation ``C`` is chosen on the validation split, then the test split is evaluated once.
* :class:`DiffC` / :func:`train_diffc`: the light conv classifier on spatial maps (batch-norm without affine,
  four 3x3 convs with stride-2 downsampling, global average pooling, linear head; AdamW; early stopping on the
  validation split; the best-on-validation weights are evaluated once on test).
* Baselines on the same splits: :func:`pixel_probe_data` (raw pixels, for a logistic regression and for the
  supervised CNN = the Diff-C architecture trained from scratch on pixels) and :func:`random_init_model` (the
  same denoiser architecture with seeded random weights and no training: what training added).
* Experiments: :func:`linear_sweep` (every block x timestep), :func:`probe_cells` (linear + Diff-C over seeds at
  chosen cells), :func:`compare_models` (the paper's architecture / data / conditioning comparisons),
  :func:`summarize`, :func:`sweep_heatmap`, :func:`results_markdown`.

Seeds: with ``vary_noise=True`` (the default of :func:`probe_cells`) seed ``s`` draws the noise of the feature
extraction (``ExtractionConfig.seed``) *and* the classifier's initialisation and batch order, so mean +- std
over seeds measures both sources of run-to-run variation; the linear probe is convex (deterministic given the
features), so its spread comes from the noise draws alone. With ``vary_noise=False`` the features come from one
noise draw, only Diff-C's seed varies, and the linear probe is fitted once (std 0, ``n_seeds`` 1).
Selection (``C``, early-stopping epoch, best block/timestep) only ever reads the validation split.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ImageDataset, load_dataset
from .features import ExtractionConfig, FeatureStore, extract_features, stratified_subset
from .models import DiffusionModel, load_model

SPLITS = ("train", "val", "test")
POOLS = ("mean", "flatten")


class ProbeError(ValueError):
    """Bad probe input or configuration."""


# ------------------------------------------------------------------------------------------ data


@dataclass
class ProbeData:
    """Features and labels of the train / val / test splits for one probe.

    ``x_*`` are (N, D) vectors or (N, C, h, w) maps (numpy arrays or read-only memmaps of a feature store).
    ``pool`` says how the linear probe turns maps into vectors: ``"mean"`` (spatial average, Revelio's
    image-level vector) or ``"flatten"`` (raw pixels). The test arrays are optional.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    name: str = ""
    pool: str = "mean"
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ProbeError(f"pool {self.pool!r} is not one of {list(POOLS)}")
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
        if self.pool == "flatten":
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


def pixel_probe_data(dataset: ImageDataset, size: int = 32, max_images: int | None = None, seed: int = 0,
                     channels: int | None = None) -> ProbeData:
    """Raw pixels in [-1, 1] (N, C, size, size) of the dataset's three splits (same images a feature store sees).

    ``max_images`` takes the same seeded stratified subset of each split as :class:`ExtractionConfig` does.
    """
    xs, ys = {}, {}
    for s in SPLITS:
        idx = dataset.split(s)
        if max_images is not None:
            idx = stratified_subset(idx, dataset.labels[idx], max_images, seed)
        xs[s] = dataset.tensor(idx, size=size, channels=channels).numpy()
        ys[s] = dataset.labels[idx]
    return ProbeData(xs["train"], ys["train"], xs["val"], ys["val"], xs["test"], ys["test"],
                     name=f"pixels {size}x{size}", pool="flatten", n_classes=len(dataset.class_names))


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


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean())


# ------------------------------------------------------------------------------------------ linear probe


@dataclass
class LinearProbeConfig:
    """Logistic regression on standardised vectors; ``C`` (inverse L2 strength) chosen on validation."""

    Cs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    max_iter: int = 300
    tol: float = 1e-4
    standardize: bool = True
    seed: int = 0

    def validate(self) -> "LinearProbeConfig":
        if isinstance(self.Cs, (int, float)):
            self.Cs = [float(self.Cs)]
        if not self.Cs or any(not (isinstance(c, (int, float)) and c > 0) for c in self.Cs):
            raise ProbeError(f"Cs must be a non-empty list of positive numbers, got {self.Cs!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ProbeError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        return self


def fit_linear_probe(data: ProbeData, cfg: LinearProbeConfig | None = None, method: str = "linear") -> ProbeResult:
    """Fit one logistic regression per ``C`` on train, keep the best on val (ties: the stronger regularisation),
    then evaluate the test split once with that model."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    cfg = replace(cfg or LinearProbeConfig()).validate()
    start = time.time()
    xtr, xva = data.vectors("train"), data.vectors("val")
    if cfg.standardize:
        mu = xtr.mean(0, dtype=np.float64)
        sd = xtr.std(0, dtype=np.float64)
        sd[sd < 1e-8] = 1.0  # constant features stay constant (0) instead of exploding
        xtr = ((xtr - mu) / sd).astype(np.float32)
        xva = ((xva - mu) / sd).astype(np.float32)
    clf = LogisticRegression(max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True, random_state=cfg.seed)
    history, best = [], None
    for C in sorted(float(c) for c in cfg.Cs):  # increasing C: warm starts follow the regularisation path
        clf.set_params(C=C)
        # One BLAS/OpenMP thread: these matrices are small, and on a busy 2-core machine multi-threaded OpenBLAS
        # spin-waits and was measured 50-100x slower (73 s vs 1.5 s for one 2000 x 64 probe).
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, data.y_train)
        acc = _accuracy(clf.predict(xva), data.y_val)
        history.append({"C": C, "val_acc": acc, "train_acc": _accuracy(clf.predict(xtr), data.y_train),
                        "n_iter": int(np.max(clf.n_iter_))})
        if best is None or acc > best[0]:
            best = (acc, C, copy.deepcopy(clf))
    val_acc, best_c, model = best
    test_acc = None
    if data.has_test:  # the single test evaluation, after selection
        xte = data.vectors("test")
        if cfg.standardize:
            xte = ((xte - mu) / sd).astype(np.float32)
        test_acc = _accuracy(model.predict(xte), data.y_test)
    return ProbeResult(method=method, features=data.name, val_acc=val_acc, test_acc=test_acc,
                       selected={"C": best_c}, seed=cfg.seed, seconds=round(time.time() - start, 2),
                       history=history, **data.sizes())


# ------------------------------------------------------------------------------------------ Diff-C


class DiffC(nn.Module):
    """Light conv classifier on frozen spatial features (Revelio's Diff-C).

    ``BatchNorm2d(in, affine=False)`` standardises the input maps; ``n_layers`` 3x3 convs, each with stride 2
    (a 32x32 map goes 16, 8, 4, 2; a 1x1 map stays 1x1), each followed by batch-norm and ReLU; global average
    pooling; dropout; a linear head. ``max_map_size`` (optional, a CPU cost knob) first average-pools maps larger
    than that side down to it (32x32 -> 16x16 is an exact 2x2 mean), which makes the convs about 4x cheaper.
    """

    def __init__(self, in_channels: int, n_classes: int, width: int = 64, n_layers: int = 4, dropout: float = 0.0,
                 max_map_size: int | None = None):
        super().__init__()
        self.max_map_size = max_map_size
        if in_channels < 1 or n_classes < 2 or width < 1 or n_layers < 1:
            raise ProbeError(f"DiffC needs in_channels>=1, n_classes>=2, width>=1, n_layers>=1; got "
                             f"{in_channels}, {n_classes}, {width}, {n_layers}")
        self.norm = nn.BatchNorm2d(in_channels, affine=False)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(n_layers):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_map_size and max(x.shape[-2:]) > self.max_map_size:
            x = F.adaptive_avg_pool2d(x, self.max_map_size)
        return self.head(self.dropout(self.pool(self.convs(self.norm(x))).flatten(1)))


@dataclass
class DiffCConfig:
    """Training of :class:`DiffC` (also used, on pixels, as the supervised-CNN baseline)."""

    width: int = 64
    n_layers: int = 4
    dropout: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    max_epochs: int = 15
    patience: int = 3  # epochs without a new best validation accuracy before stopping
    label_smoothing: float = 0.0
    max_map_size: int | None = None  # average-pool larger input maps to this side first (None: as extracted)
    seed: int = 0

    def validate(self) -> "DiffCConfig":
        for name in ("width", "n_layers", "batch_size", "max_epochs", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ProbeError(f"DiffCConfig.{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ProbeError(f"DiffCConfig.lr must be positive, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise ProbeError(f"DiffCConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.max_map_size is not None and (not isinstance(self.max_map_size, int) or self.max_map_size < 1):
            raise ProbeError(f"DiffCConfig.max_map_size must be None or a positive integer, got {self.max_map_size!r}")
        return self


def _batches(x: np.ndarray, idx: np.ndarray, bs: int) -> Iterable[tuple[np.ndarray, torch.Tensor]]:
    for i in range(0, len(idx), bs):
        rows = np.sort(idx[i : i + bs])  # sorted rows: sequential reads from a memmap
        yield rows, torch.from_numpy(np.asarray(x[rows], dtype=np.float32))


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray, bs: int = 512) -> np.ndarray:
    model.eval()
    out = np.empty(len(x), dtype=np.int64)
    for rows, xb in _batches(x, np.arange(len(x)), bs):
        out[rows] = model(xb).argmax(1).numpy()
    return out


def train_diffc(data: ProbeData, cfg: DiffCConfig | None = None, method: str = "diffc", progress: bool = True) -> ProbeResult:
    """Train Diff-C on the train maps with early stopping on val accuracy; the best-on-val weights are then
    evaluated once on test. Maps are streamed batch by batch (memmapped stores need not fit in memory)."""
    cfg = replace(cfg or DiffCConfig()).validate()
    if not data.spatial:
        raise ProbeError(f"Diff-C needs spatial maps (N, C, h, w) (extract with pooling='none'); {data.name!r} holds "
                         f"vectors of shape {tuple(data.x_train.shape)}")
    start = time.time()
    n = len(data.y_train)
    y_train = torch.from_numpy(data.y_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        model = DiffC(data.x_train.shape[1], data.n_classes, cfg.width, cfg.n_layers, cfg.dropout, cfg.max_map_size)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, n // cfg.batch_size)
        total = cfg.max_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        best = (-1.0, 0, None)
        history: list[dict[str, Any]] = []
        bar = tqdm(range(cfg.max_epochs), desc=f"{method} {data.name}", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            perm = torch.randperm(n, generator=g).numpy()[: steps_per_epoch * cfg.batch_size]  # drop the ragged tail
            losses = []
            for rows, xb in _batches(data.x_train, perm, cfg.batch_size):
                loss = F.cross_entropy(model(xb), y_train[rows], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            val_acc = _accuracy(_predict(model, data.x_val), data.y_val)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_acc": val_acc})
            bar.set_postfix(val=f"{val_acc:.3f}")
            if val_acc > best[0]:
                best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= cfg.patience:
                break
        bar.close()
    val_acc, best_epoch, state = best
    model.load_state_dict(state)
    test_acc = _accuracy(_predict(model, data.x_test), data.y_test) if data.has_test else None
    return ProbeResult(method=method, features=data.name, val_acc=val_acc, test_acc=test_acc,
                       selected={"epoch": best_epoch, "epochs_run": len(history)}, seed=cfg.seed,
                       seconds=round(time.time() - start, 2), history=history, **data.sizes())


def train_supervised_cnn(pixels: ProbeData, cfg: DiffCConfig | None = None, progress: bool = True) -> ProbeResult:
    """The supervised reference: the same conv classifier trained from scratch on raw pixels."""
    if not pixels.spatial:
        raise ProbeError("the supervised CNN needs images (N, C, H, W); use pixel_probe_data()")
    return train_diffc(pixels, cfg, method="supervised CNN", progress=progress)


# ------------------------------------------------------------------------------------------ random-init control


def random_init_model(name: str = "animals-unet", seed: int = 0) -> DiffusionModel:
    """The architecture of embedded model ``name`` with seeded random weights and no training
    (:func:`revelio_nb.models.random_init_model`; ``load_model("random:<name>")`` gives the same)."""
    from .models import ModelLoadError
    from .models import random_init_model as _random_init

    try:
        return _random_init(name, seed=seed)
    except ModelLoadError as e:
        raise ProbeError(str(e)) from e


# ------------------------------------------------------------------------------------------ experiments


def main_blocks(model: DiffusionModel) -> list[str]:
    """The top-level blocks worth probing, in execution order: the UNet's down / mid / up blocks, or every
    transformer block (FLUX: double then single blocks); see the model's adapter."""
    return list(model.main_blocks)


def extract_splits(cfg: ExtractionConfig, model: DiffusionModel | None = None, dataset: ImageDataset | None = None,
                   splits: Sequence[str] = SPLITS, progress: bool = True) -> dict[str, FeatureStore]:
    """:func:`extract_features` for several splits of one config (cached; each split its own store)."""
    model = model or load_model(cfg.model, train_steps=cfg.train_steps, progress=progress)
    dataset = dataset or load_dataset(cfg.dataset, classes=cfg.classes)
    return {s: extract_features(replace(cfg, split=s), model=model, dataset=dataset, progress=progress) for s in splits}


def linear_sweep(stores: dict[str, FeatureStore], blocks: Sequence[str] | None = None,
                 timesteps: Sequence[int] | None = None, cfg: LinearProbeConfig | None = None,
                 max_train: int | None = None, seed: int = 0, progress: bool = True, **extra: Any) -> pd.DataFrame:
    """A linear probe for every (block, t) of the stores: one tidy row each (``C`` chosen on val per cell).

    ``max_train``: fit each probe on a seeded, class-stratified subset of that many training rows (the same rows
    for every cell), so a sweep can read the full stores of notebook 01 yet stay cheap; val / test stay whole.
    """
    blocks = list(blocks or stores["train"].blocks)
    timesteps = [int(t) for t in (timesteps or stores["train"].timesteps)]
    missing = [b for b in blocks if b not in stores["train"].blocks]
    if missing:
        raise ProbeError(f"blocks {missing} are not in the store; it holds {list(stores['train'].blocks)}")
    rows_sel = None
    if max_train is not None:
        if int(max_train) < 1:
            raise ProbeError(f"max_train must be None or a positive integer, got {max_train!r}")
        labels = stores["train"].labels
        rows_sel = np.sort(stratified_subset(np.arange(len(labels)), labels, int(max_train), seed))
    rows = []
    cells = [(b, t) for b in blocks for t in timesteps]
    for b, t in tqdm(cells, desc="linear probes", unit="cell", disable=not progress):
        data = probe_data(stores, (b, t))
        if rows_sel is not None:
            data = replace(data, x_train=np.asarray(data.x_train[rows_sel]), y_train=data.y_train[rows_sel])
        r = fit_linear_probe(data, cfg)
        rows.append(r.row(block=b, t=t, dim=int(stores["train"].array(b, t).shape[1]), **extra))
    return pd.DataFrame(rows)


def best_cells(df: pd.DataFrame, k: int = 1, metric: str = "val_acc") -> list[tuple[str, int]]:
    """The ``k`` best (block, t) cells by a validation metric (never by test)."""
    if metric.startswith("test"):
        raise ProbeError("cells are selected on validation, not on the test split; use metric='val_acc'")
    top = df.sort_values([metric, "t"], ascending=[False, True]).head(k)
    return [(str(b), int(t)) for b, t in zip(top["block"], top["t"])]


def probe_cells(model: DiffusionModel, base: ExtractionConfig, cells: Sequence[tuple[str, int]],
                seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                linear: LinearProbeConfig | None = None, diffc: DiffCConfig | None = None,
                vary_noise: bool = True, dataset: ImageDataset | None = None, progress: bool = True,
                **extra: Any) -> pd.DataFrame:
    """Linear probe and/or Diff-C at some (block, t) cells over seeds; one tidy row per (cell, method, seed).

    Spatial maps are extracted once per timestep into a cached store holding only the blocks needed there (so
    early exit applies). ``vary_noise=True``: seed ``s`` is also the noise seed of the extraction (features are
    re-extracted per seed) and the linear probe gets one row per seed. ``vary_noise=False``: features come from
    ``base.seed`` once; Diff-C varies its seed, and the linear probe, deterministic on fixed features, is fitted
    once (one row, std 0).
    """
    bad = [m for m in methods if m not in ("linear", "diffc")]
    if bad:
        raise ProbeError(f"unknown methods {bad}; valid: ['linear', 'diffc']")
    if not seeds:
        raise ProbeError("seeds is empty; give at least one (>= 3 for mean +- std)")
    dataset = dataset or load_dataset(base.dataset, classes=base.classes)
    by_t: dict[int, list[str]] = {}
    for b, t in cells:
        by_t.setdefault(int(t), []).append(b)
    rows = []
    for noise_seed in (seeds if vary_noise else [base.seed]):
        clf_seeds = [noise_seed] if vary_noise else list(seeds)
        for t, blocks in by_t.items():
            cfg = replace(base, blocks=sorted(set(blocks)), timesteps=[t], pooling="none", seed=int(noise_seed))
            stores = extract_splits(cfg, model, dataset, progress=progress)
            for b in blocks:
                d = probe_data(stores, (b, t))
                info = dict(block=b, t=t, model=model.model_id, noise_seed=int(noise_seed), **extra)
                if "linear" in methods:
                    r = fit_linear_probe(d, replace(linear or LinearProbeConfig(), seed=int(noise_seed)))
                    rows.append(r.row(**info))
                if "diffc" in methods:
                    for s in clf_seeds:
                        r = train_diffc(d, replace(diffc or DiffCConfig(), seed=int(s)), progress=progress)
                        rows.append(r.row(**info))
    return pd.DataFrame(rows)


def baseline_runs(dataset: ImageDataset, seeds: Sequence[int] = (0, 1, 2), size: int = 32,
                  max_images: int | None = None, linear: LinearProbeConfig | None = None,
                  cnn: DiffCConfig | None = None, progress: bool = True, **extra: Any) -> pd.DataFrame:
    """Pixel logistic regression (deterministic: fitted once, reported with std 0) and the supervised CNN
    from scratch over ``seeds``, on the same splits the probes use."""
    pix = pixel_probe_data(dataset, size=size, max_images=max_images)
    rows = [fit_linear_probe(pix, linear, method="pixels (logistic)").row(block="pixels", t=-1, **extra)]
    for seed in seeds:
        r = train_supervised_cnn(pix, replace(cnn or DiffCConfig(), seed=int(seed)), progress=progress)
        rows.append(r.row(block="pixels", t=-1, **extra))
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame, by: Sequence[str] = ("method", "block", "t")) -> pd.DataFrame:
    """Mean and std of val/test accuracy over seeds, per group; ``test`` is a "mean ± std" string in %."""
    by = [c for c in by if c in df.columns]
    g = df.groupby(by, sort=False, dropna=False)
    out = g.agg(val_acc=("val_acc", "mean"), test_mean=("test_acc", "mean"), test_std=("test_acc", "std"),
                n_seeds=("seed", "nunique")).reset_index()
    out["test_std"] = out["test_std"].fillna(0.0)
    out["test"] = [fmt_pm(m, s) for m, s in zip(out["test_mean"], out["test_std"])]
    return out


def fmt_pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


# ------------------------------------------------------------------------------------------ comparisons


@dataclass
class ComparisonEntry:
    """One model in a comparison: what it is, and on which data (classes) it is probed."""

    comparison: str  # e.g. "architecture"
    label: str  # e.g. "UNet"
    model: str  # "embedded:<name>" or "random:<name>"
    dataset: str = "animal-mnist"
    probe_classes: list[int] | None = None  # probe on these classes (labels re-numbered)
    train_steps: int | None = None  # override the embedded model's budget (smoke runs)


def on_datasets(entries: Sequence[ComparisonEntry], datasets: Sequence[str]) -> list[ComparisonEntry]:
    """Every entry probed on every dataset of ``datasets`` (the same model, trained once, read on each: Revelio
    probes one model on several datasets), dataset by dataset. Entries with ``probe_classes`` are refused: a class
    subset is specific to its dataset."""
    if not datasets:
        raise ProbeError("datasets is empty; give at least one, e.g. ['animal-mnist']")
    tied = [e.label for e in entries if e.probe_classes]
    if tied:
        raise ProbeError(f"entries {tied} probe a class subset of their own dataset; keep them out of on_datasets")
    return [replace(e, dataset=d) for d in datasets for e in entries]


def load_any(model_id: str, train_steps: int | None = None, seed: int = 0) -> DiffusionModel:
    """``embedded:<name>`` / folder / hub id through :func:`load_model`, or ``random:<name>`` (random init)."""
    if model_id.startswith("random:"):
        return random_init_model(model_id.split(":", 1)[1], seed=seed)
    return load_model(model_id, train_steps=train_steps)


def compare_models(entries: Sequence[ComparisonEntry], timesteps: Sequence[int] = (25, 100),
                   seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] = ("linear", "diffc"),
                   max_images: int | None = None, select_max_images: int | None = None,
                   linear: LinearProbeConfig | None = None, diffc: DiffCConfig | None = None,
                   vary_noise: bool = False, batch_size: int = 128, map_dtype: str = "float16",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each model: a linear sweep over its main blocks x ``timesteps`` (noise seed 0, pooled, train + val
    only) picks its best cell on validation; then linear + Diff-C at that cell over ``seeds`` (see
    :func:`probe_cells`). Returns (selection sweep rows, final rows), both tagged with comparison and label.

    ``select_max_images`` caps each split during the selection sweep; ``max_images`` caps the final runs, whose
    spatial maps are stored as ``map_dtype``. A model probed on the same data in several comparisons is computed
    once.
    """
    sweeps, runs, done = [], [], {}
    for e in tqdm(entries, desc="models", unit="model", disable=not progress):
        key = (e.model, e.dataset, tuple(e.probe_classes or ()), e.train_steps)
        if key not in done:
            model = load_any(e.model, e.train_steps)
            ds = load_dataset(e.dataset, classes=e.probe_classes)
            info = {"model": model.model_id, "dataset": ds.name, "train_steps": _train_steps(model)}
            sel_cap = select_max_images if select_max_images is not None else max_images
            base = ExtractionConfig(model=model.model_id, dataset=e.dataset, classes=e.probe_classes,
                                    blocks=main_blocks(model), timesteps=list(timesteps), pooling="mean",
                                    max_images=sel_cap, batch_size=batch_size, train_steps=e.train_steps)
            stores = extract_splits(base, model, ds, splits=("train", "val"), progress=progress)
            sw = linear_sweep(stores, cfg=linear, progress=progress).assign(**info)
            cell = best_cells(sw, 1)[0]
            final = replace(base, max_images=max_images, store_dtype=map_dtype)
            rn = probe_cells(model, final, [cell], seeds=seeds, methods=methods,
                             linear=linear, diffc=diffc, vary_noise=vary_noise, dataset=ds, progress=progress)
            done[key] = (sw, rn.assign(**info))
        sw, rn = done[key]
        sweeps.append(sw.assign(comparison=e.comparison, label=e.label))
        runs.append(rn.assign(comparison=e.comparison, label=e.label))
    return pd.concat(sweeps, ignore_index=True), pd.concat(runs, ignore_index=True)


def _train_steps(model: DiffusionModel) -> int:
    spec = model.info.get("spec") or {}
    if model.info.get("trained") is False:
        return 0
    return int((spec.get("train") or {}).get("steps", 0))


# ------------------------------------------------------------------------------------------ plots and report


def sweep_heatmap(df: pd.DataFrame, value: str = "test_acc", title: str | None = None, ax=None,
                  mark_best_val: bool = True):
    """Seaborn heatmap of accuracy (%) over block (rows, in the order given) x timestep (columns); the cell
    with the best validation accuracy is outlined."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.patches import Rectangle

    blocks = list(dict.fromkeys(df["block"]))
    ts = sorted(df["t"].unique())
    grid = df.pivot_table(index="block", columns="t", values=value).reindex(index=blocks, columns=ts) * 100
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(ts), 0.8 + 0.45 * len(blocks)))
    else:
        fig = ax.figure
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": f"{value} (%)"}, ax=ax)
    if mark_best_val:
        b, t = best_cells(df, 1)[0]
        ax.add_patch(Rectangle((ts.index(t), blocks.index(b)), 1, 1, fill=False, edgecolor="red", lw=2.5))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("block")
    ax.set_title(title or f"linear probe {value} (red: best on validation)")
    fig.tight_layout()
    return fig


def comparison_barplot(runs: pd.DataFrame, comparison: str, ax=None):
    """Test accuracy (mean ± std over seeds) per model (and probed dataset) and method for one comparison."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = runs[runs["comparison"] == comparison].copy()
    d["test %"] = d["test_acc"] * 100
    if "dataset" in d.columns and d["dataset"].nunique() > 1:  # the same models probed on several datasets
        d["label"] = d["label"] + "\n" + d["dataset"]
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 1.3 * d["label"].nunique(), 3.2))
    else:
        fig = ax.figure
    sns.barplot(data=d, x="label", y="test %", hue="method", errorbar="sd", ax=ax)
    lo = max(0.0, float(d["test %"].min()) - 10)
    ax.set_ylim(lo, 100)
    ax.set_xlabel("")
    ax.set_title(comparison)
    if d["label"].nunique() > 4:  # several models x datasets: keep the labels apart
        ax.tick_params(axis="x", labelrotation=35, labelsize=7)
    fig.tight_layout()
    return fig


def best_by_validation(summary: pd.DataFrame, by: Sequence[str] = ("dataset", "features", "method")) -> pd.DataFrame:
    """Per group (per dataset when the table has that column), the row of :func:`summarize` with the best mean
    validation accuracy (test is only reported)."""
    by = [c for c in by if c in summary.columns]
    idx = summary.groupby(by, sort=False)["val_acc"].idxmax()
    return summary.loc[idx.values].reset_index(drop=True)


def summary_barplot(runs: pd.DataFrame, best: pd.DataFrame, ax=None):
    """Test accuracy per seed (points) and mean ± std (bars) of the validation-best cell of each (features, method);
    one panel per dataset when the tables have a ``dataset`` column (``ax`` only for a single dataset)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    key = [c for c in ("dataset", "features", "method", "block", "t") if c in best.columns and c in runs.columns]
    keys = set(map(tuple, best[key].astype(str).values))
    d = runs[[k in keys for k in map(tuple, runs[key].astype(str).values)]].copy()
    d["test %"] = d["test_acc"] * 100
    family = {"linear": "linear (probe / pixel logistic)", "pixels (logistic)": "linear (probe / pixel logistic)",
              "diffc": "conv (Diff-C / supervised CNN)", "supervised CNN": "conv (Diff-C / supervised CNN)"}
    d["probe"] = [family.get(m, m) for m in d["method"]]
    names = list(dict.fromkeys(d["dataset"])) if "dataset" in d.columns else [None]
    if ax is None:
        n_feat = d["features"].nunique()
        fig, axes = plt.subplots(len(names), 1, figsize=(max(8, 1.9 * n_feat), 3.6 * len(names)), squeeze=False)
        axes = axes[:, 0]
    else:
        if len(names) > 1:
            raise ProbeError(f"one ax cannot hold {len(names)} datasets ({names}); leave ax=None")
        fig, axes = ax.figure, [ax]
    hue_order = sorted(set(d["probe"]), key=lambda p: not p.startswith("linear"))
    for a, name in zip(axes, names):
        dd = d if name is None else d[d["dataset"] == name]
        sns.barplot(data=dd, x="features", y="test %", hue="probe", errorbar="sd", ax=a, alpha=0.85,
                    hue_order=hue_order)
        a.set_ylim(max(0.0, float(dd["test %"].min()) - 10), 100)
        a.set_xlabel("")
        a.set_title(("" if name is None else f"{name}: ")
                    + "test accuracy at the validation-best cell (mean ± std over seeds)")
        a.legend(fontsize=8, loc="lower right")
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def headline(summary: pd.DataFrame, target: float = 0.92) -> str:
    """A plain-text verdict from a :func:`summarize` table with features in {diffusion (trained), random init
    (same arch), pixels, encoder: <name>}: best linear / Diff-C (chosen on validation) vs pixels, the control, the
    CNN and the vision encoders; one paragraph per dataset when the table has a ``dataset`` column."""
    if "dataset" in summary.columns and summary["dataset"].nunique() > 1:
        return "\n\n".join(f"== {name}\n" + headline(d.drop(columns="dataset"), target)
                            for name, d in summary.groupby("dataset", sort=False))
    best = best_by_validation(summary).set_index(["features", "method"])

    def get(f, m):
        return best.loc[(f, m)] if (f, m) in best.index else None

    lines = []
    for (f, m), r in best.iterrows():
        t = f" t={int(r['t'])}" if int(r["t"]) >= 0 else ""  # encoders have no timestep
        cell = "" if r["block"] == "pixels" else f" at {r['block']}{t}"
        lines.append(f"{f:28s} {m:20s} {r['test']:>14s} %  ({int(r['n_seeds'])} seed(s){cell})")
    lin, dc = get("diffusion (trained)", "linear"), get("diffusion (trained)", "diffc")
    pix, ctrl = get("pixels", "pixels (logistic)"), get("random init (same arch)", "diffc")
    ctrl_lin = get("random init (same arch)", "linear")
    if lin is not None and dc is not None:
        best_acc = max(lin["test_mean"], dc["test_mean"])
        lines.append(f"best diffusion-feature accuracy {best_acc * 100:.1f} % (target >= {target * 100:.0f} %): "
                     f"{'reached' if best_acc >= target else 'NOT reached'}")
        lines.append(f"Diff-C {'>=' if dc['test_mean'] >= lin['test_mean'] else '<'} linear probe "
                     f"({dc['test_mean'] * 100:.1f} vs {lin['test_mean'] * 100:.1f} %)")
        if pix is not None:
            lines.append(f"linear probe on diffusion features vs on pixels: {lin['test_mean'] * 100:.1f} vs "
                         f"{pix['test_mean'] * 100:.1f} %")
        if ctrl is not None and ctrl_lin is not None:
            lines.append(f"random-init control: linear {ctrl_lin['test_mean'] * 100:.1f} %, Diff-C "
                         f"{ctrl['test_mean'] * 100:.1f} % (trained: {lin['test_mean'] * 100:.1f} / "
                         f"{dc['test_mean'] * 100:.1f} %)")
        for f in dict.fromkeys(best.index.get_level_values(0)):
            if str(f).startswith("encoder:"):
                el, ed = get(f, "linear"), get(f, "diffc")
                parts = [f"{what} {e['test_mean'] * 100:.1f} vs {ref['test_mean'] * 100:.1f} %"
                         for what, e, ref in (("linear", el, lin), ("Diff-C", ed, dc)) if e is not None]
                lines.append(f"{f[len('encoder:'):].strip()} vs diffusion features: " + ", ".join(parts))
    return "\n".join(lines)


def layer_profile(sweeps: pd.DataFrame, comparison: str, value: str = "val_acc", ax=None, dataset: str | None = None):
    """Validation accuracy of the linear probe along each model's depth (blocks in execution order, x scaled
    to 0..1 so a UNet and a DiT can share the axis); one line per (model, t), on one probed ``dataset`` (default:
    the comparison's first)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = sweeps[sweeps["comparison"] == comparison].copy()
    if "dataset" in d.columns and len(d):
        names = list(dict.fromkeys(d["dataset"]))
        dataset = names[0] if dataset is None else dataset
        if dataset not in names:
            raise ProbeError(f"comparison {comparison!r} was not probed on {dataset!r}; it was on {names}")
        d = d[d["dataset"] == dataset]
    pos = {}
    for label, g in d.groupby("label", sort=False):
        order = list(dict.fromkeys(g["block"]))
        for i, b in enumerate(order):
            pos[(label, b)] = i / max(1, len(order) - 1)
    d["relative depth"] = [pos[(lab, b)] for lab, b in zip(d["label"], d["block"])]
    d[f"{value} %"] = d[value] * 100
    d["t"] = d["t"].astype(str)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.4))
    else:
        fig = ax.figure
    sns.lineplot(data=d, x="relative depth", y=f"{value} %", hue="label", style="t", marker="o", ax=ax)
    ax.set_title(f"{comparison}: linear probe along depth" + (f" ({dataset})" if dataset else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def results_markdown(run_dir: str | Path) -> str:
    """The README's short results table, built from ``<run_dir>/tables/probe_summary.csv`` (notebook 04; per
    features and probe, the cell best on validation) and ``comparison_summary.csv`` (notebook 05)."""
    tables = Path(run_dir) / "tables"
    parts = []
    p4 = tables / "probe_summary.csv"
    if p4.is_file():
        df = best_by_validation(pd.read_csv(p4))
        with_ds = "dataset" in df.columns
        if with_ds:  # dataset by dataset, in the order they first appear
            order = {d: i for i, d in enumerate(dict.fromkeys(df["dataset"]))}
            df = df.sort_values("dataset", key=lambda c: c.map(order), kind="stable")
        head = ("| dataset " if with_ds else "") + "| features | probe | block @ t | test accuracy (%) | seeds |"
        lines = [head, "|---" * head.count(" | ") + "|---|"]
        for r in df.itertuples():
            cell = "-" if r.block == "pixels" else (f"{r.block} @ {int(r.t)}" if int(r.t) >= 0 else str(r.block))
            lines.append((f"| {r.dataset} " if with_ds else "")
                         + f"| {r.features} | {r.method} | {cell} | {r.test} | {int(r.n_seeds)} |")
        parts.append("\n".join(lines))
    p5 = tables / "comparison_summary.csv"
    if p5.is_file():
        df = pd.read_csv(p5)
        lines = ["| comparison | model | train steps | probed on | best block @ t | linear (%) | Diff-C (%) |",
                 "|---|---|---|---|---|---|---|"]
        for r in df.itertuples():
            lines.append(f"| {r.comparison} | {r.label} | {int(r.train_steps)} | {r.dataset} | {r.block} @ {int(r.t)} "
                         f"| {r.linear} | {r.diffc} |")
        parts.append("\n".join(lines))
    if not parts:
        raise FileNotFoundError(f"no probe_summary.csv or comparison_summary.csv in {tables}; run notebooks 04/05 first")
    return "\n\n".join(parts) + "\n"


def comparison_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, probed dataset, model): its cell and linear / Diff-C test accuracy as
    "mean ± std" (%)."""
    rows = []
    for (comp, dataset, label), d in runs.groupby(["comparison", "dataset", "label"], sort=False):
        row = {"comparison": comp, "label": label, "model": d["model"].iloc[0], "dataset": dataset,
               "train_steps": int(d["train_steps"].iloc[0]), "block": d["block"].iloc[0], "t": int(d["t"].iloc[0])}
        for m in ("linear", "diffc"):
            dm = d[d["method"] == m]
            row[m] = fmt_pm(dm["test_acc"].mean(), dm["test_acc"].std() if len(dm) > 1 else 0.0) if len(dm) else "n/a"
            row[f"{m}_mean"] = dm["test_acc"].mean() if len(dm) else float("nan")
            row[f"{m}_std"] = (dm["test_acc"].std() if len(dm) > 1 else 0.0) if len(dm) else float("nan")
            row[f"{m}_seeds"] = int(dm["seed"].nunique())
        rows.append(row)
    return pd.DataFrame(rows)
