"""Time one k-SAE training step: ours vs the floor (one dense encoder GEMM) vs EleutherAI sparsify's eager step.

A step is forward + backward + decoder-gradient projection + Adam + decoder renormalisation + dead-latent
bookkeeping on a batch already in memory (data loading excluded, as for the GEMM). Ours is
``revelio_nb.sae.SaeTrainStep``, the step ``train_sae`` runs. Every contender is timed in interleaved rounds (the
order rotates each round) so that load from other processes hits all alike; medians are reported, by wall clock and
by process CPU time (``--clock`` picks the one the RESULT keys use; the other gets a ``_wall`` / ``_cpu`` suffix).

Contenders, all at the same batch, width, latents, k and thread count:
  gemm      ``torch.addmm(b_enc, x, W_enc.T)``: the floor.
  ours      ``SaeTrainStep`` (exact dense Adam; phase breakdown printed).
  sparsify  ``sparsify.SparseCoder``'s eager training step as its trainer runs it with ``optimizer="adam"``:
            renormalise, forward (fused encoder + embedding_bag decoder), backward, projection,
            ``torch.optim.Adam``, dead-latent bookkeeping. Only if ``eai-sparsify`` is importable (its
            package ``__init__`` imports its trainer's heavy dependencies, so only ``sparsify.sparse_coder`` is
            loaded); ``--sparsify-path`` adds a site-packages folder (e.g. a separate venv's) to ``sys.path``.
  autograd  (``--autograd``) our model's forward + autograd backward + fused ``torch.optim.Adam``: the step
            ``train_sae`` ran before ``SaeTrainStep``.
  naive     (``--naive``, on by default only up to 4096 x 16384) dense scatter + GEMM decode, dense autograd.

    python benchmarks/sae_bench.py                                   # d_in 256, 16384 latents, batch 4096
    python benchmarks/sae_bench.py --d-in 1280 --latents 20480 81920 --batch 2048 --clock cpu \\
        --sparsify-path /work/sparsify-venv/lib/python3.11/site-packages

``--d-in``, ``--latents`` and ``--batch`` take one value or several (a single value is used for every size).
One line per size: ``RESULT d_in=.. latents=.. batch=.. k=.. step_over_gemm=<ours / gemm>
over_sparsify=<ours / sparsify> ...``; ``over_sparsify=nan`` when sparsify is not importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
import types

import torch

from revelio_nb.sae import SaeConfig, SaeTrainStep, SparseAutoencoder

NAIVE_AUTO_MAX = 4096 * 16384  # batch x latents up to which the naive dense step runs by default


def _load_sparsify(path: str | None):
    """``(SparseCoder, SparseCoderConfig)`` from an installed eai-sparsify, or ``(None, reason)``."""
    if path:
        sys.path.append(path)  # appended: torch and numpy stay this interpreter's
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not spec.submodule_search_locations:
        return None, "eai-sparsify is not importable (pip install --no-deps eai-sparsify, or --sparsify-path)"
    if "sparsify" not in sys.modules:  # a bare package: skip __init__, which imports the trainer (datasets, ...)
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # "Triton not installed, using eager ..."
            from sparsify.config import SparseCoderConfig
            from sparsify.sparse_coder import SparseCoder
    except ImportError as err:
        return None, f"sparsify.sparse_coder does not import: {err}"
    return (SparseCoder, SparseCoderConfig), ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sizes(args) -> list[tuple[int, int, int]]:
    lists = [args.d_in, args.latents, args.batch]
    n = max(len(v) for v in lists)
    if any(len(v) not in (1, n) for v in lists):
        raise SystemExit(f"--d-in, --latents and --batch take one value or {n} values each; got "
                         f"{args.d_in}, {args.latents}, {args.batch}")
    return [tuple(v[i] if len(v) > 1 else v[0] for v in lists) for i in range(n)]


def bench_size(d_in: int, latents: int, batch: int, args, device: torch.device, sparsify) -> dict[str, float]:
    torch.manual_seed(0)
    k = args.k
    cfg = SaeConfig(d_in=d_in, num_latents=latents, k=k)
    x = torch.randn(batch, d_in, device=device)
    dead = None
    if args.dead_fraction > 0:
        dead = torch.rand(latents, device=device) < args.dead_fraction
    lr = 2e-4 / math.sqrt(latents / 2**14)
    phases: dict[str, float] = {}

    def make_ours():
        step = SaeTrainStep(SparseAutoencoder(cfg, device=device), lr=lr, auxk_alpha=1 / 32,
                            timings=phases, clock=time.process_time if args.clock == "cpu" else time.perf_counter)

        def run():
            out = step(x, dead_mask=dead)
            out.fvu.item()

        return run

    def make_autograd(dense: bool):
        model = SparseAutoencoder(cfg, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        since = torch.zeros(latents, dtype=torch.long, device=device)

        def run():
            out = model(x, dead_mask=dead, dense=dense)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            model.set_decoder_norm_to_unit_norm()
            with torch.no_grad():
                since.add_(batch)
                since[out.top_idx[out.top_acts > 0]] = 0
            loss.item()

        return run

    def make_sparsify():
        coder_cls, cfg_cls = sparsify
        sae = coder_cls(d_in, cfg_cls(num_latents=latents, k=k, normalize_decoder=True), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=lr)  # sparsify's trainer: torch.optim.Adam(pgs), no flags
        since = torch.zeros(latents, dtype=torch.long, device=device)
        did_fire = torch.zeros(latents, dtype=torch.bool, device=device)

        def run():  # sparsify.Trainer.fit's per-step work for one SAE, auxk_alpha 1/32, no grad accumulation
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x, dead_mask=dead)
            did_fire[out.latent_indices.flatten()] = True
            float(out.fvu.detach())
            loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                since.add_(batch)
                since[did_fire] = 0
                did_fire.zero_()

        return run

    w = torch.randn(latents, d_in, device=device)
    b = torch.zeros(latents, device=device)

    def gemm():
        torch.addmm(b, x, w.t())

    fns = {"gemm": gemm, "ours": make_ours()}
    if sparsify is not None:
        fns["sparsify"] = make_sparsify()
    if args.autograd:
        fns["autograd"] = make_autograd(False)
    if args.naive == "on" or (args.naive == "auto" and batch * latents <= NAIVE_AUTO_MAX):
        fns["naive"] = make_autograd(True)

    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    flops = 2 * batch * d_in * latents
    load0 = os.getloadavg()[0]
    print(f"\n== d_in={d_in} latents={latents} batch={batch} k={k} device={device} threads={torch.get_num_threads()} "
          f"dead_fraction={args.dead_fraction} contenders={','.join(names)} load={load0:.2f}", flush=True)
    per_round: list[dict[str, float]] = []
    for r in range(args.steps + args.warmup):
        order = names[r % len(names):] + names[: r % len(names)]
        before = dict(phases)
        for name in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= args.warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
        if r >= args.warmup:
            per_round.append({p: phases[p] - before.get(p, 0.0) for p in phases})
            print(f"round {r - args.warmup + 1}/{args.steps} (load {os.getloadavg()[0]:.2f}): "
                  + "  ".join(f"{n}={wall[n][-1] * 1e3:.0f}/{cpu[n][-1] * 1e3:.0f}ms" for n in names)
                  + "  (wall/cpu)", flush=True)
    med_w = {n: statistics.median(v) for n, v in wall.items()}
    med_c = {n: statistics.median(v) for n, v in cpu.items()}
    for n in names:
        print(f"{n:>9}: median wall {med_w[n] * 1e3:8.1f} ms  cpu {med_c[n] * 1e3:8.1f} ms  "
              f"(min wall {min(wall[n]) * 1e3:8.1f} ms)"
              + (f"  {flops / med_w[n] / 1e9:.0f} GFLOP/s wall" if n == "gemm" else ""))
    ours_phase = {p: statistics.median(rd.get(p, 0.0) for rd in per_round) for p in phases}
    total = sum(ours_phase.values())
    print(f"ours, phases ({args.clock} clock, median per step, in units of the gemm): "
          + "  ".join(f"{p}={v * 1e3:.0f}ms ({v / (med_c if args.clock == 'cpu' else med_w)['gemm']:.3f})"
                      for p, v in ours_phase.items()) + f"  sum={total * 1e3:.0f}ms")
    prim, other = (med_c, med_w) if args.clock == "cpu" else (med_w, med_c)
    suffix = "_wall" if args.clock == "cpu" else "_cpu"
    nan = float("nan")
    res = {"d_in": d_in, "latents": latents, "batch": batch, "k": k,
           "step_over_gemm": prim["ours"] / prim["gemm"],
           "over_sparsify": prim["ours"] / prim["sparsify"] if "sparsify" in prim else nan,
           f"step_over_gemm{suffix}": other["ours"] / other["gemm"],
           f"over_sparsify{suffix}": other["ours"] / other["sparsify"] if "sparsify" in other else nan}
    if "autograd" in prim:
        res["autograd_over_gemm"] = prim["autograd"] / prim["gemm"]
    if "naive" in prim:
        res["speedup_vs_naive"] = prim["naive"] / prim["ours"]
    res["gemm_ms"] = prim["gemm"] * 1e3
    res["load"] = (load0 + os.getloadavg()[0]) / 2
    print("RESULT " + " ".join(f"{key}={v}" if isinstance(v, int) else f"{key}={v:.3f}" for key, v in res.items()),
          flush=True)
    return res


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-in", type=int, nargs="+", default=[256])
    ap.add_argument("--latents", "--num-latents", type=int, nargs="+", default=[16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[4096])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the project machine has 2 cores)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="clock of the RESULT keys: wall (default) or process CPU time (steadier on a shared machine)")
    ap.add_argument("--dead-fraction", type=float, default=0.0,
                    help="mark this fraction of latents dead so the AuxK path is timed too")
    ap.add_argument("--sparsify-path", default=None,
                    help="a site-packages folder holding eai-sparsify (appended to sys.path)")
    ap.add_argument("--no-sparsify", action="store_true", help="skip sparsify even if importable")
    ap.add_argument("--autograd", action="store_true", help="also time the autograd step (train_sae's old step)")
    ap.add_argument("--naive", choices=("auto", "on", "off"), default="auto",
                    help=f"dense reference step (auto: only if batch x latents <= {NAIVE_AUTO_MAX})")
    ap.add_argument("--skip-naive", action="store_const", const="off", dest="naive", help="same as --naive off")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sparsify, why = (None, "--no-sparsify") if args.no_sparsify else _load_sparsify(args.sparsify_path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock for RESULT: {args.clock}; "
          f"sparsify: {'eai-sparsify ' + _sparsify_version() if sparsify else 'skipped (' + why + ')'}", flush=True)
    return [bench_size(d, m, b, args, device, sparsify) for d, m, b in _sizes(args)]


def _sparsify_version() -> str:
    try:
        from importlib.metadata import version

        return version("eai-sparsify")
    except Exception:  # noqa: BLE001 - only for the log line
        return "(version unknown)"


if __name__ == "__main__":
    main()
