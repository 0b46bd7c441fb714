"""vepatch's command line: parse, call the library, render. Errors become one line on stderr
and an exit code (0 done, 1 error, 2 usage, 3 refused, 4 nothing to do, 5 locked);
tracebacks only with VEPATCH_DEBUG=1."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from .errors import UsageError, VepatchError

app = typer.Typer(
    help="Repair the vision encoder of a CLIP-style model from a few examples, guarded and versioned.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

WorkspaceOpt = Annotated[
    Optional[Path], typer.Option("-C", "--workspace", help="Workspace folder (default: found upwards from here).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto (default: the recipe's).")]
OnlineOpt = Annotated[bool, typer.Option("--online", help="Allow model downloads from a hub (off by default).")]


def command(fn=None, *, name: str | None = None):
    """Register `fn` as a command; VepatchError -> one clean line + its exit code."""
    if fn is None:
        return functools.partial(command, name=name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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

    return app.command(name=name)(wrapper)


def _print_error(message: str, hint: str) -> None:
    if os.environ.get("VEPATCH_DEBUG") == "1":
        traceback.print_exc()
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    if hint:
        err.print(f"  [dim]fix:[/] {hint}", soft_wrap=True)


def emit_json(obj: Any) -> None:
    from ._typed import to_plain

    sys.stdout.write(json.dumps(to_plain(obj), indent=None, sort_keys=False) + "\n")


def _workspace(path: Optional[Path]):
    from .workspace import find_workspace

    return find_workspace(path)


# --- commands -----------------------------------------------------------------------------


@command
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to make the workspace in.")] = Path("."),
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML to start from.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing vepatch.yaml.")] = False,
    as_json: JsonOpt = False,
):
    """Make a workspace: vepatch.yaml (the recipe) and .vepatch/ (the store).

    Example: vepatch init ws --recipe recipes/textile.yaml
    """
    from .recipe import Recipe, load_recipe
    from .workspace import init_workspace

    chosen = load_recipe(recipe) if recipe else Recipe()
    ws = init_workspace(directory, chosen, force=force)
    if as_json:
        emit_json({"workspace": str(ws.root), "recipe": str(recipe or "defaults")})
    else:
        out.print(f"workspace ready: {ws.root} (recipe: {recipe or 'defaults'}, model: {chosen.model.ref})")


@command(name="eval")
def eval_(
    data: Annotated[Path, typer.Argument(help="Labelled set: <class>/ image folders or a saved `datasets` folder.")],
    version: Annotated[Optional[str], typer.Option("--version", help="base, vN, or a candidate id (default: current).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model reference outside a workspace (default: 'default').")] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", help="Prompt template ('{}' = class); repeatable.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward pass.")] = None,
    confusion: Annotated[bool, typer.Option("--confusion", help="Also print the confusion matrix.")] = False,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    online: OnlineOpt = False,
    as_json: JsonOpt = False,
):
    """Accuracy, per-class recall and confusion matrix of a model version on a labelled set.

    Example: vepatch eval ../shared/data/imagenette-guard --json
    """
    from . import session
    from .render import confusion_table, eval_table

    ctx = session.open_context(workspace, model=model, device=device, online=online, required=False)
    result = session.evaluate_set(ctx, data, version=version, templates=template, batch_size=batch_size)
    if as_json:
        emit_json(result)
        return
    out.print(eval_table(result))
    if confusion:
        out.print(confusion_table(result))
    if result.skipped:
        err.print(f"skipped {len(result.skipped)} unreadable file(s): " + "; ".join(
            f"{s.source}: {s.reason}" for s in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else ""))


@command
def diagnose(
    errors_dir: Annotated[Path, typer.Argument(help="Misclassified images: errors/<true class>/*.jpg.")],
    fc1_fraction: Annotated[Optional[float], typer.Option("--fc1-fraction", help="Per-layer share of fc1 entries to select.")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Attention heads to select per layer.")] = None,
    control: Annotated[Optional[str], typer.Option("--control", help="'random': same budget at random places.")] = None,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Score at most this many images.")] = None,
    top: Annotated[int, typer.Option("--top", help="Rows to show per table.")] = 12,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Find the vision-encoder parameters most responsible for these errors.

    Scores fc1 entries and attention heads by the mean gradient of the loss over the
    misclassified images (LoRSU), writes .vepatch/diagnoses/<utc>.json and its masks.

    Example: vepatch diagnose errors/
    """
    from . import session
    from .render import diagnosis_tables

    ctx = session.open_context(workspace, device=device)
    overrides = {
        "diagnose.fc1_fraction": fc1_fraction, "diagnose.heads_per_layer": heads,
        "diagnose.control": control, "diagnose.max_samples": max_samples,
    }
    diagnosis, path = session.run_diagnose(ctx, errors_dir, overrides)
    if as_json:
        emit_json({"file": str(path), "diagnosis": diagnosis})
        return
    for table in diagnosis_tables(diagnosis, top):
        out.print(table)
    out.print(f"written: {path}")
