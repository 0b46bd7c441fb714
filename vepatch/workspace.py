"""A workspace: vepatch.yaml (the recipe) beside .vepatch/ (the store). Commands find it
from the current folder upwards, or from -C DIR."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import LockedError, UsageError
from .fsio import append_line, write_text_atomic
from .recipe import RECIPE_FILE, Recipe, dump_recipe, load_recipe

STORE_DIR = ".vepatch"
_HELD: dict[str, int] = {}  # workspace root -> lock depth held by this process
SUBDIRS = ("candidates", "patches", "diagnoses")


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
    def diagnoses(self) -> Path:
        return self.store / "diagnoses"

    @property
    def candidates(self) -> Path:
        return self.store / "candidates"

    @property
    def patches(self) -> Path:
        return self.store / "patches"

    @property
    def prediction_cache(self) -> Path:
        return self.store / "cache" / "predictions"

    @property
    def log_path(self) -> Path:
        return self.store / "log.jsonl"

    def recipe(self) -> Recipe:
        return load_recipe(self.recipe_path)

    def resolve(self, path: str) -> Path:
        from .data import resolve_path

        return resolve_path(path, self.root)

    def log(self, event: str, **fields) -> None:
        record = {"time": utc_now(), "event": event, "vepatch": __version__, **fields}
        append_line(self.log_path, record)

    @contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """Exclusive OS lock on .vepatch/lock: released by the kernel if the process dies.
        Re-entrant within one process (a cycle holds it across diagnose, apply and guard)."""
        key = str(self.root)
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = os.open(self.store / "lock", os.O_RDWR | os.O_CREAT, 0o644)
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


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
