"""SAE regime sweep: the pick follows its documented rule; a tiny end-to-end sweep through the hookpoint pipeline."""

from __future__ import annotations

import pandas as pd
import pytest

from revelio_nb import hookpoint_saes as hp
from revelio_nb import regime, sae


def _sweep(rows):
    cols = ["k", "expansion", "fvu", "dead_fraction", "same_kind", "kappa", "k_over_d", "mean_purity"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows]).assign(hookpoint="h")


def test_pick_follows_the_rule():
    sweep = _sweep([
        (2, 4, 0.30, 0.80, 0.60, 0.50, 2 / 64, 0.8),   # too lossy, too many dead
        (8, 4, 0.05, 0.05, 0.65, 0.40, 8 / 64, 0.7),   # within the tolerance of the best: sparsest wins
        (16, 4, 0.03, 0.02, 0.66, 0.43, 16 / 64, 0.6),  # the most stable allowed
        (16, 8, 0.02, 0.30, 0.90, 0.90, 16 / 64, 0.6),  # very stable but too many dead latents
        (32, 4, 0.01, 0.00, 0.55, 0.20, 32 / 64, 0.6),
    ])
    pick = regime.pick_regime(sweep)
    assert (pick["k"], pick["expansion"]) == (8, 4) and pick["met_limits"]
    strict = regime.pick_regime(sweep, regime.RegimeRule(stability_tolerance=0.01))
    assert (strict["k"], strict["expansion"]) == (16, 4)
    none_ok = regime.pick_regime(sweep, regime.RegimeRule(max_fvu=0.001))
    assert not none_ok["met_limits"] and (none_ok["k"], none_ok["expansion"]) == (16, 8)
    assert "NOT" in regime.regime_statement(pick, 32, 4) and "NOT" not in regime.regime_statement(pick, 8, 4)
    with pytest.raises(regime.RegimeError, match="empty"):
        regime.pick_regime(sweep.iloc[:0])
    with pytest.raises(regime.RegimeError, match="two distinct seeds"):
        regime.SweepConfig(seeds=[0, 0]).validate()
    assert regime.SweepConfig(ks=[4, 8], expansions=[2]).regimes() == [(4, 2), (8, 2)]
    assert regime.SweepConfig(pairs=[[16, 4], [8, 2]]).regimes() == [(16, 4), (8, 2)]
    with pytest.raises(regime.RegimeError, match="pairs"):
        regime.SweepConfig(pairs=[(0, 2)]).validate()


def test_tiny_sweep_and_stability_through_the_pipeline(tiny_unet_path):
    cfg = sae.TrainConfig(sae=sae.SaeConfig(k=4, expansion_factor=2), epochs=3, batch_size=32)
    run = hp.HookpointRun(model=str(tiny_unet_path), store_blocks=["mid_block"], store_timesteps=[10],
                          max_images=40, sae=cfg, top_n=4)
    sweep = regime.sweep_regimes(run, [("mid_block", 10)], regime.SweepConfig(ks=[2, 4], expansions=[2], seeds=[0, 1]),
                                 progress=False)
    assert sweep[["k", "expansion"]].values.tolist() == [[2, 2], [4, 2]]
    assert sweep.d_in.tolist() == [16, 16] and sweep.num_latents.tolist() == [32, 32]
    assert sweep.l0.tolist() == pytest.approx([2, 4], abs=1e-6)
    assert sweep.same_kind.between(0, 1).all() and sweep.mean_cosine.between(-1, 1).all()
    stab = regime.stability_table(run, [("mid_block", 10)], seeds=[0, 1], progress=False)
    # the k=4 regime is run's own: the same SAEs and the same stability as the sweep's row
    assert stab.same_kind.iloc[0] == pytest.approx(sweep.same_kind.iloc[1])
    assert regime.with_regime(run, 8, 4, 3).sae.sae.k == 8 and run.sae.sae.k == 4  # a copy
