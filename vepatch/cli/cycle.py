"""The cron step: cycle (and its measuring mode, --stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import command, emit_json, err, out
from .progress_view import progress_bar
from .options import DeviceOpt, JsonOpt, WorkspaceOpt


@command
def cycle(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen; change nothing.")] = False,
    wait: Annotated[float, typer.Option("--wait", help="Wait up to SECONDS for the workspace lock (default: exit 5 at once).")] = 0.0,
    stream: Annotated[Optional[Path], typer.Option("--stream", help="Measure: drop each round of STREAM/<round>/{pool,errors}/ into the inbox, one cycle per round.")] = None,
    abandon: Annotated[bool, typer.Option("--abandon", help="Set the unfinished cycle aside: its new images go to quarantine/.")] = False,
    settle: Annotated[Optional[float], typer.Option("--settle", help="A drop written less than SECONDS ago waits for the next run (default: the recipe's cycle.settle_s; 0 for a drop you know is complete).")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """One continual step for cron: inbox -> diagnose -> apply -> guard -> promote -> archive.

    Exit 0 promoted, 3 refused (candidate and verdict kept), 4 nothing new, 5 locked, 1 error.
    A cycle killed at any point is finished by the next one; no image is lost or used twice.

    Example: vepatch cycle --json   (crontab: see examples/crontab)
    """
    from .. import context
    from ..cycle import abandon as abandon_cycle
    from ..cycle import failure_report, run_logged
    from ..stream import run_stream
    from .render import cycle_report, stream_table

    ctx = context.open_context(workspace, device=device)
    if settle is not None:
        from ..recipe import with_overrides

        ctx = context.Context(ctx.workspace, with_overrides(ctx.recipe, {"cycle.settle_s": settle}), ctx.device)
    if stream is not None:
        def say(r):
            if not as_json:
                err.print(f"round {r.round}: {r.status}, HEAD {r.version}")

        rounds = run_stream(ctx, stream.resolve(), wait, say)
        if as_json:
            emit_json({"rounds": rounds})
        else:
            out.print(stream_table(rounds))
        return
    try:
        with progress_bar():
            report = abandon_cycle(ctx) if abandon else run_logged(ctx, dry_run, wait)
    except Exception as exc:
        if as_json:
            emit_json(failure_report(exc))
        raise
    if as_json:
        emit_json(report)
    else:
        for item in cycle_report(report):
            out.print(item)
    if report.exit_code:
        raise typer.Exit(report.exit_code)
