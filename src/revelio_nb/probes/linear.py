"""The linear probe (Revelio, METHODS.md section 1): multinomial logistic regression on standardised pooled
features; the inverse regularisation ``C`` is chosen on the validation split, then the test split is evaluated once.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .data import ProbeData, ProbeError, ProbeResult, accuracy


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
        acc = accuracy(clf.predict(xva), data.y_val)
        history.append({"C": C, "val_acc": acc, "train_acc": accuracy(clf.predict(xtr), data.y_train),
                        "n_iter": int(np.max(clf.n_iter_))})
        if best is None or acc > best[0]:
            best = (acc, C, copy.deepcopy(clf))
    val_acc, best_c, model = best
    test_acc = None
    if data.has_test:  # the single test evaluation, after selection
        xte = data.vectors("test")
        if cfg.standardize:
            xte = ((xte - mu) / sd).astype(np.float32)
        test_acc = accuracy(model.predict(xte), data.y_test)
    return ProbeResult(method=method, features=data.name, val_acc=val_acc, test_acc=test_acc,
                       selected={"C": best_c}, seed=cfg.seed, seconds=round(time.time() - start, 2),
                       history=history, **data.sizes())
