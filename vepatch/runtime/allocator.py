"""Keep CPU activations on glibc's heap instead of fresh mmap()s.

By default glibc serves every allocation above ~128 KiB-32 MiB with its own mmap() and returns it
on free, so each forward pass of a CNN at batch 32-64 maps, zero-fills and unmaps hundreds of MB:
on this project's 2-core CPU box the kernel time (page faults) was larger than the compute
(`time` on one guard run under cProfile: 3 min 20 s sys vs 2 min 32 s user). Raising the mmap and trim
thresholds keeps freed blocks for reuse (README, "Speed": 2.2-2.6x on the guard's forward
passes). The price: the process keeps its peak heap until it exits. The command line calls this
once at start; VEPATCH_MALLOC=system leaves glibc's defaults alone (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
THRESHOLD = 1 << 30


def tune() -> bool:
    """Raise glibc's mmap/trim thresholds; False where that does not apply (not glibc, opted out)."""
    if os.environ.get("VEPATCH_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
