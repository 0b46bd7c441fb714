"""Showing the library's progress (vepatch.progress): a rich bar on a terminal, plain lines on
stderr for cron logs. Stdout stays the command's result."""

from __future__ import annotations

import contextlib
import time

from .. import progress
from ._app import err, out

def progress_bar(label: str = ""):
    """Show the library's progress (vepatch.progress) while the block runs: a rich bar with
    ETA on a terminal; on a pipe (cron), plain lines on stderr — a stage's start, then at most
    one every PLAIN_EVERY_S seconds, and its end. Stdout (--json) is never touched. Yields a
    (step, total) callback reported as stage `label`, for callers that count themselves."""
    @contextlib.contextmanager
    def shown():
        if out.quiet:  # under torchrun, rank 0 alone shows anything
            yield progress.steps(label or "work")
            return
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err, transient=True) as bar:
                tasks: dict[str, object] = {}

                def draw(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total or None)
                    bar.update(tasks[stage], completed=done, total=total or None)

                with progress.listening(draw):
                    yield progress.steps(label or "work")
            return
        last: dict[str, float] = {}
        started: dict[str, float] = {}
        ended: set[str] = set()

        def line(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done == 0:  # a stage (re)starts
                ended.discard(stage)
                last.pop(stage, None)
                started.pop(stage, None)
            first, finished = stage not in last, bool(total) and done >= total
            if stage in ended or not (first or finished or now - last[stage] >= PLAIN_EVERY_S):
                return
            if finished:
                ended.add(stage)
            started.setdefault(stage, now)
            last[stage] = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            eta = ""
            if total and 2 <= done < total and now > started[stage]:  # an estimate needs a rate
                eta = f", about {(now - started[stage]) * (total - done) / done:.0f} s left"
            err.print(f"{stage}: {done:,}/{total:,}{share}{eta}", markup=False, highlight=False, soft_wrap=True)

        with progress.listening(line):
            yield progress.steps(label or "work")

    return shown()


PLAIN_EVERY_S = 30.0  # cron logs: one progress line per stage at most this often
