"""Where vepatch keeps per-user state: one directory, movable with VEPATCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def user_dir() -> Path:
    env = os.environ.get("VEPATCH_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vepatch"


def user_cache_dir() -> Path:
    """Built base models and text-embedding caches."""
    return user_dir() / "cache"


def cached_tensor(kind: str, key: str, compute: Callable[[], "torch.Tensor"]) -> "torch.Tensor":
    """A tensor kept in the user cache as <kind>/<key>.safetensors: read when there (a damaged
    entry is rebuilt, never trusted), else computed and written atomically."""
    from safetensors.torch import load_file, save

    from .fsio import write_bytes_atomic

    path = user_cache_dir() / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["tensor"]
        except Exception:
            pass
    tensor = compute().contiguous()
    write_bytes_atomic(path, save({"tensor": tensor}))
    return tensor
