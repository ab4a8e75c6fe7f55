"""Diff-C (Revelio, METHODS.md section 1): the light conv classifier on spatial maps (batch-norm without affine,
stride-2 3x3 convs, global average pooling, linear head; AdamW; early stopping on the validation split; the
best-on-validation weights are evaluated once on test). :func:`train_diffc` trains it; the same recipe on pixels
is the supervised-CNN baseline (:mod:`.baselines`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ProbeData, ProbeError, ProbeResult, accuracy


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
        raise ProbeError(f"Diff-C needs spatial maps (N, C, h, w) (extract with pooling='map'); {data.name!r} holds "
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
            val_acc = accuracy(_predict(model, data.x_val), data.y_val)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_acc": val_acc})
            bar.set_postfix(val=f"{val_acc:.3f}")
            if val_acc > best[0]:
                best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= cfg.patience:
                break
        bar.close()
    val_acc, best_epoch, state = best
    model.load_state_dict(state)
    test_acc = accuracy(_predict(model, data.x_test), data.y_test) if data.has_test else None
    return ProbeResult(method=method, features=data.name, val_acc=val_acc, test_acc=test_acc,
                       selected={"epoch": best_epoch, "epochs_run": len(history)}, seed=cfg.seed,
                       seconds=round(time.time() - start, 2), history=history, **data.sizes())
