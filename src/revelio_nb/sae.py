"""TopK sparse autoencoders (k-SAEs) in plain PyTorch: no Triton, sparse decode and sparse encoder backward.

z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec.

* Decode is an ``embedding_bag`` over the k selected rows of ``W_dec`` weighted by their activations.
* The encoder is one autograd function: forward = GEMM + top-k (on CPU in row chunks); backward touches only
  the k selected latents per row (``embedding_bag`` for the input gradient, a sorted segment sum for ``W_enc``).
* Training (:class:`SaeTrainStep`) skips autograd: hand-written gradients as sparse (CSR) x dense products written
  into buffers that live across steps, then the decoder-gradient projection, fused Adam (exactly dense Adam) and
  the decoder renormalisation; tests hold it to dense autograd + ``torch.optim.Adam``.
* Checkpoints use EleutherAI sparsify's layout (``cfg.json`` + ``sae.safetensors``); our extras are extra
  ``cfg.json`` keys. Nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import artifacts
from .paths import atomic_path, atomic_write_json

TOKEN_MODES = ("auto", "pooled", "spatial")
B_DEC_INITS = ("median", "mean", "zeros")
# sparsify's SparseCoderConfig fields we write so that its loader accepts the folder.
_SPARSIFY_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                  "skip_connection", "transcode")
# cfg.json ``layout_version`` of the folders save() writes (1: scale folded into W_enc / W_dec; 2: raw-space
# weights that keep sparsify's invariants, see SparseAutoencoder.save).
SAE_LAYOUT_VERSION = 2
# On CPU the encoder GEMM + top-k run on row chunks of about this many pre-activations (fits in L3) ...
CPU_CHUNK_ELEMS = 1 << 23
# ... except in the training step, whose buffer lives across steps: fewer, larger GEMMs (1 GiB of fp32 at most).
TRAIN_CHUNK_ELEMS = 1 << 28
# Threads for the training step's small and sparse operations (sort, gathers, CSR products; the GEMM, top-k, Adam
# and renormalisation use all of torch's threads). On the 2-core project machine a second thread made them no
# faster and, under load, much slower (each parallel region waits for its slowest thread); raise it on big CPUs.
SPARSE_PHASE_THREADS = 1


class SaeError(ValueError):
    """A bad SAE configuration, checkpoint or input."""


class SaeTrainingError(RuntimeError):
    """Training stopped (non-finite features or loss); the last good checkpoint is left untouched."""

    def __init__(self, message: str, step: int, last_checkpoint_step: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint_step = last_checkpoint_step


# --------------------------------------------------------------------------------------------------- configs
@dataclass
class SaeConfig:
    """Architecture of a k-SAE. Written to ``cfg.json`` (sparsify keys + our extras)."""

    d_in: int = 0
    """Input width; 0 = taken from the features at training time."""
    expansion_factor: int = 16
    num_latents: int = 0
    """0 = ``d_in * expansion_factor``."""
    k: int = 32
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (and remove the gradient parallel to them)."""
    normalize_input: bool = True
    """Divide inputs by a power-of-two scale so the mean squared centred norm is about ``d_in``. The scale is
    folded exactly into the saved weights, so the sparsify folder works on raw features."""
    b_dec_init: str = "median"
    """``median`` (geometric), ``mean`` or ``zeros``."""
    tokens: str = "auto"
    """``pooled`` (one vector per image), ``spatial`` (one token per position) or ``auto`` (from the features)."""
    hookpoint: str = ""
    timestep: int | None = None
    model_id: str = ""
    activation: str = "topk"
    """Only ``topk``; kept for sparsify compatibility."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SaeError(f"k must be >= 1, got {self.k}")
        if self.b_dec_init not in B_DEC_INITS:
            raise SaeError(f"b_dec_init={self.b_dec_init!r}; valid: {B_DEC_INITS}")
        if self.tokens not in TOKEN_MODES:
            raise SaeError(f"tokens={self.tokens!r}; valid: {TOKEN_MODES}")
        if self.activation != "topk":
            raise SaeError(f"activation={self.activation!r}; only 'topk' is implemented")
        if self.num_latents < 0 or self.expansion_factor < 1 or self.d_in < 0:
            raise SaeError(f"bad sizes: d_in={self.d_in}, num_latents={self.num_latents}, "
                           f"expansion_factor={self.expansion_factor}")

    def resolved(self, d_in: int | None = None) -> "SaeConfig":
        """Copy with ``d_in`` and ``num_latents`` filled in (``d_in`` from the features if unset)."""
        d = self.d_in or (d_in or 0)
        if d_in is not None and self.d_in and self.d_in != d_in:
            raise SaeError(f"SaeConfig.d_in={self.d_in} but the features have width {d_in}")
        if d < 1:
            raise SaeError("d_in is unknown: set SaeConfig.d_in or pass features")
        m = self.num_latents or d * self.expansion_factor
        if self.k > m:
            raise SaeError(f"k={self.k} exceeds num_latents={m}")
        return SaeConfig(**{**asdict(self), "d_in": d, "num_latents": m})


@dataclass
class TrainConfig:
    """Training hyper-parameters; saved as ``train_cfg.json`` beside the weights."""

    sae: SaeConfig = field(default_factory=SaeConfig)
    batch_size: int = 4096
    """Tokens per step (capped at the number of tokens)."""
    steps: int = 0
    """Optimizer steps; 0 = ``ceil(epochs * tokens / batch_size)``."""
    epochs: float = 10.0
    lr: float | None = None
    """None = 2e-4 / sqrt(num_latents / 2**14) (Gao et al. 2024)."""
    warmup_steps: int = 1000
    """Linear warm-up, capped at 10% of the steps."""
    decay_fraction: float = 0.2
    """Linear decay to zero over this final fraction of the steps (0 = constant after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10
    auxk_alpha: float = 1 / 32
    dead_tokens_threshold: int = 0
    """A latent is dead after this many tokens without firing; 0 = min(10M, tokens in one epoch)."""
    init_tokens: int = 16384
    """Tokens (the first of the training order) used to initialise b_dec and the input scale."""
    seed: int = 0
    checkpoint_every: int = 1000
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = SaeConfig(**self.sae)
        self.betas = tuple(self.betas)
        for name in ("batch_size", "checkpoint_every", "init_tokens"):
            if getattr(self, name) < 1:
                raise SaeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.epochs <= 0 and self.steps == 0:
            raise SaeError(f"set steps > 0 or epochs > 0 (got steps={self.steps}, epochs={self.epochs})")
        if not 0 <= self.decay_fraction <= 1:
            raise SaeError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


# ---------------------------------------------------------------------------------------- sparse kernels
def _topk(pre: Tensor, k: int, out: tuple[Tensor, Tensor]) -> None:
    """Unsorted top-k along dim 1 into ``out``. On CPU an exact two-stage search over strided groups.

    Group j of 8 holds latents {j, j + G, ..., j + 7G}. The k largest entries lie in the k groups with the largest
    maxima, so: group maxima (one vectorised pass) -> their top-k -> top-k of those groups' 8k members. Equals
    ``topk`` up to order and ties; 0.65-0.75x its time at 20k-80k latents on the project machine, par at 16k.
    """
    b, m = pre.shape
    g = 8
    if pre.device.type != "cpu" or m % g or m // g < 16 * k:
        torch.topk(pre, k, dim=1, sorted=False, out=out)
        return
    n_groups = m // g
    groups = pre.view(b, g, n_groups)
    _, gsel = groups.amax(1).topk(k, dim=1, sorted=False)
    cand = groups.gather(2, gsel.unsqueeze(1).expand(b, g, k)).view(b, g * k)
    _, c = torch.topk(cand, k, dim=1, sorted=False, out=out)
    torch.add(gsel.gather(1, c % k), c // k, alpha=n_groups, out=out[1])


def _encode_select(x: Tensor, weight: Tensor, bias: Tensor, k: int, aux_latents: Tensor | None, k_aux: int,
                   workspace: "_Workspace | None" = None):
    """ReLU(x W^T + b) -> top-k (values, indices), plus the top-k_aux among ``aux_latents``; the [B, M]
    pre-activations never leave this function.

    On CPU the GEMM runs on row chunks of at most ``CPU_CHUNK_ELEMS`` pre-activations written into one buffer;
    ``workspace`` (the training step's) lends a buffer that lives across steps, with chunks of up to
    ``TRAIN_CHUNK_ELEMS`` (fewer, more efficient GEMMs), so no step pays the page faults of a fresh one.
    """
    b, m = x.shape[0], weight.shape[0]
    on_cpu = x.device.type == "cpu"
    chunk = max(1, (TRAIN_CHUNK_ELEMS if workspace is not None else CPU_CHUNK_ELEMS) // m) if on_cpu else b
    chunk = min(chunk, b)
    top_acts = x.new_empty(b, k)
    top_idx = torch.empty(b, k, dtype=torch.long, device=x.device)
    use_aux = aux_latents is not None and k_aux > 0
    aux_acts = x.new_empty(b, k_aux if use_aux else 0)
    aux_idx = torch.empty(b, aux_acts.shape[1], dtype=torch.long, device=x.device)
    if workspace is not None:
        buf = workspace.get("pre", (chunk, m), x.dtype)
    else:
        buf = x.new_empty(chunk, m) if on_cpu and chunk < b else None
    wt = weight.t()
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        pre = torch.addmm(bias, x[s:e], wt, out=buf[: e - s]) if buf is not None else torch.addmm(bias, x[s:e], wt)
        _topk(pre, k, out=(top_acts[s:e], top_idx[s:e]))
        if use_aux:
            n_dead = aux_latents.shape[0]
            if workspace is not None:
                dead_pre = workspace.get("aux_pre", (chunk * n_dead,), x.dtype)[: (e - s) * n_dead].view(e - s, n_dead)
                torch.index_select(pre, 1, aux_latents, out=dead_pre)
            else:
                dead_pre = pre.index_select(1, aux_latents)
            v, i = dead_pre.topk(k_aux, dim=1, sorted=False)
            aux_acts[s:e], aux_idx[s:e] = v, aux_latents[i]
    return top_acts.clamp_min_(0), top_idx, aux_acts.clamp_min_(0), aux_idx


def _sort_key(flat: Tensor, m: int) -> Tensor:
    """Sort key for latent indices: int32 when it fits (torch 2.13's stable int64 sort on CPU is ~500x slower)."""
    return flat.int() if m < 2**31 else flat


def _segment_matmul(idx: Tensor, w: Tensor, src: Tensor, m: int) -> Tensor:
    """out[l] = sum over (b, j) with idx[b, j] == l of w[b, j] * src[b]: sort by latent, then one embedding_bag."""
    kk = idx.shape[1]
    flat = idx.reshape(-1)
    _, order = torch.sort(_sort_key(flat, m), stable=True)  # stable sort is a radix sort on CPU
    counts = torch.bincount(flat, minlength=m)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(order // kk, src, offsets, mode="sum", per_sample_weights=w.reshape(-1)[order].to(src.dtype))


def _pair_dots(table: Tensor, rows: Tensor, vecs: Tensor, vec_rows: Tensor) -> Tensor:
    """out[i] = <table[rows[i]], vecs[vec_rows[i]]> (embedding_bag's per-sample-weight gradient kernel)."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        vecs, table, rows, vec_rows[:1], vec_rows, 0, -1)


def _csr_matmul(crow: Tensor, col: Tensor, values: Tensor, dense: Tensor, out: Tensor) -> Tensor:
    """out = S @ dense for the CSR matrix S (crow, col, values) of shape [len(crow) - 1, len(dense)], written into
    ``out`` (no fresh [M, d] tensor: on CPU a fresh one page-faults; MKL's sparse GEMM is also 2x embedding_bag's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        s = torch.sparse_csr_tensor(crow, col, values.to(dense.dtype), (crow.shape[0] - 1, dense.shape[0]))
        return torch.addmm(out, s, dense, beta=0.0, out=out)


def _row_dots(table: Tensor, idx: Tensor, vec: Tensor) -> Tensor:
    """out[b, j] = <table[idx[b, j]], vec[b]>: a sampled dense-dense product (SDDMM), never gathering [B, k, d]."""
    b, kk = idx.shape
    bag = torch.arange(b, device=idx.device).repeat_interleave(kk)
    if idx.device.type == "cpu":  # embedding_bag's kernel: 1.6x faster than sparse sampled_addmm on CPU
        return _pair_dots(table, idx.reshape(-1), vec, bag).view(b, kk)
    try:
        sidx, perm = idx.sort(dim=1)
        crow = torch.arange(0, b * kk + 1, kk, device=idx.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, sidx.reshape(-1), vec.new_zeros(b * kk), (b, table.shape[0]))
            out = torch.sparse.sampled_addmm(pattern, vec, table.t(), beta=0.0).values().view(b, kk)
        return torch.empty_like(out).scatter_(1, perm, out)
    except (RuntimeError, NotImplementedError):  # no SDDMM for this device/dtype
        return _pair_dots(table, idx.reshape(-1), vec, bag).view(b, kk)


class _TopKEncoder(torch.autograd.Function):
    """Fused encoder: returns (top_acts, top_idx, aux_acts, aux_idx); the backward is sparse."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, aux_latents, k_aux: int):
        top_acts, top_idx, aux_acts, aux_idx = _encode_select(x, weight, bias, k, aux_latents, k_aux)
        ctx.save_for_backward(x, weight, top_acts, top_idx, aux_acts, aux_idx)
        ctx.mark_non_differentiable(top_idx, aux_idx)
        return top_acts, top_idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, g_top, _g_idx, g_aux, _g_aux_idx):
        x, weight, top_acts, top_idx, aux_acts, aux_idx = ctx.saved_tensors
        g = g_top * (top_acts > 0)  # ReLU gradient
        idx = top_idx
        if aux_idx.shape[1] and g_aux is not None:
            g = torch.cat([g, g_aux * (aux_acts > 0)], 1)
            idx = torch.cat([top_idx, aux_idx], 1)
        g = g.to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, mode="sum", per_sample_weights=g)
        if ctx.needs_input_grad[1]:
            grad_w = _segment_matmul(idx, g, x, weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


class _SparseDecode(torch.autograd.Function):
    """y[b] = sum_j acts[b, j] * W_dec[idx[b, j]], with a sparse backward for acts and W_dec."""

    @staticmethod
    def forward(ctx, acts, idx, w_dec):
        ctx.save_for_backward(acts, idx, w_dec)
        return F.embedding_bag(idx, w_dec, mode="sum", per_sample_weights=acts.to(w_dec.dtype))

    @staticmethod
    def backward(ctx, gy):
        acts, idx, w_dec = ctx.saved_tensors
        gy = gy.contiguous()
        g_acts = _row_dots(w_dec, idx, gy).to(acts.dtype) if ctx.needs_input_grad[0] else None
        g_w = _segment_matmul(idx, acts, gy, w_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return g_acts, None, g_w


def sparse_decode(acts: Tensor, idx: Tensor, w_dec: Tensor) -> Tensor:
    """sum_j acts[..., j] * w_dec[idx[..., j]] (no bias)."""
    if acts.shape[-1] == 0:
        return acts.new_zeros(*acts.shape[:-1], w_dec.shape[1])
    return _SparseDecode.apply(acts, idx, w_dec)


def dense_decode(acts: Tensor, idx: Tensor, w_dec: Tensor) -> Tensor:
    """Reference: scatter into a dense [B, M] code, then a GEMM."""
    z = acts.new_zeros(acts.shape[0], w_dec.shape[0]).scatter(1, idx, acts)
    return z @ w_dec


# ------------------------------------------------------------------------------------------------- model
class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[B, k] activations of the selected latents (post-ReLU, may contain zeros)."""
    top_idx: Tensor
    """[B, k] latent indices."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    top_acts: Tensor
    top_idx: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    num_dead: int


class SparseAutoencoder(nn.Module):
    """TopK SAE with sparsify's parameter names: ``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec``.

    Parameters live in normalised input space (x / ``input_scale``); ``encode``/``decode``/``forward`` take and
    return raw features.
    """

    def __init__(self, cfg: SaeConfig, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg.resolved()
        self.d_in, self.num_latents, self.k = self.cfg.d_in, self.cfg.num_latents, self.cfg.k
        self.input_scale = 1.0
        self.grid: tuple[int, int] | None = None
        self.encoder = nn.Linear(self.d_in, self.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        if self.cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    def _check(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise SaeError(f"input width {x.shape[-1]} != SAE d_in {self.d_in}")
        x = x.to(self.device, self.dtype)
        return x * (1.0 / self.input_scale) if self.input_scale != 1.0 else x

    def encode(self, x: Tensor) -> EncoderOutput:
        """Top-k latents of raw features x [..., d_in] -> (top_acts, top_idx), each [..., k]."""
        lead = x.shape[:-1]
        xc = self._check(x).reshape(-1, self.d_in) - self.b_dec
        if torch.is_grad_enabled():
            acts, idx, _, _ = _TopKEncoder.apply(xc, self.encoder.weight, self.encoder.bias, self.k, None, 0)
        else:
            acts, idx, _, _ = _encode_select(xc, self.encoder.weight, self.encoder.bias, self.k, None, 0)
        return EncoderOutput(acts.reshape(*lead, self.k), idx.reshape(*lead, self.k))

    def decode(self, top_acts: Tensor, top_idx: Tensor) -> Tensor:
        """Raw-space reconstruction from a sparse code."""
        lead = top_acts.shape[:-1]
        y = sparse_decode(top_acts.reshape(-1, top_acts.shape[-1]), top_idx.reshape(-1, top_idx.shape[-1]), self.W_dec)
        y = (y + self.b_dec).reshape(*lead, self.d_in)
        return y * self.input_scale if self.input_scale != 1.0 else y

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *, dense: bool = False) -> ForwardOutput:
        """Encode, decode, FVU and (given a dead-latent mask) the AuxK loss. ``dense=True``: naive reference path."""
        xn = self._check(x).reshape(-1, self.d_in)
        xc = xn - self.b_dec
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        k_aux = min(self.d_in // 2, num_dead)  # Gao et al., appendix B.1
        dead_idx = dead_mask.nonzero().squeeze(1) if num_dead else None
        if dense:
            pre = F.relu(F.linear(xc, self.encoder.weight, self.encoder.bias))
            top_acts, top_idx = pre.topk(self.k, dim=1, sorted=False)
            if num_dead:
                aux_acts, i = pre[:, dead_idx].topk(k_aux, dim=1, sorted=False)
                aux_idx = dead_idx[i]
            decode = dense_decode
        else:
            top_acts, top_idx, aux_acts, aux_idx = _TopKEncoder.apply(
                xc, self.encoder.weight, self.encoder.bias, self.k, dead_idx, k_aux)
            decode = sparse_decode
        x_hat = decode(top_acts, top_idx, self.W_dec) + self.b_dec
        e = xn - x_hat
        total_var = (xn - xn.mean(0)).pow(2).sum()
        fvu = e.pow(2).sum() / total_var
        if num_dead:
            e_hat = decode(aux_acts, aux_idx, self.W_dec)
            auxk = min(num_dead / (self.d_in // 2 or 1), 1.0) * (e_hat - e.detach()).pow(2).sum() / total_var
        else:
            auxk = fvu.new_zeros(())
        if self.input_scale != 1.0:
            x_hat = x_hat * self.input_scale
        return ForwardOutput(x_hat.reshape(x.shape), top_acts, top_idx, fvu, auxk, num_dead)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is not None:
            par = torch.linalg.vecdot(self.W_dec.grad, self.W_dec.data)
            self.W_dec.grad.addcmul_(par.unsqueeze(1), self.W_dec.data, value=-1.0)

    # ---------------------------------------------------------------------------------------- save / load
    def config_dict(self) -> dict[str, Any]:
        """Contents of ``cfg.json``: sparsify's keys plus ours (``layout_version``: see :meth:`save`)."""
        c = asdict(self.cfg)
        out = {key: c.get(key, False) for key in _SPARSIFY_KEYS}
        out.update(d_in=self.d_in, num_latents=self.num_latents, k=self.k)
        out.update({key: c[key] for key in ("normalize_input", "b_dec_init", "tokens", "hookpoint", "timestep",
                                            "model_id")})
        out.update(input_scale=self.input_scale, layout_version=SAE_LAYOUT_VERSION, weights_act_on="raw features",
                   raw_code_scale=self.input_scale, grid=self.grid, format="sparsify", saved_by="revelio_nb.sae")
        return out

    def save(self, folder: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write ``cfg.json`` and ``sae.safetensors`` in sparsify's layout, acting on raw features.

        With s = ``input_scale``, z = TopK(ReLU(W_enc (x/s - b) + b_enc)) and x_hat = s (W_dec^T z + b). TopK commutes
        with a positive scale, so the raw-space weights are ``encoder.weight`` = W_enc, ``encoder.bias`` = s b_enc,
        ``W_dec`` = W_dec (unit rows when ``normalize_decoder``), ``b_dec`` = s b: sparsify's forward on raw x gives
        the same x_hat, with the code s z (``raw_code_scale`` in ``cfg.json``). s is a power of two, so this is exact.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        s = float(self.input_scale)
        tensors = {
            "encoder.weight": self.encoder.weight.detach(),
            "encoder.bias": self.encoder.bias.detach() * s,
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach() * s,
        }
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        with atomic_path(folder / "sae.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=metadata or {})
        atomic_write_json(folder / "cfg.json", self.config_dict())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, d_in: int | None = None,
             device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Load a sparsify-layout folder; ``d_in`` (the features' width) must match if given.

        Reads our current layout (``layout_version`` 2, see :meth:`save`), our earlier one (``layout_version``
        absent, ``scale_folded_into_weights: true``: the scale was folded into ``W_enc`` and ``W_dec``) and plain
        sparsify folders (no scale). The model returned works in normalised space with ``input_scale`` set, so its
        code is the one it was trained with.
        """
        folder = Path(folder)
        cfg_path, st_path = folder / "cfg.json", folder / "sae.safetensors"
        if not cfg_path.is_file() or not st_path.is_file():
            raise SaeError(f"{folder} is not an SAE folder (needs cfg.json and sae.safetensors)")
        raw = json.loads(cfg_path.read_text())
        if d_in is not None and int(raw["d_in"]) != int(d_in):
            raise SaeError(f"SAE in {folder} has d_in={raw['d_in']} but the features have width {d_in}")
        version = raw.get("layout_version", 1)
        if version not in (1, SAE_LAYOUT_VERSION):
            raise SaeError(f"{cfg_path}: layout_version={version!r} is not one this version reads "
                           f"(1 or {SAE_LAYOUT_VERSION}); update revelio-nb")
        names = {f.name for f in fields(SaeConfig)}
        cfg = SaeConfig(**{k: v for k, v in raw.items() if k in names})
        tensors = load_file(str(st_path), device="cpu")
        model = cls(cfg, dtype=tensors["encoder.weight"].dtype)
        expected = {"encoder.weight": (model.num_latents, model.d_in), "encoder.bias": (model.num_latents,),
                    "W_dec": (model.num_latents, model.d_in), "b_dec": (model.d_in,)}
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise SaeError(f"{st_path}: {key} has shape {got}, expected {shape}")
        if version == SAE_LAYOUT_VERSION:
            s = float(raw.get("input_scale", 1.0))
            w_enc, b_enc, w_dec = tensors["encoder.weight"], tensors["encoder.bias"] / s, tensors["W_dec"]
        else:  # layout 1: scale folded into W_enc (/s) and W_dec (*s); plain sparsify: s = 1
            s = float(raw.get("input_scale", 1.0)) if raw.get("scale_folded_into_weights", False) else 1.0
            w_enc, b_enc, w_dec = tensors["encoder.weight"] * s, tensors["encoder.bias"], tensors["W_dec"] / s
        with torch.no_grad():
            model.encoder.weight.copy_(w_enc)
            model.encoder.bias.copy_(b_enc)
            model.W_dec.copy_(w_dec)
            model.b_dec.copy_(tensors["b_dec"] / s)
        model.input_scale = s
        model.grid = tuple(raw["grid"]) if raw.get("grid") else None
        return model.to(device)


def checkpoint_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """String metadata stored in ``sae.safetensors`` (e.g. the training step)."""
    with safe_open(str(Path(folder) / "sae.safetensors"), framework="pt") as f:
        return dict(f.metadata() or {})


def _view_is_current(folder: Path, step: int) -> bool:
    """Whether the sparsify view (``sae.safetensors`` + ``cfg.json``) holds ``step`` in the current layout."""
    try:
        return (checkpoint_metadata(folder).get("step") == str(step)
                and json.loads((folder / "cfg.json").read_text()).get("layout_version") == SAE_LAYOUT_VERSION)
    except (OSError, ValueError, SafetensorError):
        return False


# ------------------------------------------------------------------------------------------ data source
def _memmap_file(array) -> tuple[str, int] | None:
    """(file, offset) of a whole, C-ordered ``np.memmap`` (not a view of one), else None."""
    if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and getattr(array, "filename", None)
            and array.flags.c_contiguous and array.mode != "c"):  # copy-on-write edits are not in the file
        return str(array.filename), int(array.offset)
    return None


class ArraySource:
    """Tokens of a (memory-mapped) feature array, gathered in batches; the array is never loaded whole.

    ``array`` is (N, D) (pooled: one token per row) or (N, C, H, W) (spatial: one C-dim token per position).
    ``rows`` restricts to a subset of rows (e.g. the train split). Local token ``t`` is row ``rows[t // (H W)]``
    at position ``t % (H W)`` (row-major h, w); :meth:`locate` maps tokens back to (row, h, w).

    A ``np.memmap`` is read with ``os.pread`` (at most ``remap_bytes`` of rows at a time), never through a mapping:
    a mapped file's pages count in the process's RSS, and the kernel maps whole folios around each touched page, so
    one batch of random rows maps nearly all of a store. Reads keep RAM flat however large the store (the page cache,
    which is not RSS, still serves re-reads).
    """

    remap_bytes = 32 << 20
    """The most bytes of rows read into memory at once (the name is from when reads went through a mapping)."""

    def __init__(self, array, rows=None):
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        if array.ndim not in (2, 4):
            raise SaeError(f"features must be (N, D) or (N, C, H, W), got shape {tuple(array.shape)}")
        self.array = array
        n = array.shape[0]
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(self.rows) == 0:
            raise SaeError("no rows selected")
        if self.rows.min() < 0 or self.rows.max() >= n:
            raise SaeError(f"row indices must be in [0, {n}), got range [{self.rows.min()}, {self.rows.max()}]")
        self.spatial = array.ndim == 4
        self.d_in = int(array.shape[1])
        self.grid = (int(array.shape[2]), int(array.shape[3])) if self.spatial else (1, 1)
        self.positions = self.grid[0] * self.grid[1]
        self.n_tokens = len(self.rows) * self.positions
        self._file = _memmap_file(array)
        self._row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize

    def _read_rows(self, fd: int, rows: np.ndarray) -> np.ndarray:
        """Sorted distinct ``rows`` of the file, one ``pread`` per run of consecutive rows."""
        buf = np.empty((len(rows), *self.array.shape[1:]), dtype=self.array.dtype)
        mv = memoryview(buf.reshape(-1).view(np.uint8))
        cuts = np.r_[0, np.flatnonzero(np.diff(rows) != 1) + 1, len(rows)]
        rb = self._row_bytes
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            pos, end, off = a * rb, b * rb, self._file[1] + int(rows[a]) * rb
            while pos < end:
                got = os.preadv(fd, [mv[pos:end]], off + pos - a * rb)
                if got <= 0:
                    raise SaeError(f"{self._file[0]} is shorter than its array header says (truncated?)")
                pos += got
        return buf

    def __len__(self) -> int:
        return self.n_tokens

    def locate(self, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(array row, h, w) of local token ids."""
        tokens = np.asarray(tokens, dtype=np.int64)
        r, p = np.divmod(tokens, self.positions)
        h, w = np.divmod(p, self.grid[1])
        return self.rows[r], h, w

    def gather(self, tokens) -> np.ndarray:
        """Float32 (B, d_in) features of the given local token ids (pass them sorted for locality)."""
        rows, h, w = self.locate(tokens)
        if self._file is None:
            out = self.array[rows, :, h, w] if self.spatial else self.array[rows]
            return np.ascontiguousarray(out, dtype=np.float32)
        out = np.empty((len(rows), self.d_in), dtype=np.float32)
        uniq, inv = np.unique(rows, return_inverse=True)
        order = np.argsort(inv, kind="stable")  # tokens grouped by row: those of uniq[i] are order[at[i]:at[i + 1]]
        at = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        per = max(1, self.remap_bytes // max(1, self._row_bytes))
        fd = os.open(self._file[0], os.O_RDONLY)
        try:
            for s in range(0, len(uniq), per):
                buf = self._read_rows(fd, uniq[s : s + per])
                sel = order[at[s] : at[min(s + per, len(uniq))]]
                loc = inv[sel] - s
                out[sel] = buf[loc, :, h[sel], w[sel]] if self.spatial else buf[loc]
        finally:
            os.close(fd)
        return out

    fingerprint_bytes = 16 << 20
    """The most bytes of rows :meth:`fingerprint` reads for its content sample."""

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the tokens this source serves: shape, dtype, every selected row index, and a content hash of
        a sample of rows spread evenly over them (at least 8 and at most 256 rows, within ``fingerprint_bytes``;
        pread for memory-mapped files, like :meth:`gather`). A resume on other features of the same shape is
        refused by it (see :func:`train_sae`)."""
        n_sample = int(np.clip(self.fingerprint_bytes // max(1, self._row_bytes), 8, 256))
        at = np.linspace(0, len(self.rows) - 1, min(n_sample, len(self.rows))).astype(np.int64)
        sample = np.unique(self.rows[at])
        if self._file is None:
            data = np.ascontiguousarray(self.array[sample])
        else:
            fd = os.open(self._file[0], os.O_RDONLY)
            try:
                data = self._read_rows(fd, sample)
            finally:
                os.close(fd)
        rows = np.ascontiguousarray(self.rows, dtype=np.int64)
        return {"shape": list(self.array.shape), "dtype": str(self.array.dtype), "n_rows": len(self.rows),
                "n_tokens": self.n_tokens, "rows_hash": hashlib.sha256(rows.view(np.uint8)).hexdigest()[:16],
                "content_hash": hashlib.sha256(sample.tobytes() + data.view(np.uint8).tobytes()).hexdigest()[:16]}


def as_source(source, rows=None) -> ArraySource:
    return source if isinstance(source, ArraySource) and rows is None else ArraySource(
        source.array if isinstance(source, ArraySource) else source, rows)


_MASK64 = (1 << 64) - 1


def _mix(v: np.ndarray, key: int) -> np.ndarray:
    """SplitMix64-style hash of uint64 values with a key."""
    z = v + np.uint64((int(key) * 0x9E3779B97F4A7C15) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(positions, n: int, key: int) -> np.ndarray:
    """A keyed pseudo-random permutation of [0, n) evaluated at ``positions`` in O(1) memory (Feistel + cycle walk)."""
    half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
    mask = np.uint64((1 << half) - 1)
    keys = [int(k) for k in _mix(np.arange(4, dtype=np.uint64), key)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for kk in keys:
            left, right = right, left ^ (_mix(right, kk) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(np.asarray(positions, dtype=np.uint64))
    bad = out >= n
    while bad.any():
        out[bad] = feistel(out[bad])
        bad = out >= n
    return out.astype(np.int64)


def batch_tokens(step: int, batch_size: int, n_tokens: int, seed: int) -> np.ndarray:
    """Sorted local token ids of training batch ``step``: consecutive slices of one fresh permutation per epoch."""
    pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, within = np.divmod(pos, n_tokens)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = permute(within[sel], n_tokens, key=seed * 1_000_003 + int(e))
    out.sort()
    return out


# ---------------------------------------------------------------------------------------------- training
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


class _Workspace:
    """Buffers that live across training steps: on CPU a fresh large tensor page-faults on every step."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A [shape] view of buffer ``name`` (zeros when first made; grown to the next power of two if too small)."""
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.zeros(1 << max(0, n - 1).bit_length(), dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
           steps: list[Tensor], lr: float, betas: tuple[float, float], eps: float) -> None:
    """``torch.optim.Adam``'s update (no weight decay, no amsgrad) on tensors or views of them; ``steps`` already
    count this step. Its fused kernel where the build has one, else the same formula in plain ops."""
    if _FUSED_ADAM:
        try:
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=betas[0],
                               beta2=betas[1], weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
            return
        except (RuntimeError, NotImplementedError):  # no fused kernel for this device / dtype
            pass
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step = float(s)
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (v.sqrt() / math.sqrt(1 - betas[1] ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** step))


_FUSED_ADAM = hasattr(torch, "_fused_adam_")


class SaeTrainStep:
    """One k-SAE training step without autograd: forward, sparse gradients of FVU + ``auxk_alpha`` * AuxK, the
    decoder-gradient projection, Adam, the decoder renormalisation and the dead-latent bookkeeping.

    The gradients are written by hand (tests hold them to dense autograd): the (token, latent) pairs the batch
    selected, sorted by latent, are a CSR matrix, and each weight gradient is one sparse x dense product written
    into a buffer that lives across steps, as are the GEMM's pre-activations (on CPU a fresh large tensor
    page-faults on every step, which cost more than the arithmetic). Few, large operations: on a shared CPU each
    parallel operation waits for its slowest thread. Adam is exactly ``torch.optim.Adam``'s (its fused kernel, on
    every row every step). ``optimizer`` is a ``torch.optim.Adam`` used only to hold the state (its
    ``state_dict`` is the checkpoint format); it is never stepped itself.
    ``timings``: a dict that, when given, accumulates the seconds of each phase (``clock``: the timer).

        step = SaeTrainStep(model, lr=2e-4)
        out = step.forward(x)   # ForwardOutput (no autograd graph)
        step.update()           # gradients, projection, Adam, renormalisation, bookkeeping
    """

    def __init__(self, model: SparseAutoencoder, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 6.25e-10, auxk_alpha: float = 1 / 32, dead_after: int = 10_000_000,
                 timings: dict[str, float] | None = None, clock=None):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=eps)
        self.auxk_alpha = auxk_alpha
        self.dead_after = dead_after
        self.since_fired = torch.zeros(model.num_latents, dtype=torch.long, device=model.device)
        self.timings = timings
        self._clock = clock or time.perf_counter
        self._t = 0.0
        self._ws = _Workspace(model.device)
        self._saved: tuple | None = None

    def _mark(self, name: str | None) -> None:
        """Charge the time since the previous mark to ``name`` (None: just restart the clock)."""
        if self.timings is None:
            return
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        now = self._clock()
        if name is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self._t
        self._t = now

    def __call__(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        out = self.forward(x, dead_mask)
        self.update()
        return out

    @torch.no_grad()
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Encode, decode, FVU and AuxK of a batch; ``dead_mask`` defaults to the bookkeeping's dead latents."""
        model, d = self.model, self.model.d_in
        w_dec, b_dec = model.W_dec.detach(), model.b_dec.detach()
        self._mark(None)
        with self._one_thread():
            xn = model._check(x).reshape(-1, d)
            xc = xn - b_dec
            if dead_mask is None and self.auxk_alpha > 0:
                dead_mask = self.since_fired >= self.dead_after
            dead_idx = dead_mask.nonzero().squeeze(1) if dead_mask is not None else None
            num_dead = 0 if dead_idx is None else dead_idx.shape[0]
            k_aux = min(d // 2, num_dead)  # Gao et al., appendix B.1
        top_acts, top_idx, aux_acts, aux_idx = _encode_select(
            xc, model.encoder.weight.detach(), model.encoder.bias.detach(), model.k, dead_idx if num_dead else None,
            k_aux, workspace=self._ws)
        self._mark("encode")
        with self._one_thread():
            x_hat = F.embedding_bag(top_idx, w_dec, mode="sum", per_sample_weights=top_acts)
            e_hat = F.embedding_bag(aux_idx, w_dec, mode="sum", per_sample_weights=aux_acts) if num_dead else None
            x_hat += b_dec
            e = xn - x_hat
            total_var = xn.var(0, correction=0).sum() * xn.shape[0]  # sum of squared deviations from the mean
            fvu = torch.dot(e.view(-1), e.view(-1)) / total_var
            resid = None
            aux_scale = min(num_dead / (d // 2 or 1), 1.0)
            if num_dead:
                resid = e_hat.sub_(e)
                auxk = aux_scale * torch.dot(resid.view(-1), resid.view(-1)) / total_var
            else:
                auxk = fvu.new_zeros(())
            self._saved = (xc, e, resid, aux_scale, total_var, top_acts, top_idx, aux_acts, aux_idx)
            if model.input_scale != 1.0:
                x_hat = x_hat * model.input_scale
        self._mark("decode_loss")
        return ForwardOutput(x_hat.reshape(x.shape), top_acts, top_idx, fvu, auxk, num_dead)

    @torch.no_grad()
    def update(self) -> None:
        """Gradients of the last :meth:`forward`, projection, Adam, renormalisation, dead-latent bookkeeping."""
        if self._saved is None:
            raise SaeError("SaeTrainStep.update() needs a forward() first")
        xc, e, resid, aux_scale, total_var, top_acts, top_idx, aux_acts, aux_idx = self._saved
        self._saved = None
        model = self.model
        b, m, k = xc.shape[0], model.num_latents, top_idx.shape[1]
        params = [p.detach() for p in (model.encoder.weight, model.encoder.bias, model.W_dec, model.b_dec)]
        w_enc, _, w_dec, _ = params
        grads = self._grads()
        g_we, g_be, g_wd, g_bd = grads
        self._mark(None)

        with self._one_thread():
            # d FVU / d x_hat, and d (alpha * AuxK) / d e_hat (the dead latents' reconstruction of the residual)
            gy = e * (-2.0 / total_var)
            if resid is not None:
                idx = torch.cat([top_idx, aux_idx], 1)
                acts = torch.cat([top_acts, aux_acts], 1)
                g_src = torch.cat([gy, resid.mul_(2.0 * self.auxk_alpha * aux_scale / total_var)], 0)
            else:
                idx, acts, g_src = top_idx, top_acts, gy
            kk = idx.shape[1]
            # the (token, latent) pairs sorted by latent: the rows of a CSR matrix [latents, tokens]
            flat = idx.reshape(-1)
            _, order = torch.sort(_sort_key(flat, m), stable=True)
            lat = flat[order]
            tok = order // kk
            src_row = tok + b * (order % kk >= k) if resid is not None else tok  # row of g_src for each pair
            acts = acts.reshape(-1)[order]
            crow = torch.zeros(m + 1, dtype=torch.long, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=m), 0, out=crow[1:])
            self._mark("sort")

            # <W_dec[l], g_src[row]> for every pair: the gradient of the selected activation, and (weighted by it)
            # the decoder gradient's component along its row
            dots = _pair_dots(w_dec, lat, g_src, src_row)
            g_pre = dots * (acts > 0)  # through the ReLU
            g_be.zero_().index_add_(0, lat, g_pre)
            if model.cfg.normalize_decoder:  # <g_W_dec[l], W_dec[l]> = sum over l's pairs of act * dot
                par = self._ws.get("par", (m,), w_dec.dtype)
                par.zero_().index_add_(0, lat, dots.mul_(acts))
            self._mark("grad_acts")
            # each weight gradient: one sparse (CSR) x dense product written straight into its buffer
            _csr_matmul(crow, src_row, acts, g_src, out=g_wd)
            self._mark("grad_w_dec")
            _csr_matmul(crow, tok, g_pre, xc, out=g_we)
            self._mark("grad_w_enc")
            torch.sub(gy.sum(0), w_enc.t() @ g_be, out=g_bd)  # x - b_dec feeds the encoder
            self._mark("grad_b_dec")
        if model.cfg.normalize_decoder:  # remove the part parallel to the (unit) decoder rows
            g_wd.addcmul_(par.unsqueeze(1), w_dec, value=-1.0)
            self._mark("project")

        group = self.optimizer.param_groups[0]
        state = [self.optimizer.state[p] for p in (model.encoder.weight, model.encoder.bias, model.W_dec,
                                                     model.b_dec)]
        with self._one_thread():
            for p, st in zip(params, state):
                if not st:  # torch.optim.Adam(fused=True)'s layout, so checkpoints load either way
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
        _adam_(params, grads, [st["exp_avg"] for st in state], [st["exp_avg_sq"] for st in state],
               [st["step"] for st in state], float(group["lr"]), tuple(group["betas"]), float(group["eps"]))
        self._mark("adam")
        if model.cfg.normalize_decoder:
            norm = self._ws.get("norm", (m, 1), w_dec.dtype)
            torch.linalg.vector_norm(w_dec, dim=1, keepdim=True, out=norm)
            w_dec.div_(norm.add_(torch.finfo(w_dec.dtype).eps))
            self._mark("renorm")
        with self._one_thread():
            self.since_fired += b
            self.since_fired.index_fill_(0, top_idx.masked_select(top_acts > 0), 0)
        self._mark("bookkeeping")

    @contextlib.contextmanager
    def _one_thread(self):
        """Run the small and the sparse, memory-bound operations on ``SPARSE_PHASE_THREADS`` CPU threads."""
        n = torch.get_num_threads()
        if self.model.device.type != "cpu" or n <= SPARSE_PHASE_THREADS:
            yield
            return
        torch.set_num_threads(SPARSE_PHASE_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def _grads(self) -> list[Tensor]:
        """Gradient buffers of (encoder.weight, encoder.bias, W_dec, b_dec), kept across steps."""
        ps = (self.model.encoder.weight, self.model.encoder.bias, self.model.W_dec, self.model.b_dec)
        return [self._ws.get(f"grad.{i}", tuple(p.shape), p.dtype) for i, p in enumerate(ps)]


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
    kind = "spatial" if source.spatial else "pooled"
    if sae_cfg.tokens not in ("auto", kind):
        raise SaeError(f"SaeConfig.tokens={sae_cfg.tokens!r} but the features have shape "
                       f"{tuple(source.array.shape)} ({kind})")
    sae_cfg.tokens = kind
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
        if state.get("signature") != signature:
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


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sae(model: SparseAutoencoder, source, batch_size: int = 8192, progress: bool = False) -> dict[str, Any]:
    """FVU, L0, dead fraction (never fires) and per-latent firing frequency over every token of ``source``.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over all of ``source``.
    """
    source = as_source(source)
    if source.d_in != model.d_in:
        raise SaeError(f"features have width {source.d_in} but the SAE has d_in {model.d_in}")
    counts = torch.zeros(model.num_latents, dtype=torch.long, device=model.device)
    sse = sum_x2 = 0.0
    sum_x = torch.zeros(model.d_in, dtype=torch.float64)
    l0 = 0
    n = source.n_tokens
    for s in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        x = torch.from_numpy(source.gather(np.arange(s, min(n, s + batch_size)))).to(model.device)
        acts, idx = model.encode(x)
        x_hat = model.decode(acts, idx)
        sse += (x - x_hat).double().pow(2).sum().item()
        xd = x.double().cpu()
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum().item()
        fired = acts > 0
        l0 += int(fired.sum())
        counts += torch.bincount(idx[fired], minlength=model.num_latents)
    total_var = sum_x2 - (sum_x.pow(2).sum().item() / n)
    freq = (counts.double() / n).cpu().numpy()
    return {"fvu": sse / total_var, "l0": l0 / n, "dead_fraction": float((counts == 0).double().mean()),
            "n_tokens": n, "num_latents": model.num_latents, "k": model.k, "firing_frequency": freq}


def eval_tables(result: dict[str, Any]):
    """(metrics DataFrame with one row, per-latent firing DataFrame) from :func:`evaluate_sae`'s dict."""
    import pandas as pd

    metrics = pd.DataFrame([{k: v for k, v in result.items() if k != "firing_frequency"}])
    freq = np.asarray(result["firing_frequency"])
    firing = pd.DataFrame({"latent": np.arange(len(freq)), "firing_frequency": freq, "dead": freq == 0})
    return metrics, firing


def save_eval(result: dict[str, Any], tables_dir: str | os.PathLike, name: str = "sae_eval") -> tuple[Path, Path]:
    """Write ``<name>_metrics.csv`` and ``<name>_firing.csv`` to ``tables_dir``."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    metrics, firing = eval_tables(result)
    paths = tables_dir / f"{name}_metrics.csv", tables_dir / f"{name}_firing.csv"
    metrics.to_csv(paths[0], index=False)
    firing.to_csv(paths[1], index=False)
    return paths


def plot_firing_histogram(firing_frequency, ax=None, title: str | None = None):
    """Seaborn histogram of log10 firing frequency (dead latents reported in the title)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    freq = np.asarray(firing_frequency, dtype=np.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    alive = freq[freq > 0]
    if len(alive):
        sns.histplot(x=np.log10(alive), bins=50, ax=ax)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(title or f"{len(freq)} latents, {np.mean(freq == 0):.1%} never fire")
    return ax
