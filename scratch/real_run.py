"""Distil embedded:animals-unet-text-lcm into REVELIO_CACHE, time it, and draw 2/4-step LCM vs 25-step DDIM."""
import time, json, resource
import numpy as np, torch
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from revelio_nb.models import load_model
from revelio_nb.models import embedded as E
from revelio_nb.sampling import sample, to_uint8
from revelio_nb import captions as C, distill as DL
from revelio_nb.plots import image_grid
torch.set_num_threads(2)
t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
lcm = load_model("embedded:animals-unet-text-lcm")
print(f"RESULT distill_wall_s={time.time()-t0:.0f} distill_cpu_user_s={resource.getrusage(resource.RUSAGE_SELF).ru_utime-c0:.0f} train_seconds={lcm.info.get('train_seconds')}", flush=True)
teacher = load_model("embedded:animals-unet-text")
losses = np.load(lcm.folder / "losses.npy")
print("loss first 20 / last 20:", losses[:20].mean(), losses[-20:].mean())
names = lcm.class_names
prompts = [C.neutral_prompt(n) for n in names]
rows, labels = [], []
with torch.no_grad():
    ddim = [sample(teacher, 4, prompts=p, steps=25, seed=7) for p in prompts]
    rows.append(torch.cat(ddim)); labels.append("teacher DDIM 25")
    for st in (2, 4):
        rows.append(torch.cat([sample(lcm, 4, prompts=p, steps=st, seed=7) for p in prompts])); labels.append(f"LCM student {st}")
    und = DL.make_student(teacher.denoiser, lcm.denoiser.config.time_cond_proj_dim)
    orig = lcm.denoiser; lcm.denoiser = und.eval()
    rows.append(torch.cat([sample(lcm, 4, prompts=p, steps=4, seed=7) for p in prompts])); labels.append("undistilled teacher, LCM 4")
    lcm.denoiser = orig
ref = rows[0]
for lab, r in zip(labels, rows):
    print(f"{lab}: MSE to DDIM-25 (same start noise) {float((r - ref).pow(2).mean()):.4f}  mean {float(r.mean()):.3f}")
imgs = np.concatenate([to_uint8(r) for r in rows])
fig = image_grid(imgs, ncols=40, cell=0.45, suptitle=" | ".join(labels) + " (rows; 4 seeds x 10 classes)")
fig.savefig("scratch/lcm_vs_ddim.png", dpi=100)
from revelio_nb.plots import loss_curve
f2 = loss_curve(losses, title="LCM distillation loss"); f2.savefig("scratch/lcm_loss.png", dpi=100)
