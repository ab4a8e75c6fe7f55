"""A small but real run folder for the latent browser tests (and ``benchmarks/widget_bench.py``): random-weight tiny
UNet -> feature stores -> k-SAEs -> latent statistics (with their firing lists) -> taxonomy -> ``sae/hookpoints.csv``.

    from demo_run import demo_run      # tests/ is on the path of every test module
    run_dir = demo_run(paths.cache_dir("demo-run"))
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from conftest import save_tiny_unet
from revelio_nb.browse import slugify
from revelio_nb.run_index import HookpointIndex


def tiny_unet(folder: Path, seed: int) -> Path:
    """A small random-weight pixel UNet as a diffusers folder (16/32 channels; built once per folder)."""
    if (folder / "unet" / "config.json").is_file():
        return folder
    return save_tiny_unet(folder, seed, block_out_channels=(16, 32), norm_num_groups=8)


def _demo_taxonomy(sae, arr, store, dataset: str, folder: Path) -> str:
    """The demo SAE's latent taxonomy (:mod:`revelio_nb.taxonomy`), computed once; the path of its table."""
    from revelio_nb.data import load_dataset
    from revelio_nb.taxonomy import TABLE_FILE, Taxonomy, TaxonomyConfig, attribute_table, sae_taxonomy

    try:
        Taxonomy.load(folder)
    except FileNotFoundError:
        values = attribute_table(load_dataset(dataset), store.indices)
        sae_taxonomy(sae, arr, store.labels, values, store.class_names, TaxonomyConfig(n_shuffles=3)).save(folder)
    return str(folder / TABLE_FILE)


def demo_run(run_dir: str | os.PathLike, *, dataset: str = "animal-mnist", split: str = "test",
             max_images: int = 300, blocks: Sequence[str] = ("mid_block", "up_blocks.0"), t: int = 25,
             spatial_block: str | None = "mid_block", expansion: int = 4, k: int = 4, sae_steps: int = 150,
             top_n: int = 16, seed: int = 0, progress: bool = False) -> Path:
    """A small but real run folder for the browser: random-weight tiny UNet -> feature stores -> k-SAEs -> stats.

    Writes ``<run_dir>/sae/hookpoints.csv`` with one pooled SAE per block and (``spatial_block``) one spatial SAE,
    exactly as notebook 02 does. Takes a few seconds; used by the browser tests and ``benchmarks/widget_bench.py``.
    """
    import torch

    from revelio_nb.features import ExtractionConfig, extract_features
    from revelio_nb.latent_store import load_or_compute
    from revelio_nb.latents import latent_stats
    from revelio_nb.sae import SaeConfig, TrainConfig, train_sae

    run_dir = Path(run_dir).resolve()
    work = run_dir / "demo"
    params = {k: v for k, v in locals().items() if k in ("dataset", "split", "max_images", "t", "spatial_block",
                                                          "expansion", "k", "sae_steps", "top_n", "seed")}
    params["blocks"] = list(blocks)
    params["taxonomy"] = 1  # runs written before latent kinds existed are rebuilt
    params["stats"] = 3  # latent statistics without firing lists are rebuilt
    done = work / "demo.json"
    if done.is_file() and HookpointIndex(run_dir).path.is_file() and json.loads(done.read_text()) == params:
        return run_dir
    model_dir = tiny_unet(work / "model", seed)

    def store(pooling, bl):
        cfg = ExtractionConfig(model=str(model_dir), dataset=dataset, split=split, blocks=list(bl), timesteps=[t],
                               pooling=pooling, max_images=max_images, seed=seed, device="cpu")
        return extract_features(cfg, out_dir=work / f"features-{pooling}", progress=progress)

    pooled = store("mean", blocks)
    jobs = [(b, "mean", pooled) for b in blocks]
    if spatial_block:
        jobs.append((spatial_block, "map", store("map", [spatial_block])))
    rows = []
    for block, pooling, st in jobs:
        name = f"{slugify(block)}-t{t}-{'pooled' if pooling == 'mean' else 'spatial'}"
        arr = st.array(block, t)
        cfg = TrainConfig(sae=SaeConfig(expansion_factor=expansion, k=k, hookpoint=block, timestep=t,
                                        model_id="demo-tiny-unet"),
                          batch_size=1024, steps=sae_steps, warmup_steps=10, seed=seed, checkpoint_every=10_000,
                          device="cpu")
        torch.manual_seed(seed)
        sae = train_sae(arr, cfg, run_dir / "sae" / name / "sae", progress=progress)
        lat_dir = run_dir / "sae" / name / "latents"
        load_or_compute(lat_dir, lambda: latent_stats(sae, arr, st.labels, top_n=top_n, image_index=st.indices,
                                                      class_names=st.class_names, progress=progress))
        rows.append({"hookpoint": f"demo-tiny-unet · {block} · t={t}" + (" · spatial" if pooling == "map" else ""),
                     "model": "demo-tiny-unet", "block": block, "t": t, "pooling": pooling,
                     "sae_dir": str(run_dir / "sae" / name / "sae"), "latents_dir": str(lat_dir),
                     "store_dir": str(st.path), "dataset": dataset, "split": split,
                     "embedding_store_dir": "" if pooling == "mean" else str(pooled.path),
                     "taxonomy_path": _demo_taxonomy(sae, arr, st, dataset, lat_dir / "taxonomy")})
    (run_dir / "sae").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(HookpointIndex(run_dir).path, index=False)
    done.write_text(json.dumps(params))
    return run_dir