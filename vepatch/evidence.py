"""Per-example evidence of a verdict: for every suite the guard judged, each image's source,
true label and the baseline's and the candidate's predictions (at the chosen strength; for a
refused candidate, its best try; a captioning suite: both models' caption likelihoods).
Written beside guard.json as predictions.safetensors: the labels as int16 tensors (scores as
float32), the sources and class names as JSON in the file's metadata (one file, loaded
without pickle; a 1,000-image suite costs ~6 KB of tensors plus its paths)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StoreError


@dataclass(frozen=True)
class SuiteEvidence:
    name: str
    role: str  # 'target' or 'guard'
    classnames: list[str]
    sources: list[str]  # as the store records them (Workspace.portable)
    labels: np.ndarray  # (n,) true class indices (a captioning suite: each image's caption)
    before: np.ndarray  # (n,) the baseline's predicted class indices (kind 'scores': its per-image values)
    after: np.ndarray  # (n,) the candidate's
    kind: str = "labels"  # 'labels': before/after are predicted classes; 'scores': values in (0, 1], higher = better

    @property
    def scores(self) -> bool:
        return self.kind == "scores"

    @property
    def fixed(self) -> np.ndarray:
        """Indices the baseline got wrong and the candidate right (scores: that the candidate
        scores higher, the biggest gain first)."""
        if self.scores:
            return _by_change(self.after - self.before)
        return np.flatnonzero((self.before != self.labels) & (self.after == self.labels))

    @property
    def broke(self) -> np.ndarray:
        """Indices the baseline got right and the candidate wrong (scores: lower, the biggest
        loss first)."""
        if self.scores:
            return _by_change(self.before - self.after)
        return np.flatnonzero((self.before == self.labels) & (self.after != self.labels))


def _by_change(gain: np.ndarray) -> np.ndarray:
    """Indices where `gain` > 0, the largest first."""
    up = np.flatnonzero(gain > 0)
    return up[np.argsort(-gain[up], kind="stable")]


@dataclass(frozen=True)
class Evidence:
    strength: float  # the lambda the candidate's predictions were made at (refused: its best try)
    suites: list[SuiteEvidence]


def to_bytes(proof: Evidence) -> bytes:
    from safetensors.numpy import save

    suites = proof.suites

    tensors, index = {}, []
    for k, s in enumerate(suites):
        for field in ("labels", "before", "after"):
            dtype = np.float32 if s.scores and field != "labels" else np.int16
            tensors[f"{k}.{field}"] = np.ascontiguousarray(np.asarray(getattr(s, field), dtype=dtype))
        index.append({"name": s.name, "role": s.role, "classnames": s.classnames, "sources": s.sources, "kind": s.kind})
    return save(tensors, metadata={"suites": json.dumps(index), "strength": repr(float(proof.strength))})


def read(path: Path) -> Evidence:
    """The evidence written beside a verdict; a missing or unreadable file is a StoreError."""
    from safetensors import safe_open

    if not path.is_file():
        raise StoreError(f"{path}: no per-example evidence", "verdicts older than per-example evidence have none; judge a new candidate")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_all = f.metadata()
            index = json.loads(meta_all["suites"])
            out = []
            for k, meta in enumerate(index):
                kind = meta.get("kind", "labels")  # evidence written before captioning suites has none
                arrays = {field: f.get_tensor(f"{k}.{field}").astype(
                    np.float64 if kind == "scores" and field != "labels" else np.int64) for field in ("labels", "before", "after")}
                out.append(SuiteEvidence(meta["name"], meta["role"], list(meta["classnames"]), list(meta["sources"]),
                                         **arrays, kind=kind))
            return Evidence(float(meta_all["strength"]), out)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: unreadable evidence ({exc})", "judge the candidate again in a fresh workspace") from None
