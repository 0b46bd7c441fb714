"""Sharded evaluation with torch.distributed, started by torchrun.

`vepatch guard` and `vepatch eval` under `torchrun --nproc_per_node N -m vepatch ...` split every
suite's batches across the N processes (batch b on rank b mod N; the batches themselves are the
single-process ones, so each logit is computed exactly as it would be alone), gather the
per-example predictions onto every rank, and let rank 0 alone write to the store and print.
Without torchrun's environment nothing here does anything.
"""

from __future__ import annotations

import os
import sys
from typing import TypeVar

T = TypeVar("T")


def _dist():
    """torch.distributed, imported on first use: a command that never touches torch (`vepatch
    log`, `--help`) must not pay for importing it."""
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """Started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes; returns this rank's device ('cuda:<local
    rank>' on GPUs, else `device`). A no-op without torchrun."""
    if not launched() or _dist().is_initialized():
        return device
    import torch

    dist = _dist()
    if device.startswith("cuda") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def active() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: no group can have been joined
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the group's once joined, torchrun's RANK before that, else 0."""
    if active():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_writer() -> bool:
    """Only rank 0 writes to the store, takes the workspace lock and prints."""
    return rank() == 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def my_share(n: int) -> range:
    """The batch indices this rank runs out of n."""
    return range(_dist().get_rank(), n, _dist().get_world_size()) if active() else range(n)


def _everyone(obj) -> list:
    """`obj` from every rank, in rank order (just [obj] outside a group)."""
    if not active():
        return [obj]
    parts: list = [None] * _dist().get_world_size()
    _dist().all_gather_object(parts, obj)
    return parts


def gather_dict(local: dict[int, T]) -> dict[int, T]:
    """Every rank's entries, merged, on every rank."""
    return {k: v for part in _everyone(local) for k, v in part.items()}


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank (so all ranks take the same branch)."""
    return all(_everyone(bool(flag)))


def shutdown() -> None:
    """Leave the group together: rank 0 still writes the store after the last collective, and a
    rank that tore its gloo pairs down meanwhile could abort the other (SIGABRT, seen on a
    loaded machine), so every rank waits at a barrier first."""
    if "torch.distributed" not in sys.modules:
        return
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if active():
            dist.barrier()
        dist.destroy_process_group()
