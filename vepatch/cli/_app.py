"""The app, the command decorator and the terminal: errors become one line on stderr and an
exit code (0 done, 1 error, 2 usage, 3 refused, 4 nothing to do, 5 locked); tracebacks only
with VEPATCH_DEBUG=1; results on stdout (one JSON object with --json)."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any

import typer
from rich.console import Console

from ..errors import UsageError, VepatchError

app = typer.Typer(
    help="Repair the vision encoder of a CLIP-style model from a few examples, guarded and versioned.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: no type column (typer's shows `--help <bool>`), reads at 80 columns
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"vepatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Repair the vision encoder of a CLIP-style model from a few examples, guarded and versioned."""

def command(fn=None, *, name: str | None = None, sharded: bool = False):
    """Register `fn` as a command; VepatchError -> one clean line + its exit code. Only
    `sharded` commands may run under torchrun (distributed.py)."""
    if fn is None:
        return functools.partial(command, name=name, sharded=sharded)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..runtime import distributed
        from ..runtime.allocator import tune

        out.quiet = not distributed.is_writer()  # under torchrun, rank 0 alone prints results
        tune()
        try:
            if distributed.launched() and not sharded:
                raise UsageError(f"vepatch {name or fn.__name__} runs in one process, not under torchrun",
                                 "run it without torchrun; `vepatch guard` and `vepatch eval` shard over torchrun")
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except VepatchError as exc:
            _print_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _print_error("interrupted", "nothing half-written is kept; run the command again")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so plainly, traceback on request
            _print_error(f"unexpected {type(exc).__name__}: {exc}", "rerun with VEPATCH_DEBUG=1 for the traceback")
            raise typer.Exit(1) from None
        finally:
            distributed.shutdown()

    return app.command(name=name)(wrapper)


def _print_error(message: str, hint: str) -> None:
    if os.environ.get("VEPATCH_DEBUG") == "1":
        traceback.print_exc()
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # paths and reasons may hold [brackets]
    if hint:
        err.print(f"  [dim]fix:[/] {escape(hint)}", soft_wrap=True)


def emit_json(obj: Any) -> None:
    from .._typed import to_plain

    if out.quiet:
        return
    sys.stdout.write(json.dumps(to_plain(obj), indent=None, sort_keys=False) + "\n")
