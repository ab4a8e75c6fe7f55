"""Out-of-memory-adaptive micro-batching of a forward pass (:class:`MicroBatch`, :func:`is_oom`).

A chunk of a feature store is passed through the model in micro-batches that start at the chunk size and halve on
out-of-memory; rows, chunks and checksums never change. Shared by the diffusion and the vision-encoder extraction.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any, Callable

import torch


def is_oom(e: BaseException) -> bool:
    """CUDA (and other accelerators') out-of-memory errors, and the CPU allocator's failure to allocate."""
    if isinstance(e, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class MicroBatch:
    """The forward micro-batch of one extraction: starts at the chunk size and halves on out-of-memory.

    Only the forward passes are split: chunks (and so rows, progress and checksums) never change. Features of a
    micro-batched pass equal the full-batch ones up to floating-point reassociation in the kernels.
    """

    def __init__(self, size: int):
        self.size = int(size)

    def run(self, fn: Callable[[slice], Any], n: int, what: str) -> list[Any]:
        while True:
            try:
                return [fn(slice(i, min(i + self.size, n))) for i in range(0, n, self.size)]
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_oom(e):
                    raise
                if self.size == 1:
                    raise RuntimeError(
                        f"out of memory in the {what} even with a micro-batch of 1 image; use a smaller image_size, "
                        f"fewer blocks, precision='fp16'/'bf16', or a device with more memory") from e
            # outside the except block, so the traceback (and the tensors it holds) is already released
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.size = max(1, self.size // 2)
            warnings.warn(f"out of memory in the {what}: retrying with a forward micro-batch of {self.size}")

