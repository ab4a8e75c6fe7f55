"""The one pooling vocabulary: how a block's (C, h, w) output is turned into what is stored, probed or fitted.

* ``MEAN`` ("mean"): the spatial mean, one C-vector per image;
* ``MAP`` ("map"): the (C, h, w) map kept as is;
* ``FLAT`` ("flat"): the map flattened to one C*h*w vector;
* ``TOKENS`` ("tokens"): every spatial position its own C-vector.

Who takes which (each user's choices are named here): a feature store (``ExtractionConfig.pooling``, the hookpoint
index column ``pooling``) ``STORE_POOLINGS`` = MEAN or MAP; a probe (``ProbeData.pool``) ``PROBE_POOLINGS`` = MEAN or
FLAT; a k-SAE (``SaeConfig.pooling``) ``SAE_POOLINGS`` = ``AUTO`` (MEAN for vectors, TOKENS for maps), MEAN or
TOKENS; a Decoding Diffusion h form (``form=``) ``H_FORMS`` = MEAN or FLAT. :func:`check_pooling` validates a value
against the choices of its user;
:func:`read_pooling` / :func:`read_pooling_field` turn the spellings of earlier versions ("none", "flatten",
"pooled", "spatial"; the SAE field ``tokens``) into these when a file written by one is read.
"""

from __future__ import annotations

from typing import Any, Sequence

MEAN = "mean"
MAP = "map"
FLAT = "flat"
TOKENS = "tokens"
POOLINGS = (MEAN, MAP, FLAT, TOKENS)
AUTO = "auto"  # a k-SAE's pooling taken from its features: MEAN for (N, C) vectors, TOKENS for (N, C, h, w) maps

STORE_POOLINGS = (MEAN, MAP)  # what a feature store keeps per image
PROBE_POOLINGS = (MEAN, FLAT)  # how a linear probe turns a map into a vector
SAE_POOLINGS = (AUTO, MEAN, TOKENS)  # what a k-SAE takes as one token
H_FORMS = (MEAN, FLAT)  # Decoding Diffusion: h of a prompt or an image as a C-vector or a C*h*w vector

LEGACY = {"none": MAP, "flatten": FLAT, "pooled": MEAN, "spatial": TOKENS}
"""Spellings of earlier versions -> the current name (feature stores "none", probes "flatten", SAEs "pooled" /
"spatial", h forms "pooled")."""


class PoolingError(ValueError):
    """A pooling value that is not one of the choices of its user (the message names them)."""


def check_pooling(value: Any, allowed: Sequence[str], what: str = "pooling",
                  error: type[ValueError] = PoolingError) -> str:
    """``value`` if it is one of ``allowed``, else ``error`` (a ValueError subclass: :class:`PoolingError` or the
    caller's own) naming the bad value, ``what`` it was for and the valid choices; an old spelling is named with
    what it is now called."""
    if isinstance(value, str) and value in allowed:
        return value
    renamed = f" ({value!r} is now {LEGACY[value]!r})" if isinstance(value, str) and value in LEGACY else ""
    raise error(f"{what} {value!r} is not one of {list(allowed)}{renamed}")


def read_pooling(value: Any, allowed: Sequence[str] | None = None, what: str = "pooling",
                 error: type[ValueError] = PoolingError) -> Any:
    """A pooling value read from a file: an old spelling becomes its current name, anything else is returned as is.
    With ``allowed`` the result is also checked (:func:`check_pooling`; the message names the value as written)."""
    current = LEGACY.get(value, value) if isinstance(value, str) else value
    if allowed is not None and current not in allowed:
        check_pooling(value, allowed, what, error)
    return current


def read_pooling_field(record: dict[str, Any], old_keys: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of a record read from a file (a store manifest's ``config``, an SAE ``cfg.json``) with its
    ``pooling`` value in the current spelling; a record of an earlier version that names it by one of
    ``old_keys`` (an SAE's ``tokens``) gets it under ``pooling``. Records without one are returned unchanged."""
    out = dict(record)
    for key in old_keys:
        if key in out and "pooling" not in out:
            out["pooling"] = out.pop(key)
    if "pooling" in out:
        out["pooling"] = read_pooling(out["pooling"])
    return out
