"""Notebook 06's bias study with DDIM (teacher) and LCM (distilled), full profile sizes; prints the comparison."""
import sys, time
import pandas as pd
from dataclasses import replace
from revelio_nb import bias_study as B, data, models, sampler_study as SS
pd.set_option("display.width", 250); pd.set_option("display.max_columns", 30)
n_seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 128
steps = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [4]
ds = data.load_dataset("animal-mnist+facing")
cfg = B.BiasStudyConfig(n_seeds=n_seeds, seed_sets=3, steps=10, guidance_scale=1.0, t_maps=[0], shrinkage=10.0,
                        map_max_images=3000, retrieval_max_images=0, n_boot=1000, label="training seed 0")
t0 = time.time()
m = models.load_model("embedded:animals-unet-text")
studies = [B.bias_study(m, ds, cfg, progress=False)]
print(f"DDIM study {time.time() - t0:.0f} s", flush=True)
m_lcm = models.load_model("embedded:animals-unet-text-lcm")
for st in steps:
    t0 = time.time()
    c = SS.lcm_study_config(cfg, m_lcm, st, label="training seed 0, LCM-distilled")
    studies.append(B.bias_study(m_lcm, ds, c, progress=False))
    print(f"LCM {st}-step study {time.time() - t0:.0f} s (t_maps {c.t_maps})", flush=True)
comp = SS.sampler_comparison(studies)
comp.to_csv("scratch/sampler_comparison.csv", index=False)
print(comp.drop(columns=["model"]).round(2).to_string())
