"""The SAE regime: which sparsity k and dictionary size (expansion) the taxonomy is computed in.

A sweep over k x expansion per hookpoint trains each SAE with two (or more) seeds through the hookpoint pipeline
(:func:`revelio_nb.hookpoint_saes.train_hookpoint`, so every SAE, its statistics and its taxonomy are cached like
notebook 02's) and reports, on the held-out split: FVU, dead fraction, mean purity of the top images, the kinds of
the first seed's latents, and **taxonomy stability** (the fraction of live latents whose Hungarian-matched latent
in the other seed has the same kind, and Cohen's kappa, the same corrected for the agreement that the kind shares
alone would give: :func:`revelio_nb.taxonomy.stability`).

:func:`pick_regime` states the choice as a rule on those numbers (documented there), so the notebook can say
whether the regime notebook 02 uses is the one the evidence picks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import hookpoint_saes as hp
from . import sae, taxonomy
from .data import load_dataset
from .models import load_model


class RegimeError(ValueError):
    """Bad sweep settings (the message names the value and the valid choices)."""


@dataclass
class RegimeRule:
    """How :func:`pick_regime` chooses (means over the swept hookpoints)."""

    max_fvu: float = 0.2
    """Reconstruction must explain at least 80 % of the held-out variance."""
    max_dead: float = 0.1
    """At most 10 % of the latents may never fire on the held-out split."""
    stability_tolerance: float = 0.05
    """Regimes within this much kappa of the most stable one are equally good; the sparsest of them wins (smallest
    k / d_in, then the smallest dictionary)."""


@dataclass
class SweepConfig:
    """The regimes to train: every k x expansion, or the explicit (k, expansion) ``pairs`` when given."""

    ks: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    expansions: list[int] = field(default_factory=lambda: [2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    pairs: list[tuple[int, int]] | None = None

    def regimes(self) -> list[tuple[int, int]]:
        if self.pairs is not None:
            return [(int(k), int(e)) for k, e in self.pairs]
        return [(int(k), int(e)) for k in self.ks for e in self.expansions]

    def validate(self) -> "SweepConfig":
        if not self.ks or min(self.ks) < 1:
            raise RegimeError(f"ks must be positive integers, got {self.ks}")
        if not self.expansions or min(self.expansions) < 1:
            raise RegimeError(f"expansions must be positive integers, got {self.expansions}")
        if self.pairs is not None and (not self.pairs or min(min(p) for p in self.pairs) < 1):
            raise RegimeError(f"pairs must be (k, expansion) pairs of positive integers, got {self.pairs}")
        if len(set(self.seeds)) < 2:
            raise RegimeError(f"stability needs at least two distinct seeds, got {self.seeds}")
        return self


def with_regime(run: hp.HookpointRun, k: int, expansion: int, seed: int) -> hp.HookpointRun:
    """A copy of ``run`` whose SAEs use sparsity ``k``, ``expansion`` and training seed ``seed``."""
    r = copy.deepcopy(run)
    r.sae = copy.deepcopy(run.sae)
    r.sae.sae.k, r.sae.sae.expansion_factor, r.sae.sae.num_latents = int(k), int(expansion), 0
    r.sae.seed = int(seed)
    return r


def with_seed(run: hp.HookpointRun, seed: int) -> hp.HookpointRun:
    """A copy of ``run`` whose SAEs are trained with seed ``seed`` (same regime, same features)."""
    r = copy.deepcopy(run)
    r.sae.seed = int(seed)
    return r


def stability_table(run: hp.HookpointRun, hookpoints: Sequence[tuple[str, int]], seeds: Sequence[int] = (0, 1),
                    model=None, dataset=None, progress: bool = True) -> pd.DataFrame:
    """Per hookpoint: train its SAE with each seed (cached), match latents by decoder cosine and report how many
    keep their kind (:func:`seed_stability`). One row per hookpoint with block, t and the stability columns."""
    if len(set(seeds)) < 2:
        raise RegimeError(f"stability needs at least two distinct seeds, got {list(seeds)}")
    model = model or load_model(run.model, train_steps=run.train_steps)
    dataset = dataset or load_dataset(run.dataset)
    out = []
    for block, t in tqdm([(b, int(t)) for b, t in hookpoints], desc="seed stability", disable=not progress):
        rows = [hp.train_hookpoint(with_seed(run, s), block, t, model=model, dataset=dataset, progress=False)
                for s in seeds]
        out.append({"hookpoint": rows[0]["hookpoint"], "block": block, "t": t, "cell": f"{block} @ {t}",
                    "seeds": ",".join(map(str, seeds)), **seed_stability(rows)})
    return pd.DataFrame(out)


def regime_statement(pick: dict, k: int, expansion: int) -> str:
    """One generated sentence: is the regime in use (``k``, ``expansion``) the one the sweep picks?"""
    same = (int(k), int(expansion)) == (pick["k"], pick["expansion"])
    used = f"k={int(k)}, expansion {int(expansion)}"
    if same:
        return f"The regime in use ({used}) is the one the sweep picks: {pick['why']}."
    return f"The regime in use ({used}) is NOT the one the sweep picks; the sweep picks {pick['why']}."


def seed_stability(rows: Sequence[dict]) -> dict[str, float]:
    """Stability of the first row's taxonomy against each other row's (same hookpoint and regime, other seeds),
    averaged: same_kind, same_label, mean matched decoder cosine of live latents."""
    first = rows[0]
    sae_a = sae.SparseAutoencoder.load(first["sae_dir"])
    tax_a = taxonomy.Taxonomy.load(first["taxonomy_path"])
    stats = []
    for r in rows[1:]:
        sae_b = sae.SparseAutoencoder.load(r["sae_dir"])
        match = taxonomy.match_latents(sae_a, sae_b)
        stats.append(taxonomy.stability(tax_a, taxonomy.Taxonomy.load(r["taxonomy_path"]), match))
    def mean(values):
        v = np.asarray(values, dtype=np.float64)
        return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")

    return {k: mean([s[k] for s in stats]) for k in stats[0]}


def sweep_regimes(run: hp.HookpointRun, hookpoints: Sequence[tuple[str, int]], cfg: SweepConfig | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Train every (hookpoint, k, expansion, seed) SAE (cached) and return one row per (hookpoint, k, expansion).

    Columns: hookpoint, block, t, k, expansion, num_latents, d_in, k_over_d, fvu, l0, dead_fraction, mean_purity
    (means over seeds), the first seed's kind fractions (frac_<kind>), and stability against the other seeds
    (same_kind, same_label, mean_cosine_live). Regimes with k > num_latents are skipped.
    """
    if run.taxonomy is None:
        raise RegimeError("the sweep measures taxonomy stability: run.taxonomy must not be None")
    cfg = (cfg or SweepConfig()).validate()
    model = load_model(run.model, train_steps=run.train_steps)
    dataset = load_dataset(run.dataset)
    jobs = [(h, k, e) for h in [(b, int(t)) for b, t in hookpoints] for k, e in cfg.regimes()]
    out = []
    for (block, t), k, e in tqdm(jobs, desc="SAE regimes", disable=not progress):
        rows = []
        for seed in cfg.seeds:
            try:
                rows.append(hp.train_hookpoint(with_regime(run, k, e, seed), block, t, model=model, dataset=dataset,
                                               progress=False))
            except sae.SaeError:  # k larger than the dictionary
                break
        if len(rows) < len(cfg.seeds):
            continue
        first = rows[0]
        tax = taxonomy.Taxonomy.load(first["taxonomy_path"])
        d_in = sae.SparseAutoencoder.load(first["sae_dir"]).d_in
        row = {"hookpoint": f"{block} @ {t}", "block": block, "t": t, "k": int(k), "expansion": int(e),
               "num_latents": int(first["num_latents"]), "d_in": int(d_in), "k_over_d": k / d_in}
        for col in ("fvu", "l0", "dead_fraction", "mean_purity"):
            row[col] = float(np.mean([r[col] for r in rows]))
        row.update({f"frac_{kind}": float(v) for kind, v in tax.fractions().items()})
        row.update(seed_stability(rows))
        out.append(row)
    return pd.DataFrame(out)


def pick_regime(sweep: pd.DataFrame, rule: RegimeRule | None = None) -> dict:
    """The regime the evidence picks, with the reason.

    Averaged over hookpoints: keep the regimes with FVU <= ``max_fvu`` and dead fraction <= ``max_dead``; among
    them, those whose taxonomy stability (kappa: kinds kept across seeds beyond chance) is within
    ``stability_tolerance`` of the best; of those, the sparsest (smallest k / d_in, then the smallest expansion).
    When no regime meets the FVU and dead limits, the most stable one overall is returned and ``met_limits`` is
    False.
    """
    rule = rule or RegimeRule()
    if not len(sweep):
        raise RegimeError("empty sweep: nothing to pick from")
    agg = (sweep.groupby(["k", "expansion"]).agg(fvu=("fvu", "mean"), dead_fraction=("dead_fraction", "mean"),
                                                  same_kind=("same_kind", "mean"), kappa=("kappa", "mean"),
                                                  k_over_d=("k_over_d", "mean"),
                                                  mean_purity=("mean_purity", "mean"))
           .reset_index())
    ok = agg[(agg.fvu <= rule.max_fvu) & (agg.dead_fraction <= rule.max_dead)]
    met = len(ok) > 0
    pool = ok if met else agg
    best = pool.kappa.max()
    near = pool[pool.kappa >= best - rule.stability_tolerance].sort_values(["k_over_d", "expansion"])
    r = near.iloc[0]
    why = (f"k={int(r.k)}, expansion {int(r.expansion)}: FVU {r.fvu:.3f}, dead {r.dead_fraction:.1%}, "
           f"{r.same_kind:.0%} of live latents keep their kind with another seed (kappa {r.kappa:.2f}) "
           + (f"(the most stable regime with FVU <= {rule.max_fvu} and dead <= {rule.max_dead:.0%} reaches kappa "
              f"{best:.2f}; this is the sparsest within {rule.stability_tolerance:.2f} of it)" if met else
              f"(no regime meets FVU <= {rule.max_fvu} and dead <= {rule.max_dead:.0%}: the most stable overall)"))
    return {"k": int(r.k), "expansion": int(r.expansion), "fvu": float(r.fvu), "dead_fraction": float(r.dead_fraction),
            "same_kind": float(r.same_kind), "kappa": float(r.kappa), "k_over_d": float(r.k_over_d),
            "met_limits": met, "why": why, "table": agg}


def plot_sweep(sweep: pd.DataFrame, pick: dict | None = None):
    """FVU, dead fraction, mean purity and taxonomy stability against k (log2), one line per expansion, one
    marker style per hookpoint; the picked regime circled."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    cols = [("fvu", "FVU (held-out)"), ("dead_fraction", "dead fraction"), ("mean_purity", "mean purity"),
            ("same_kind", "kind kept across seeds"), ("kappa", "kind kept beyond chance (kappa)")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6))
    for ax, (col, title) in zip(axes, cols):
        sns.lineplot(data=sweep, x="k", y=col, hue="expansion", style="hookpoint", markers=True, dashes=False,
                     palette="viridis", ax=ax, legend=ax is axes[-1])
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_ylabel("")
        if pick is not None:
            sel = sweep[(sweep.k == pick["k"]) & (sweep.expansion == pick["expansion"])]
            ax.scatter(sel.k, sel[col], s=160, facecolors="none", edgecolors="red", linewidths=1.5, zorder=5)
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig
