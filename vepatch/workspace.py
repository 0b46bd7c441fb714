"""A workspace: vepatch.yaml (the recipe) beside .vepatch/ (the store). Commands find it
from the current folder upwards, or from -C DIR.

This module is the store's layout: every path under .vepatch/ (and the folders cycle keeps
beside it) is named here and nowhere else.

  vepatch.yaml                          the recipe
  .vepatch/HEAD                         the current version ('base' when absent)
  .vepatch/log.jsonl                    one line per command that changed something
  .vepatch/lock                         the OS lock a writing command holds
  .vepatch/diagnoses/<utc>.json         a diagnosis, + <utc>.masks.safetensors
  .vepatch/candidates/<id>/             delta.safetensors + candidate.json (+ guard.json)
  .vepatch/patches/vNNNN/               patch.safetensors + patch.json + guard.json
  .vepatch/cycles/<id>/                 state.json + train/ and holdout/ (the cycle's new images)
  .vepatch/seen.jsonl                   content hashes of every inbox image ever taken
  .vepatch/bench/<utc>/                 bench.json, bench.md, bench.png
  .vepatch/suites/<name>/               built-in guard suites (`builtin:digits`), written on first use
  .vepatch/cache/predictions/           per-example predictions kept across runs
  archive/<date>/<class>/               inbox images after their cycle (never deleted)
  quarantine/<date>/                    bad drops, as laid out in the inbox, + reasons.jsonl
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import __version__, clock
from .errors import LockedError, UsageError
from .fsio import append_line, write_text_atomic
from .recipe import RECIPE_FILE, Recipe, dump_recipe, load_recipe

STORE_DIR = ".vepatch"
_HELD: dict[str, int] = {}  # workspace root -> lock depth held by this process
LOCK_HELD_ENV = "VEPATCH_LOCK_HELD"  # set by a process holding the lock for the children it runs on its behalf
SUBDIRS = ("candidates", "patches", "diagnoses")
PATCH_FILE, MANIFEST_FILE, GUARD_FILE = "patch.safetensors", "patch.json", "guard.json"  # in patches/vNNNN/
DELTA_FILE, CANDIDATE_FILE = "delta.safetensors", "candidate.json"  # in candidates/<id>/ (+ GUARD_FILE)
EVIDENCE_FILE = "predictions.safetensors"  # per-example evidence, beside every GUARD_FILE (evidence.py)
STATE_FILE = "state.json"  # in cycles/<id>/


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def recipe_path(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def store(self) -> Path:
        return self.root / STORE_DIR

    @property
    def head_path(self) -> Path:
        return self.store / "HEAD"

    @property
    def log_path(self) -> Path:
        return self.store / "log.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.store / "lock"

    @property
    def diagnoses(self) -> Path:
        return self.store / "diagnoses"

    def diagnosis_file(self, created: str) -> Path:
        return self.diagnoses / f"{created}.json"

    def diagnosis_masks(self, created: str) -> Path:
        return self.diagnoses / f"{created}.masks.safetensors"

    @property
    def candidates(self) -> Path:
        return self.store / "candidates"

    def candidate_dir(self, candidate_id: str) -> Path:
        return self.candidates / candidate_id

    @property
    def patches(self) -> Path:
        return self.store / "patches"

    def version_dir(self, number: int) -> Path:
        return self.patches / f"v{number:04d}"

    @property
    def cycles(self) -> Path:
        return self.store / "cycles"

    def cycle_state(self, cycle_id: str) -> Path:
        return self.cycles / cycle_id / STATE_FILE

    def cycle_train(self, cycle_id: str) -> Path:
        """The cycle's copy of its new images kept for training, <class>/<hash>.<ext>: what it
        diagnoses, and part of every later cycle's labelled pool."""
        return self.cycles / cycle_id / "train"

    def cycle_holdout(self, cycle_id: str) -> Path:
        """The cycle's copy of its new images set aside as its target holdout: never trained on."""
        return self.cycles / cycle_id / "holdout"

    @property
    def seen_path(self) -> Path:
        return self.store / "seen.jsonl"

    @property
    def bench(self) -> Path:
        return self.store / "bench"

    def builtin_suite(self, name: str) -> Path:
        """A `builtin:NAME` guard suite, written here on first use (suites.py)."""
        return self.store / "suites" / name

    @property
    def prediction_cache(self) -> Path:
        return self.store / "cache" / "predictions"

    @property
    def set_aside(self) -> Path:
        """Versions and candidates that did not verify, moved out of the chain (`verify --quarantine`)."""
        return self.store / "quarantine"

    def archive_day(self, day: str) -> Path:
        return self.root / "archive" / day

    def quarantine_day(self, day: str) -> Path:
        """Bad drops of that day, as they were laid out in the inbox, + reasons.jsonl."""
        return self.root / "quarantine" / day

    def recipe(self) -> Recipe:
        return load_recipe(self.recipe_path)

    def resolve(self, path: str) -> Path:
        from .data import resolve_path

        return resolve_path(path, self.root)

    def portable(self, source: str) -> str:
        """A file (or 'file#row') as the store records it: relative to the workspace when it
        lies inside, so a moved workspace keeps every holdout; absolute otherwise."""
        try:
            return str(Path(source).absolute().relative_to(self.root.absolute()))
        except ValueError:
            return source

    def log(self, event: str, **fields) -> None:
        record = {"time": clock.iso(), "event": event, "vepatch": __version__, **fields}
        append_line(self.log_path, record)

    @contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """Exclusive OS lock on .vepatch/lock: released by the kernel if the process dies.
        Re-entrant within one process (a cycle holds it across diagnose, apply and guard)."""
        key = str(self.root)
        if _HELD.get(key) or os.environ.get(LOCK_HELD_ENV) == key:  # ours, or our parent's (bench's applies)
            _HELD[key] = _HELD.get(key, 0) + 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockedError(
                            f"{self.root}: another vepatch command holds the workspace lock",
                            "wait for it to finish, or pass --wait SECONDS",
                        ) from None
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[key] = 1
            yield
        finally:
            _HELD.pop(key, None)
            os.close(fd)  # closing releases the lock


def find_workspace(start: Path | None = None) -> Workspace:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / RECIPE_FILE).is_file() and (folder / STORE_DIR).is_dir():
            return Workspace(folder)
    raise UsageError(
        f"{here}: not inside a vepatch workspace",
        "run `vepatch init` here, or pass -C DIR to point at one",
    )


def init_workspace(root: Path, recipe: Recipe, force: bool = False) -> Workspace:
    ws = Workspace(root.resolve())
    if ws.recipe_path.exists() and not force:
        raise UsageError(f"{ws.recipe_path}: already a workspace", "pass --force to overwrite the recipe")
    root.mkdir(parents=True, exist_ok=True)
    for sub in SUBDIRS:
        (ws.store / sub).mkdir(parents=True, exist_ok=True)
    write_text_atomic(ws.recipe_path, dump_recipe(recipe))
    ws.log("init", root=str(ws.root))
    return ws
