"""Patching commands: diagnose, apply, guard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


from ..methods import names as method_names
from ._app import command, emit_json, out
from .progress_view import progress_bar
from .options import DeviceOpt, JsonOpt, WorkspaceOpt


@command
def diagnose(
    errors_dir: Annotated[Path, typer.Argument(help="Misclassified images: errors/<true class>/*.jpg.")],
    fc1_fraction: Annotated[Optional[float], typer.Option("--fc1-fraction", help="Per-layer share of fc1 entries to select.")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="Attention heads to select per layer.")] = None,
    control: Annotated[Optional[str], typer.Option("--control", help="'random': same budget at random places.")] = None,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Score at most this many images.")] = None,
    top: Annotated[int, typer.Option("--top", help="Rows to show per table.")] = 12,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write an HTML page of the errors and the blame here.")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Find the vision-encoder parameters most responsible for these errors.

    Scores fc1 entries and attention heads by the mean gradient of the loss over the
    misclassified images (LoRSU), writes .vepatch/diagnoses/<utc>.json and its masks.

    Example: vepatch diagnose errors/
    """
    from .. import context
    from ..diagnose import run_diagnose
    from .render import diagnosis_tables

    ctx = context.open_context(workspace, device=device)
    overrides = {
        "diagnose.fc1_fraction": fc1_fraction, "diagnose.heads_per_layer": heads,
        "diagnose.control": control, "diagnose.max_samples": max_samples,
    }
    diagnosis, path = run_diagnose(ctx, errors_dir, overrides)
    if report is not None:
        from ..fsio import write_text_atomic
        from ..report import diagnosis_page

        write_text_atomic(report, diagnosis_page(ctx.workspace.root, diagnosis))
    if as_json:
        emit_json({"file": str(path), "diagnosis": diagnosis})
        return
    for table in diagnosis_tables(diagnosis, top):
        out.print(table)
    out.print(f"written: {path}" + (f" and {report}" if report is not None else ""))


@command
def apply(
    shots: Annotated[Optional[int], typer.Option("--shots", help="Training images per class.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=f"One of: {', '.join(method_names())} (default: the recipe's).")] = None,
    diagnosis: Annotated[str, typer.Option("--diagnosis", help="'latest', a diagnosis file, or 'none' (masks from the shots).")] = "latest",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the shots.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for shots, masks and training.")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="'ce' (frozen text head), 'contrastive', or 'cafe' (ce + a CoCa's captioning loss).")] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="Labelled folder (e.g. errors/) to take the shots and holdout from, instead of the shot pool.")] = None,
    origin: Annotated[str, typer.Option("--origin", hidden=True, help="'bench' marks a bench run's candidate (never judged implicitly).")] = "apply",
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Train a candidate patch on the current version from a few shots per class.

    The candidate lands in .vepatch/candidates/<id>/; it becomes a version only when
    `vepatch guard` accepts it.

    Example: vepatch apply --shots 16
    """
    from ..recipe import with_overrides
    from ..workspace import find_workspace

    flags = {"apply.shots": shots, "apply.method": method, "apply.epochs": epochs, "apply.lr": lr, "seed": seed,
             "apply.loss": loss}
    with_overrides(find_workspace(workspace).recipe(), flags)  # a bad flag answers before torch and the model load
    from .. import context
    from ..apply import plan_from_pool, run_apply

    ctx = context.open_context(workspace, device=device)
    recipe = with_overrides(ctx.recipe, flags)
    with progress_bar("training") as advance:
        manifest = run_apply(ctx, recipe, plan_from_pool(ctx, recipe, from_dir), diagnosis, advance, origin)
    if as_json:
        emit_json(manifest)
        return
    m = manifest.metrics
    out.print(f"candidate {manifest.candidate_id}: {manifest.method} on {manifest.parent}, "
              f"{manifest.trainable_params:,} trainable numbers, {manifest.patch_bytes:,} bytes, "
              f"{m.apply_seconds:.1f}s, peak {m.peak_memory_mb:.0f} MB")
    if manifest.diagnosis_note:
        out.print(f"note: {manifest.diagnosis_note}", markup=False, soft_wrap=True)
    out.print("next: vepatch guard")


@command(sharded=True)
def guard(
    candidate: Annotated[Optional[str], typer.Argument(help="Candidate id (default: the newest one `vepatch apply` made and nobody judged; bench and cycle candidates must be named).")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="vM or base (default: the current version).")] = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Write the version but do not make it current.")] = False,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Judge a candidate against a baseline on the target holdout and every guard suite.

    Tries strengths 0.25..1 of the patch, keeps the best that passes, writes it as the next
    version vN and makes it current. Exit 3 when refused (nothing becomes a version).

    Example: vepatch guard --baseline v3
    """
    from .. import context
    from ..guard import run_guard
    from .render import guard_tables, verdict_lines

    ctx = context.open_context(workspace, device=device)
    with progress_bar():
        report = run_guard(ctx, candidate, baseline, make_current=not no_promote)
    if as_json:
        emit_json(report)
    else:
        for table in guard_tables(report):
            out.print(table)
        for line in verdict_lines(report):
            out.print(line)
    if not report.accepted:
        raise typer.Exit(3)
