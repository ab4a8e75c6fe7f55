"""The k-SAE model: :class:`SparseAutoencoder` (encode, decode, forward with FVU and AuxK) and its checkpoints in
EleutherAI sparsify's layout (``cfg.json`` + ``sae.safetensors``, ``layout_version``; our extras are extra
``cfg.json`` keys, nothing is ever pickled), plus :func:`checkpoint_metadata`.

z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..paths import atomic_path, atomic_write_json
from ..pooling import read_pooling_field
from .config import SaeConfig, SaeError
from .kernels import _encode_select, _TopKEncoder, dense_decode, sparse_decode

# sparsify's SparseCoderConfig fields we write so that its loader accepts the folder.
_SPARSIFY_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                  "skip_connection", "transcode")
# cfg.json ``layout_version`` of the folders save() writes (1: scale folded into W_enc / W_dec; 2: raw-space
# weights that keep sparsify's invariants, see SparseAutoencoder.save).
SAE_LAYOUT_VERSION = 2


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
        out.update({key: c[key] for key in ("normalize_input", "b_dec_init", "pooling", "hookpoint", "timestep",
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
        raw = read_pooling_field(json.loads(cfg_path.read_text()), old_keys=("tokens",))  # earlier: tokens "spatial"
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
