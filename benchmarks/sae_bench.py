"""Time one k-SAE training step: ours (sparse) vs a naive dense one vs the floor, one dense encoder GEMM.

A step is forward + backward + decoder-gradient projection + Adam + decoder renormalisation + dead-latent
bookkeeping on a batch already in memory (data loading excluded, as for the GEMM). The three are timed in
interleaved rounds so that load from other processes hits all alike; medians are reported.

    python benchmarks/sae_bench.py [--device cpu] [--batch 4096] [--d-in 256] [--num-latents 16384] [--k 32]

Last line: ``RESULT step_over_gemm=<ours / gemm> speedup_vs_naive=<naive / ours>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from revelio_nb.sae import SaeConfig, SparseAutoencoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, clock=time.perf_counter) -> float:
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    return clock() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--num-latents", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the project machine has 2 cores)")
    ap.add_argument("--skip-naive", action="store_true", help="time only ours and the GEMM")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock (default) or process CPU time (steadier on a shared machine; CPU only)")
    ap.add_argument("--dead-fraction", type=float, default=0.0,
                    help="mark this fraction of latents dead so the AuxK path is timed too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)

    cfg = SaeConfig(d_in=args.d_in, num_latents=args.num_latents, k=args.k)
    x = torch.randn(args.batch, args.d_in, device=device)
    dead = None
    if args.dead_fraction > 0:
        dead = torch.rand(args.num_latents, device=device) < args.dead_fraction

    def make_step(dense: bool):
        model = SparseAutoencoder(cfg, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        since = torch.zeros(args.num_latents, dtype=torch.long, device=device)

        def step():
            out = model(x, dead_mask=dead, dense=dense)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            model.set_decoder_norm_to_unit_norm()
            with torch.no_grad():
                since.add_(args.batch)
                since[out.top_idx[out.top_acts > 0]] = 0
            loss.item()

        return step

    w = torch.randn(args.num_latents, args.d_in, device=device)
    b = torch.zeros(args.num_latents, device=device)

    def gemm():
        torch.addmm(b, x, w.t())

    fns = {"gemm": gemm, "ours": make_step(False), "naive": make_step(True)}
    if args.skip_naive:
        fns.pop("naive")
    times: dict[str, list[float]] = {name: [] for name in fns}
    flops = 2 * args.batch * args.d_in * args.num_latents
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} d_in={args.d_in} "
          f"num_latents={args.num_latents} k={args.k} dead_fraction={args.dead_fraction} clock={args.clock}",
          flush=True)
    for r in range(args.steps + 2):
        for name, fn in fns.items():
            t = _timed(fn, device, clock)
            if r >= 2:
                times[name].append(t)
        if r >= 2:
            print(f"round {r - 1}/{args.steps}: " + "  ".join(f"{n}={times[n][-1] * 1e3:.1f}ms" for n in fns),
                  flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in fns:
        print(f"{name:>6}: median {med[name] * 1e3:8.1f} ms  min {min(times[name]) * 1e3:8.1f} ms"
              + (f"  ({flops / med[name] / 1e9:.0f} GFLOP/s)" if name == "gemm" else ""))
    result = {"step_over_gemm": med["ours"] / med["gemm"],
              "speedup_vs_naive": med["naive"] / med["ours"] if "naive" in med else float("nan")}
    print(f"RESULT step_over_gemm={result['step_over_gemm']:.3f} speedup_vs_naive={result['speedup_vs_naive']:.2f}")
    return result


if __name__ == "__main__":
    main()
