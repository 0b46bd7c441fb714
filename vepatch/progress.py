"""How far a long step has got, for whoever listens (the CLI draws a bar or writes lines); the
library only counts. Without a listener every call here does nothing.

    with progress.listening(show):         # show(stage, done, total)
        progress.begin("guard", 5_000)     # a stage and its units (images, steps)
        progress.advance(32)               # per batch
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

Listener = Callable[[str, int, int], None]


@dataclass
class _Stage:
    listener: Listener
    name: str = ""
    done: int = 0
    total: int = 0


_current: ContextVar[Optional[_Stage]] = ContextVar("vepatch_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _current.set(_Stage(listener))
    try:
        yield
    finally:
        _current.reset(token)


def begin(name: str, total: int) -> None:
    stage = _current.get()
    if stage is not None:
        stage.name, stage.done, stage.total = name, 0, total
        stage.listener(name, 0, total)


def advance(n: int) -> None:
    stage = _current.get()
    if stage is not None and stage.name:
        stage.done = min(stage.total, stage.done + n) if stage.total else stage.done + n
        stage.listener(stage.name, stage.done, stage.total)


def steps(name: str) -> Callable[[int, int], None]:
    """A (step, total) callback for a training loop, reported as stage `name`."""

    def report(step: int, total: int) -> None:
        stage = _current.get()
        if stage is not None:
            stage.name, stage.done, stage.total = name, step, total
            stage.listener(name, step, total)

    return report
