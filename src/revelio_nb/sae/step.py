"""The autograd-free k-SAE training step (:class:`SaeTrainStep`): forward, hand-written sparse gradients of
FVU + ``auxk_alpha`` * AuxK, the decoder-gradient projection, Adam (:func:`_adam_`, exactly ``torch.optim.Adam``'s)
and the decoder renormalisation; tests hold it to dense autograd + ``torch.optim.Adam``."""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SaeError
from .kernels import _csr_matmul, _encode_select, _pair_dots, _sort_key, _Workspace
from .model import ForwardOutput, SparseAutoencoder

# Threads for the training step's small and sparse operations (sort, gathers, CSR products; the GEMM, top-k, Adam
# and renormalisation use all of torch's threads). On the 2-core project machine a second thread made them no
# faster and, under load, much slower (each parallel region waits for its slowest thread); raise it on big CPUs.
SPARSE_PHASE_THREADS = 1


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
