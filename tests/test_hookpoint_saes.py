import pandas as pd
import pytest

from revelio_nb import hookpoint_saes as hp
from revelio_nb import sae
from revelio_nb.run_index import HookpointIndex


def small_run(path, pooling="mean"):
    cfg = sae.TrainConfig(sae=sae.SaeConfig(k=4, expansion_factor=2), epochs=3, batch_size=32)
    return hp.HookpointRun(model=str(path), store_blocks=["mid_block", "up_blocks.0"], store_timesteps=[10, 100],
                           pooling=pooling, max_images=40, sae=cfg, top_n=4)


def test_index_written_and_cached(tiny_unet_path, tmp_path):
    run = small_run(tiny_unet_path)
    rows = hp.train_hookpoints(run, [("mid_block", 10), ("up_blocks.0", 100)], progress=False)
    table = hp.write_index(tmp_path / "run", rows)
    saved = pd.read_csv(tmp_path / "run" / "sae" / "hookpoints.csv")
    assert set(HookpointIndex.COLUMNS) <= set(saved.columns) and len(saved) == 2
    assert saved.block.tolist() == ["mid_block", "up_blocks.0"] and saved.t.tolist() == [10, 100]
    assert (saved.split == "test").all() and (saved.dead_fraction.between(0, 1)).all()
    # the taxonomy of every SAE is cached beside its latent statistics and pointed to by the index
    from revelio_nb.taxonomy import KINDS, Taxonomy
    for _, r in saved.iterrows():
        tax = Taxonomy.load(r.taxonomy_path)
        assert len(tax.table) == r.num_latents and sum(r[f"n_{k}"] for k in KINDS) == r.num_latents
        assert tax.table.kind.isin(KINDS).all() and tax.meta["n_images"] == 40
        assert r.taxonomy_path.startswith(r.latents_dir)
        assert "size" in tax.meta["attributes"] and (tax.table.kind == "dead").sum() == round(r.dead_fraction * r.num_latents)
    sae_file = rows[0]["sae_dir"] + "/sae.safetensors"
    import os
    before = os.stat(sae_file).st_mtime_ns
    again = hp.train_hookpoints(run, [("mid_block", 10)], progress=False)
    assert again[0]["sae_dir"] == rows[0]["sae_dir"] and os.stat(sae_file).st_mtime_ns == before  # not retrained
    assert again[0]["fvu"] == pytest.approx(rows[0]["fvu"])
    assert again[0]["taxonomy_path"] == rows[0]["taxonomy_path"] and again[0]["n_dead"] == rows[0]["n_dead"]
    merged = hp.write_index(tmp_path / "run", again)  # same label replaces, others kept
    assert len(merged) == 2 and len(table) == 2


def test_spatial_hookpoint_has_pooled_embedding_store(tiny_unet_path):
    row = hp.train_hookpoints(small_run(tiny_unet_path, "map"), [("mid_block", 10)], progress=False)[0]
    assert row["pooling"] == "map" and row["embedding_store_dir"] != row["store_dir"]
    from revelio_nb.features import FeatureStore
    assert FeatureStore.open(row["embedding_store_dir"]).config["pooling"] == "mean"


def test_hookpoint_outside_store_is_an_error(tiny_unet_path):
    with pytest.raises(ValueError, match="not in the store"):
        hp.train_hookpoint(small_run(tiny_unet_path), "mid_block", 999)
