"""Where vepatch keeps per-user state: one directory, movable with VEPATCH_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def user_dir() -> Path:
    env = os.environ.get("VEPATCH_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vepatch"


def user_cache_dir() -> Path:
    """Built base models and text-embedding caches."""
    return user_dir() / "cache"
