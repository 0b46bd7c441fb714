"""Per-example predictions of a model on a suite, kept on disk across runs.

A guard's baseline is usually the same version on the same suites run after run (every cron
cycle, every bench seed), so its predictions are kept in `.vepatch/cache/predictions/`, one
small .npy per (model fingerprint, preprocessing, head, the suite's files, batch size,
device, library versions). Any change to one of those is a different key, never a stale hit.
Files are written atomically; an unreadable one is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from . import distributed
from ..data import ImageSet
from ..fsio import write_bytes_atomic
from .passes import Predictions

KEEP = 2000  # newest entries kept; older ones are deleted when a new one is written


def key(fingerprint: str, preprocess, head: torch.Tensor, images: ImageSet, batch_size: int, device: str) -> str:
    digest = hashlib.sha256(json.dumps({
        "fingerprint": fingerprint, "preprocess": repr(preprocess), "batch_size": batch_size,
        "device": device, "torch": torch.__version__, "vepatch": __version__, "images": images.state_hash(),
    }, sort_keys=True).encode())
    digest.update(head.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class PredictionCache:
    def __init__(self, folder: Path):
        self.folder = folder
        self.hits = self.misses = 0

    def get_or_compute(self, key_: str, labels: list[int], compute: Callable[[], Predictions]) -> Predictions:
        path = self.folder / f"{key_}.npy"
        preds = _read(path, len(labels))
        if distributed.all_true(preds is not None):  # every rank takes the same branch
            self.hits += 1
            return Predictions(np.array(labels, dtype=np.int64), preds)
        self.misses += 1
        result = compute()
        if distributed.is_writer():
            self.put(key_, result)
        return result

    def put(self, key_: str, predictions: Predictions) -> None:
        """Keep `predictions` under `key_` (a writer's call: no collective, unlike get_or_compute)."""
        path = self.folder / f"{key_}.npy"
        if _read(path, len(predictions.preds)) is None:
            buf = io.BytesIO()
            np.save(buf, predictions.preds.astype(np.int64), allow_pickle=False)
            write_bytes_atomic(path, buf.getvalue())
            self._prune()

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*.npy"), key=lambda f: f.stat().st_mtime_ns)
        for f in files[:-KEEP]:
            f.unlink(missing_ok=True)


def _read(path: Path, n: int) -> np.ndarray | None:
    """The kept predictions, or None when absent, unreadable or of the wrong length."""
    try:
        preds = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return preds.astype(np.int64) if preds.shape == (n,) else None
