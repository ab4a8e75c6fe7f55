"""k-SAE configuration: the architecture (:class:`SaeConfig`, written to ``cfg.json``), the training
hyper-parameters (:class:`TrainConfig`, written to ``train_cfg.json``), their valid choices and validation, and
:class:`SaeError`, the error every part of the package raises for a bad configuration, checkpoint or input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..pooling import AUTO, SAE_POOLINGS, check_pooling

B_DEC_INITS = ("median", "mean", "zeros")


class SaeError(ValueError):
    """A bad SAE configuration, checkpoint or input."""


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
    pooling: str = AUTO
    """What one token is (:mod:`revelio_nb.pooling`): ``"mean"`` (one vector per image), ``"tokens"`` (one token per
    spatial position) or ``"auto"`` (from the features: ``"mean"`` for vectors, ``"tokens"`` for maps). A ``cfg.json``
    of an earlier version names it ``tokens`` (``"pooled"`` / ``"spatial"``) and is read as this."""
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
        check_pooling(self.pooling, SAE_POOLINGS, "SaeConfig.pooling", error=SaeError)
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
