"""k-SAE training: :func:`train_sae` trains, resumes or just loads a finished run, keeping ``out_dir`` a valid
sparsify folder with the last checkpoint (``optimizer.safetensors`` commits it: raw parameters, optimizer state,
train state); :class:`SaeTrainingError` when features or loss go non-finite."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .. import artifacts
from ..paths import atomic_path, atomic_write_json
from ..pooling import AUTO, MEAN, TOKENS, read_pooling_field
from .config import SaeError, TrainConfig
from .model import SAE_LAYOUT_VERSION, SparseAutoencoder, checkpoint_metadata
from .source import ArraySource, as_source, batch_tokens
from .step import SaeTrainStep


class SaeTrainingError(RuntimeError):
    """Training stopped (non-finite features or loss); the last good checkpoint is left untouched."""

    def __init__(self, message: str, step: int, last_checkpoint_step: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint_step = last_checkpoint_step


def _view_is_current(folder: Path, step: int) -> bool:
    """Whether the sparsify view (``sae.safetensors`` + ``cfg.json``) holds ``step`` in the current layout."""
    try:
        return (checkpoint_metadata(folder).get("step") == str(step)
                and json.loads((folder / "cfg.json").read_text()).get("layout_version") == SAE_LAYOUT_VERSION)
    except (OSError, ValueError, SafetensorError):
        return False


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * (y.norm() + 1e-12)
        y = y_new
        if done:
            break
    return y


def _lr_at(step: int, steps: int, base: float, warmup: int, decay_fraction: float) -> float:
    lr = base * min(1.0, (step + 1) / max(1, warmup))
    decay = int(steps * decay_fraction)
    if decay > 0 and step >= steps - decay:
        lr *= (steps - step) / decay
    return lr


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_optimizer(path: Path, opt: torch.optim.Optimizer, extra: dict[str, Tensor], step: int,
                    metadata: dict[str, str] | None = None) -> None:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{name}": t.detach().cpu().contiguous() for i, st in sd["state"].items()
               for name, t in st.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), "step": str(step)})


def _load_optimizer(path: Path, opt: torch.optim.Optimizer, device: torch.device) -> dict[str, Tensor]:
    tensors = load_file(str(path), device=str(device))
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    extra = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
        else:
            extra[key] = t
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return extra


def _run_signature(cfg: TrainConfig, source: ArraySource) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption: the hyper-parameters that change the
    weights (the SAE cache key's, :func:`revelio_nb.artifacts.sae_train_identity`: device, save cadence and labels
    may change) and the features (:meth:`ArraySource.fingerprint`, their content included)."""
    return {"train_cfg": artifacts.sae_train_identity(cfg), "source": source.fingerprint()}


def _read_signature(signature: Any) -> Any:
    """A run signature read from a checkpoint: one of an earlier version names ``SaeConfig.pooling`` ``tokens``."""
    sae = signature.get("train_cfg", {}).get("sae") if isinstance(signature, dict) else None
    if not isinstance(sae, dict):
        return signature
    return {**signature, "train_cfg": {**signature["train_cfg"], "sae": read_pooling_field(sae, old_keys=("tokens",))}}


def train_sae(source, cfg: TrainConfig, out_dir: str | os.PathLike, *, stop_after: int | None = None,
              init: SparseAutoencoder | None = None, progress: bool = True) -> SparseAutoencoder:
    """Train (or resume, or just load if finished) a k-SAE on ``source`` and keep it in ``out_dir``.

    ``source``: an :class:`ArraySource` or an (N, D) / (N, C, H, W) array or memmap. Batches are shuffled token
    gathers; the order depends only on (seed, step), so an interrupted run resumes exactly. ``out_dir`` is always a
    valid sparsify folder holding the last checkpoint. ``stop_after`` ends after that many steps (checkpointed).
    ``init``: start from a copy of this model instead of a fresh initialisation (ignored when resuming).
    Non-finite features or loss raise :class:`SaeTrainingError` without touching the last checkpoint.
    """
    source = as_source(source)
    out_dir = Path(out_dir)
    device = _device(cfg.device)
    sae_cfg = cfg.sae.resolved(source.d_in)
    kind = TOKENS if source.spatial else MEAN
    if sae_cfg.pooling not in (AUTO, kind):
        raise SaeError(f"SaeConfig.pooling={sae_cfg.pooling!r} but the features have shape "
                       f"{tuple(source.array.shape)} (pooling {kind!r})")
    sae_cfg.pooling = kind
    n = source.n_tokens
    bs = min(cfg.batch_size, n)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * n / bs))
    base_lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(sae_cfg.num_latents / 2**14)
    warmup = min(cfg.warmup_steps, max(1, steps // 10))
    dead_after = cfg.dead_tokens_threshold or min(10_000_000, n)
    signature = _run_signature(cfg, source)

    # optimizer.safetensors is the one file that commits a checkpoint: it holds the raw parameters, the optimizer
    # state and the train state, and is written first (atomically); sae.safetensors (the sparsify view) and
    # train_state.json follow, and are rewritten from it if a kill landed between the writes.
    state_path, opt_path = out_dir / "train_state.json", out_dir / "optimizer.safetensors"
    resume_params: dict[str, Tensor] = {}
    if opt_path.is_file():
        with safe_open(str(opt_path), framework="pt") as f:
            meta = f.metadata() or {}
            if "train_state" not in meta:
                raise SaeError(f"{opt_path} carries no train state (written by another version?): "
                               "delete the folder to start over")
            resume_params = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("param.")}
        state = json.loads(meta["train_state"])
        if _read_signature(state.get("signature")) != signature:
            raise SaeError(f"{out_dir} holds a run with another config or other features; "
                           "use a new out_dir (or delete this one) to start over")
        step = int(meta["step"])
        model = SparseAutoencoder(sae_cfg, device=device)
        model.load_state_dict({k: v.to(device) for k, v in resume_params.items()})
        model.input_scale = float(meta["input_scale"])
        model.grid = source.grid if source.spatial else None
        if not _view_is_current(out_dir, step) or not state_path.is_file() \
                or json.loads(state_path.read_text()).get("step") != step:
            model.save(out_dir, metadata={"step": str(step)})  # repair the view (interrupted save, older layout)
            atomic_write_json(state_path, state)
    elif init is not None:
        step = 0
        if (init.d_in, init.num_latents, init.k) != (sae_cfg.d_in, sae_cfg.num_latents, sae_cfg.k):
            raise SaeError(f"init model has (d_in, num_latents, k) = {(init.d_in, init.num_latents, init.k)}, "
                           f"the config {(sae_cfg.d_in, sae_cfg.num_latents, sae_cfg.k)}")
        model = SparseAutoencoder(sae_cfg, device=device)
        model.load_state_dict(init.state_dict())
        model.input_scale = init.input_scale
        model.grid = source.grid if source.spatial else None
    else:
        step = 0
        torch.manual_seed(cfg.seed)
        model = SparseAutoencoder(sae_cfg, device=device)
        model.grid = source.grid if source.spatial else None
        n_init = min(n, cfg.init_tokens)
        init_tok = np.concatenate([batch_tokens(s, bs, n, cfg.seed) for s in range(math.ceil(n_init / bs))])[:n_init]
        init_tok = np.sort(init_tok)
        x0 = torch.from_numpy(source.gather(init_tok)).to(device, torch.float32)
        if not torch.isfinite(x0).all():
            bad = np.unique(source.locate(init_tok[~torch.isfinite(x0).all(1).cpu().numpy()])[0])
            raise SaeTrainingError(f"non-finite features in the initialisation sample (array rows "
                                   f"{bad[:8].tolist()}); nothing was saved", 0, None)
        with torch.no_grad():
            if sae_cfg.normalize_input:
                rms = (x0 - x0.mean(0)).pow(2).sum(1).mean().div(source.d_in).sqrt().item()
                model.input_scale = 2.0 ** round(math.log2(rms)) if rms > 0 else 1.0
            x0 = x0 / model.input_scale
            if sae_cfg.b_dec_init == "median":
                model.b_dec.copy_(geometric_median(x0))
            elif sae_cfg.b_dec_init == "mean":
                model.b_dec.copy_(x0.mean(0))

    trainer = SaeTrainStep(model, lr=base_lr, betas=cfg.betas, eps=cfg.eps, auxk_alpha=cfg.auxk_alpha,
                           dead_after=dead_after)
    opt = trainer.optimizer
    last_ckpt = step if resume_params else None
    if resume_params:
        trainer.since_fired = _load_optimizer(opt_path, opt, device)["since_fired"]

    def checkpoint(done_steps: int) -> None:
        nonlocal last_ckpt
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise SaeTrainingError(f"non-finite parameters {bad} after step {done_steps - 1}; not saved. "
                                   f"Last good checkpoint: {out_dir} after {last_ckpt} steps",
                                   done_steps - 1, last_ckpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        train_state = {"step": done_steps, "steps": steps, "lr": base_lr, "batch_size": bs,
                       "dead_tokens_threshold": dead_after, "signature": signature}
        params = {f"param.{k}": v for k, v in model.state_dict().items()}
        _save_optimizer(opt_path, opt, {"since_fired": trainer.since_fired, **params}, done_steps,
                        {"train_state": json.dumps(train_state), "input_scale": repr(float(model.input_scale))})
        model.save(out_dir, metadata={"step": str(done_steps)})
        atomic_write_json(out_dir / "train_cfg.json", asdict(cfg))
        atomic_write_json(state_path, train_state)
        last_ckpt = done_steps

    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(total=end, initial=step, desc="k-SAE", disable=not progress, dynamic_ncols=True)
    fvu_ema = None
    try:
        while step < end:
            tokens = batch_tokens(step, bs, n, cfg.seed)
            x = torch.from_numpy(source.gather(tokens)).to(device)
            if not torch.isfinite(x).all():
                bad = np.unique(source.locate(tokens[~torch.isfinite(x).all(1).cpu().numpy()])[0])
                raise SaeTrainingError(
                    f"non-finite features in training step {step} (array rows {bad[:8].tolist()}); "
                    f"last good checkpoint: {out_dir} after {last_ckpt} steps", step, last_ckpt)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, base_lr, warmup, cfg.decay_fraction)
            out = trainer.forward(x)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
            fvu = out.fvu.item()
            if not math.isfinite(loss.item()):
                raise SaeTrainingError(
                    f"non-finite loss in training step {step} (fvu={fvu}, auxk={out.auxk_loss.item()}); "
                    f"last good checkpoint: {out_dir} after {last_ckpt} steps", step, last_ckpt)
            trainer.update()  # sparse gradients, decoder-gradient projection, Adam, renormalisation, bookkeeping
            step += 1
            fvu_ema = fvu if fvu_ema is None else 0.9 * fvu_ema + 0.1 * fvu
            if step % 10 == 0 or step == end:
                dead = (trainer.since_fired >= dead_after).float().mean().item()
                bar.set_postfix(fvu=f"{fvu_ema:.4f}", dead=f"{dead:.2%}", refresh=False)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == end:
                checkpoint(step)
    finally:
        bar.close()
    if last_ckpt is None:  # stop_after=0 on a fresh run
        checkpoint(step)
    model.eval()
    return model
