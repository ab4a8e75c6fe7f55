"""The one pooling vocabulary: its checker, and files written by earlier versions (old spellings) read as today's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from revelio_nb import pooling as P


def test_vocabulary_and_checker():
    assert P.POOLINGS == ("mean", "map", "flat", "tokens")
    assert set(P.STORE_POOLINGS + P.PROBE_POOLINGS + P.H_FORMS) <= set(P.POOLINGS)
    assert set(P.SAE_POOLINGS) == {P.AUTO, P.MEAN, P.TOKENS}
    assert P.check_pooling("map", P.STORE_POOLINGS) == "map"
    with pytest.raises(P.PoolingError, match=r"^pooling 'max' is not one of \['mean', 'map'\]$"):
        P.check_pooling("max", P.STORE_POOLINGS)
    assert issubclass(P.PoolingError, ValueError)
    # an old spelling is refused with its new name, whatever it was for
    for old, new, allowed in (("none", "map", P.STORE_POOLINGS), ("flatten", "flat", P.PROBE_POOLINGS),
                              ("pooled", "mean", P.H_FORMS), ("spatial", "tokens", P.SAE_POOLINGS)):
        with pytest.raises(ValueError, match=f"probe pool '{old}' is not one of .*'{old}' is now '{new}'"):
            P.check_pooling(old, allowed, "probe pool")
    # the caller's own error class
    class OwnError(ValueError):
        pass

    with pytest.raises(OwnError, match="form 3 is not one of"):
        P.check_pooling(3, P.H_FORMS, "form", error=OwnError)


def test_each_user_refuses_an_old_spelling_with_its_new_name():
    from revelio_nb.features import ExtractionConfig
    from revelio_nb.probes import ProbeData, ProbeError
    from revelio_nb.sae import SaeConfig, SaeError

    with pytest.raises(P.PoolingError, match="'none' is now 'map'"):
        ExtractionConfig(pooling="none").validate()
    x = np.zeros((4, 2, 3, 3), np.float32)
    with pytest.raises(ProbeError, match="'flatten' is now 'flat'"):
        ProbeData(x, np.arange(4) % 2, x, np.arange(4) % 2, pool="flatten")
    with pytest.raises(SaeError, match="'pooled' is now 'mean'"):
        SaeConfig(pooling="pooled")
    from revelio_nb.directions import BiasStudyConfig

    with pytest.raises(ValueError, match="'pooled' is now 'mean'"):
        BiasStudyConfig(form="pooled").validate()


def test_read_pooling_normalises_old_spellings_only():
    assert [P.read_pooling(v) for v in ("none", "flatten", "pooled", "spatial")] == ["map", "flat", "mean", "tokens"]
    assert [P.read_pooling(v) for v in ("mean", "map", "encoder", None)] == ["mean", "map", "encoder", None]
    assert P.read_pooling("none", P.STORE_POOLINGS) == "map"
    with pytest.raises(P.PoolingError, match="'spatial' is not one of .*'spatial' is now 'tokens'"):
        P.read_pooling("spatial", P.STORE_POOLINGS)
    rec = {"tokens": "spatial", "k": 4}
    assert P.read_pooling_field(rec, old_keys=("tokens",)) == {"pooling": "tokens", "k": 4}
    assert rec == {"tokens": "spatial", "k": 4}  # a copy
    assert P.read_pooling_field({"pooling": "none"}) == {"pooling": "map"}
    assert P.read_pooling_field({"k": 4}) == {"k": 4}


# ------------------------------------------------------------------------------ files of earlier versions


def test_store_manifest_with_pooling_none_reads_as_map(tmp_path):
    """A complete feature store whose manifest (written by hand as before) says pooling "none"."""
    from revelio_nb.features import FeatureStore

    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.save(tmp_path / "mid_block@t25.npy", maps)
    np.save(tmp_path / "labels.npy", np.array([0, 1]))
    np.save(tmp_path / "indices.npy", np.array([5, 9]))
    config = {"model": "m", "dataset": "d", "split": "train", "blocks": ["mid_block"], "timesteps": [25],
              "pooling": "none", "n_noise": 1, "seed": 0, "store_dtype": "float32"}
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "revelio-feature-store/1", "config": config, "weights_hash": "w", "class_names": ["a", "b"],
        "n_rows": 2, "chunk_size": 2, "n_chunks": 1, "status": "complete",
        "arrays": {"mid_block@t25": {"file": "mid_block@t25.npy", "block": "mid_block", "t": 25,
                                     "shape": [2, 3, 2, 2]}}}))
    store = FeatureStore.open(tmp_path, expect={"pooling": "map", "blocks": ["mid_block"]}, weights_hash="w")
    assert store.config["pooling"] == "map" and "pooling=map" in repr(store)
    np.testing.assert_array_equal(store.array("mid_block", 25), maps)
    with pytest.raises(Exception, match="pooling: store has 'map', asked for 'mean'"):
        FeatureStore.open(tmp_path, expect={"pooling": "mean"})


def test_sae_cfg_json_with_tokens_reads_as_pooling(tmp_path):
    """An SAE folder whose cfg.json (written by hand as before) names the field ``tokens`` with "spatial"."""
    import torch
    from safetensors.torch import save_file

    from revelio_nb.sae import SparseAutoencoder

    d, m = 4, 8
    torch.manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    save_file({"encoder.weight": w_dec.clone(), "encoder.bias": torch.zeros(m), "W_dec": w_dec,
               "b_dec": torch.zeros(d)}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "expansion_factor": 2, "normalize_decoder": True, "num_latents": m, "k": 2, "multi_topk": False,
        "skip_connection": False, "d_in": d, "normalize_input": True, "b_dec_init": "median", "tokens": "spatial",
        "hookpoint": "mid_block", "timestep": 25, "model_id": "m", "input_scale": 1.0, "layout_version": 2,
        "grid": [2, 2], "format": "sparsify"}))
    sae = SparseAutoencoder.load(tmp_path, d_in=d)
    assert sae.cfg.pooling == "tokens" and sae.grid == (2, 2) and sae.k == 2
    assert json.loads(json.dumps(sae.config_dict()))["pooling"] == "tokens"  # written back in today's spelling
    (tmp_path / "cfg.json").write_text((tmp_path / "cfg.json").read_text().replace('"spatial"', '"pooled"'))
    assert SparseAutoencoder.load(tmp_path).cfg.pooling == "mean"


def test_hookpoints_csv_with_pooling_none_reads_as_map(tmp_path):
    """A run index written by hand as before (pooling "none" / "mean"): read and merged in today's spelling."""
    from revelio_nb.run_index import HookpointIndex, RunIndexError

    (tmp_path / "sae").mkdir()
    header = "hookpoint,model,block,t,pooling,sae_dir,latents_dir,store_dir,dataset,split\n"
    (tmp_path / "sae" / "hookpoints.csv").write_text(
        header + "m · mid · spatial,m,mid,25,none,s1,l1,st1,digits,test\n"
                 "m · mid,m,mid,25,mean,s2,l2,st2,digits,test\n")
    index = HookpointIndex(tmp_path)
    assert index.read()["pooling"].tolist() == ["map", "mean"]
    new = {"hookpoint": "m · up", "model": "m", "block": "up", "t": 25, "pooling": "map", "sae_dir": "s3",
           "latents_dir": "l3", "store_dir": "st3", "dataset": "digits", "split": "test"}
    index.write([new])
    assert pd.read_csv(index.path)["pooling"].tolist() == ["map", "mean", "map"]  # old rows rewritten
    (tmp_path / "sae" / "hookpoints.csv").write_text(header + "m · mid,m,mid,25,spatial,s1,l1,st1,digits,test\n")
    with pytest.raises(RunIndexError, match=r"row 0, column pooling 'spatial' is not one of \['mean', 'map'\] "
                                            r"\('spatial' is now 'tokens'\)"):
        index.read()  # an SAE's old word is not a store pooling
