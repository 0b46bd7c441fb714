"""`vepatch gc`: what the store no longer needs, and removing it. Never a version, never a
cycle (its holdout copies guard later patches), never a candidate still waiting for a guard."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from . import store
from .records import PatchManifest, read_record
from .workspace import CANDIDATE_FILE, Workspace


@dataclass(frozen=True)
class Garbage:
    path: Path
    why: str
    nbytes: int


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def candidate_garbage(ws: Workspace) -> list[Garbage]:
    """Refused candidates, promoted ones (their version holds the patch and the verdict) and
    bench runs (bench.json keeps their results)."""
    found = []
    for cid in store.candidates(ws):
        folder = ws.candidate_dir(cid)
        verdict, version = store.read_candidate_verdict(ws, cid), store.version_of(ws, cid)
        if verdict is not None and not verdict.accepted:
            why = "refused candidate"
        elif version:
            why = f"promoted: {version} holds it"
        elif read_record(PatchManifest, folder / CANDIDATE_FILE).origin == "bench":
            why = "bench run (its results are in .vepatch/bench/)"
        else:
            continue  # waiting to be judged
        found.append(Garbage(folder, why, size(folder)))
    return found


def diagnosis_garbage(ws: Workspace) -> list[Garbage]:
    """Every diagnosis but the newest (`apply --diagnosis latest` reads only that one that fits)."""
    records = sorted(ws.diagnoses.glob("*.json")) if ws.diagnoses.is_dir() else []
    found = []
    for path in records[:-1]:
        masks = ws.diagnosis_masks(path.stem)
        nbytes = size(path) + (size(masks) if masks.is_file() else 0)
        found.append(Garbage(path, "older diagnosis", nbytes))
    return found


def collect(ws: Workspace) -> list[Garbage]:
    leftovers = [Garbage(p, "temp folder left by a crash", size(p)) for p in store.leftovers(ws)]
    return candidate_garbage(ws) + diagnosis_garbage(ws) + leftovers


def remove(ws: Workspace, items: list[Garbage]) -> int:
    """Delete what `collect` found; returns the bytes freed. A diagnosis goes record first:
    a crash in between leaves masks nobody reads, never a record without its masks."""
    freed = 0
    for item in items:
        if item.path.is_dir():
            shutil.rmtree(item.path)
        else:
            item.path.unlink(missing_ok=True)
            if item.path.parent == ws.diagnoses:
                ws.diagnosis_masks(item.path.stem).unlink(missing_ok=True)
        freed += item.nbytes
    return freed
