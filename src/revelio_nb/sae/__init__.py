"""TopK sparse autoencoders (k-SAEs) in plain PyTorch: no Triton, sparse decode and sparse encoder backward.

z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec. Laid out like EleutherAI sparsify
(config, fused encoder, sparse coder, trainer); each module imports only those above it in this list:

* :mod:`.config`: :class:`SaeConfig` (architecture, ``cfg.json``), :class:`TrainConfig` (``train_cfg.json``),
  ``B_DEC_INITS`` and validation (``SaeConfig.pooling``: :mod:`revelio_nb.pooling`); :class:`SaeError`.
* :mod:`.kernels`: the top-k encoder and sparse decode autograd functions, and the sparse products and buffers
  the training step builds on.
* :mod:`.model`: :class:`SparseAutoencoder` (encode, decode, FVU, AuxK) and its sparsify-layout checkpoints
  (``cfg.json`` + ``sae.safetensors``, ``layout_version``); nothing is ever pickled.
* :mod:`.step`: :class:`SaeTrainStep`, the autograd-free training step (hand-written sparse gradients, fused Adam).
* :mod:`.source`: :class:`ArraySource` (tokens of a memory-mapped feature store, read without mapping it) and
  :func:`batch_tokens` (the resumable training order).
* :mod:`.train`: :func:`train_sae` (train, resume, checkpoints) and :class:`SaeTrainingError`.
* :mod:`.evaluate`: :func:`evaluate_sae` (FVU, L0, dead fraction, firing frequency) and its tables.
* :mod:`.plots`: :func:`plot_firing_histogram`.
"""

from .config import B_DEC_INITS, SaeConfig, SaeError, TrainConfig
from .evaluate import eval_tables, evaluate_sae, save_eval
from .kernels import dense_decode, sparse_decode
from .model import (
    SAE_LAYOUT_VERSION,
    EncoderOutput,
    ForwardOutput,
    SparseAutoencoder,
    checkpoint_metadata,
)
from .plots import plot_firing_histogram
from .source import ArraySource, as_source, batch_tokens, permute
from .step import SaeTrainStep
from .train import SaeTrainingError, geometric_median, train_sae

__all__ = [
    "B_DEC_INITS", "SAE_LAYOUT_VERSION",
    "ArraySource", "EncoderOutput", "ForwardOutput", "SaeConfig", "SaeError", "SaeTrainStep", "SaeTrainingError",
    "SparseAutoencoder", "TrainConfig",
    "as_source", "batch_tokens", "checkpoint_metadata", "dense_decode", "eval_tables", "evaluate_sae",
    "geometric_median", "permute", "plot_firing_histogram", "save_eval", "sparse_decode", "train_sae",
]
