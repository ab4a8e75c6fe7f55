"""Images/s of mid_block feature extraction with and without early exit on the embedded UNet.

    python benchmarks/extract_bench.py [--model embedded:animals-unet] [--block mid_block] [--images 512]

Early exit stops the forward pass once the requested block has fired, so the decoder (up blocks) never runs.
Extraction is timed end to end (noise, denoise, pooling), excluding model loading, with the store written to a
temporary folder. Ends with: RESULT early_exit_speedup=... images_per_s=... images_per_s_full=...
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from revelio_nb import features as F
from revelio_nb.data import load_dataset
from revelio_nb.models import load_model


def timed_extraction(model, ds, cfg, early_exit: bool, repeats: int) -> float:
    """Best-of-``repeats`` images/s of a full extraction into a temporary store."""
    best = 0.0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            F.extract_features(cfg, model=model, dataset=ds, out_dir=Path(tmp) / "s", progress=False, verify=False,
                               early_exit=early_exit)
            best = max(best, cfg.max_images / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:animals-unet")
    p.add_argument("--train-steps", type=int, default=None, help="embedded model budget (default: its own)")
    p.add_argument("--block", default="mid_block")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--timestep", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    model = load_model(a.model, train_steps=a.train_steps)
    device = F.resolve_device(a.device)
    model.to(device)
    ds = load_dataset(model.info.get("dataset") or "animal-mnist")
    cfg = F.ExtractionConfig(model=a.model, blocks=[a.block], timesteps=[a.timestep], max_images=a.images,
                             batch_size=a.batch, train_steps=a.train_steps, device=str(device))
    timed_extraction(model, ds, F.ExtractionConfig(**{**cfg.__dict__, "max_images": a.batch}), True, 1)  # warm-up
    full = timed_extraction(model, ds, cfg, early_exit=False, repeats=a.repeats)
    early = timed_extraction(model, ds, cfg, early_exit=True, repeats=a.repeats)
    print(f"device={device} threads={torch.get_num_threads()} model={model.model_id} block={a.block} images={a.images}")
    print(f"full forward:  {full:8.1f} images/s")
    print(f"early exit:    {early:8.1f} images/s")
    print(f"RESULT early_exit_speedup={early / full:.2f} images_per_s={early:.1f} images_per_s_full={full:.1f}")


if __name__ == "__main__":
    main()
