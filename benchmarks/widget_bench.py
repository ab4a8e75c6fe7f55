"""Time one slider move of the latent browser (Python side: everything the kernel does between the slider's new
value and the last widget update), for the PNG-thumbnail widgets we ship and, for comparison, for re-drawing the
same content as one matplotlib figure (what an ``Output`` widget would display).

A move: look up the latent in the sort order, gather its stats / top images / firing images (array indexing),
PNG-encode thumbnails not seen before (with heatmaps for spatial SAEs), draw the firing images on the pre-rendered
dataset view, update the widgets. "cold" moves visit latents for the first time (thumbnail cache empty), "warm"
moves revisit them. Uses the run's real hookpoints when ``<run-dir>/sae/hookpoints.csv`` exists, else a demo run
(random-weight tiny UNet on the whole Animal-MNIST test split, 2000 images, so a latent can light up to 2000 points).

    python benchmarks/widget_bench.py [--run-dir results/default] [--moves 60] [--top-n 16]

Last line: ``RESULT update_ms=<median cold move> update_p95_ms=... warm_update_ms=... matplotlib_update_ms=...``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _move(browser, position: int) -> float:
    """ms for one slider assignment: observers, rendering, widget state serialisation (the comm send is a no-op
    outside a kernel; the browser test measures the full click-to-pixels round trip in JupyterLab)."""
    t0 = time.perf_counter()
    browser.slider.value = int(position)
    return (time.perf_counter() - t0) * 1000


def _matplotlib_move(browser) -> float:
    """The alternative: redraw grid + bars + scatter as one figure and render it to PNG (as the inline backend does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from revelio_nb.browse import compose_image

    t0 = time.perf_counter()
    v, d = browser.view, browser.data
    n = len(v.images)
    fig = plt.figure(figsize=(12, 4.2))
    gs = fig.add_gridspec(2, 10)
    for r in range(min(n, 16)):
        ax = fig.add_subplot(gs[r // 8, r % 8])
        ax.imshow(np.asarray(compose_image(d, int(v.images[r]), v.latent, r, d.spatial)), interpolation="nearest")
        ax.set_title(f"{v.values[r]:.3g}", fontsize=6)
        ax.axis("off")
    ax = fig.add_subplot(gs[0, 8:])
    if v.label_counts is not None:
        ax.barh(np.arange(len(v.label_counts)), v.label_counts)
    ax = fig.add_subplot(gs[1, 8:])
    ax.scatter(d.points[:, 0], d.points[:, 1], s=3, c=d.point_labels, cmap="tab10", alpha=0.3)
    ax.scatter(d.points[v.firing_points, 0], d.points[v.firing_points, 1], s=6, c="k")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=str(ROOT / "results" / "default"))
    ap.add_argument("--moves", type=int, default=60, help="slider moves per hookpoint (cold, then the same warm)")
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--matplotlib-moves", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from revelio_nb import browse
    from revelio_nb.run_index import HookpointIndex

    run = Path(args.run_dir)
    if not HookpointIndex(run).exists():
        run = ROOT / "benchmarks" / "out" / "widget-demo"
        print(f"no hookpoints in {args.run_dir}; building a demo run in {run} (once)", flush=True)
        sys.path.insert(0, str(ROOT / "tests"))  # the demo run is a test fixture (tests/demo_run.py)
        from demo_run import demo_run

        demo_run(run, max_images=2000, expansion=16, k=8, sae_steps=300, progress=True)
    t0 = time.perf_counter()
    b = browse.LatentBrowser(run, top_n=args.top_n, progress=False)
    print(f"opened {run}: {len(b.hookpoint_dd.options)} hookpoints ({time.perf_counter() - t0:.1f} s incl. first "
          f"hookpoint load / caches)", flush=True)
    rng = np.random.default_rng(args.seed)
    cold, warm, mpl, per_hp = [], [], [], []
    for label in b.hookpoint_dd.options:
        b.hookpoint_dd.value = label
        if b.data is None:
            print(f"  skip {label}: {b.message}")
            continue
        b.heatmap_cb.value = True
        b.dead_cb.value = True
        n = len(b.order)
        pos = rng.choice(n, size=min(args.moves, n), replace=False)
        pos = pos[pos != b.slider.value]
        hp_cold = [_move(b, p) for p in pos]
        hp_warm = [_move(b, p) for p in pos]  # revisit the same latents: thumbnails cached
        cold += hp_cold
        warm += hp_warm
        mpl += [_matplotlib_move(b) for _ in range(args.matplotlib_moves)]
        fire = [len(b.data.firing_images(int(l))[0]) for l in b.order[pos]]
        per_hp.append((label, len(hp_cold), statistics.median(hp_cold), statistics.median(hp_warm), b.data.spatial,
                       len(b.data.points), int(np.median(fire))))
    if not cold:
        print("nothing to time", file=sys.stderr)
        return {}
    for label, m, c, w, sp, pts, fire in per_hp:
        print(f"  {label:<55s} {m:3d} moves  cold {c:6.1f} ms  warm {w:6.1f} ms  spatial={sp}  points={pts}  "
              f"median firing images={fire}")
    res = {"update_ms": statistics.median(cold), "update_p95_ms": float(np.percentile(cold, 95)),
           "warm_update_ms": statistics.median(warm), "matplotlib_update_ms": statistics.median(mpl),
           "moves": len(cold), "hookpoints": len(per_hp)}
    print("RESULT " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
