"""GPU out-of-memory: retry with half the batch, down to 1, then one clear error."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from ..errors import VepatchError

T = TypeVar("T")


def retry_on_oom(run: Callable[[int], T], batch_size: int, what: str) -> T:
    while True:
        try:
            return run(batch_size)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size <= 1:
                raise VepatchError(f"{what}: CUDA out of memory even at batch size 1",
                                   "use --device cpu, or a GPU with more free memory") from None
            batch_size //= 2
