"""Store commands: log, show, report, rollback, export, verify, gc."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._app import command, emit_json, err, out
from ..errors import UsageError
from ..workspace import find_workspace
from .options import JsonOpt, WorkspaceOpt


@command
def log(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """The version chain and what happened in this workspace.

    Example: vepatch log
    """
    from .. import store
    from .render import log_table

    ws = find_workspace(workspace)
    rows = [store.summary(ws, v) for v in store.versions(ws)]
    current = store.head(ws)
    if as_json:
        emit_json({"head": current, "versions": rows})
        return
    out.print(log_table(rows, current))


@command
def show(
    version: Annotated[str, typer.Argument(help="vN, or a candidate id.")],
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """What a version (or candidate) changed: blocks, heads, parameters, metrics, verdict.

    Example: vepatch show v1
    """
    from .. import store
    from ..records import GuardReport, read_record
    from .render import show_tables

    ws = find_workspace(workspace)
    if version == "base":
        raise UsageError("'base' is the model itself, not a patch: it changed nothing",
                         "`vepatch log` lists the versions; `vepatch eval DATA --version base` measures the base")
    entries, path = None, None
    if store.VERSION_RE.match(version):
        folder = store.version_dir(ws, version)
        manifest, path = store.read_manifest(ws, version), folder / store.PATCH_FILE
        try:  # its own bytes; `vepatch verify` checks whole chains
            entries = store.delta_entries(path, manifest.patch_sha256)
        except store.StoreError as exc:
            err.print(f"warning: {version} does not verify: {exc}", markup=False, highlight=False)
    else:
        folder = ws.candidate_dir(version)
        manifest = store.read_candidate_manifest(ws, version)
        path = folder / store.DELTA_FILE
        entries = store.delta_entries(path, manifest.patch_sha256)
    report = read_record(GuardReport, folder / store.GUARD_FILE) if (folder / store.GUARD_FILE).is_file() else None
    if as_json:
        emit_json({"manifest": manifest, "guard": report})
        return
    for table in show_tables(manifest, report, _prompt_rows(path, manifest, entries)):
        out.print(table)


def _prompt_rows(path: Path, manifest, entries: Optional[list[str]]) -> Optional[dict[str, str]]:
    """A prompt patch's rows in words (loading its tensors); {} for a weight patch, whose
    entry names say all `show` needs (no torch to import); None when it does not verify."""
    from .. import store

    if entries is None:
        return None
    if not store.holds_prompts(entries):
        return {}
    from ..prompts import describe

    return describe(store.load_delta(path, manifest.patch_sha256).tensors)


@command
def rollback(
    version: Annotated[str, typer.Argument(help="vN or base.")],
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Make an earlier version current (moves HEAD; nothing is deleted).

    Example: vepatch rollback v3
    """
    from .. import store

    ws = find_workspace(workspace)
    with ws.lock():
        before = store.head(ws)
        store.set_head(ws, version)
        ws.log("rollback", from_version=before, to_version=version)
    if as_json:
        emit_json({"head": version, "previous": before})
    else:
        out.print(f"HEAD: {before} -> {version}")


@command
def export(
    version: Annotated[str, typer.Argument(help="vN (or base).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="open_clip (merged local-dir: bundle) or peft (plain-LoRA patches).")] = "open_clip",
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder that holds no earlier export.")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Write a version as a merged model open_clip loads by itself (local-dir:), or a peft adapter.

    Example: vepatch export v1 --out exported/ && python -c "import open_clip; open_clip.create_model('local-dir:exported')"
    """
    from .. import context

    ctx = context.open_context(workspace)
    with ctx.workspace.lock():
        path = _export(ctx, version, out_dir, fmt, force)
    if as_json:
        emit_json({"version": version, "out": str(path), "format": fmt})
    else:
        out.print(f"exported {version} to {path} ({fmt})")


def _export(ctx, version: str, out_dir: Path, fmt: str, force: bool) -> Path:
    from .. import store
    from ..export import export_bundle, export_peft

    if fmt == "peft":
        if len(store.chain(ctx.workspace, version)) != 1:
            raise UsageError("--format peft exports one patch on the base", "export a v1-on-base patch, or use --format open_clip")
        manifest = store.read_manifest(ctx.workspace, version)
        delta = store.load_delta(store.version_dir(ctx.workspace, version) / store.PATCH_FILE, manifest.patch_sha256)
        trained = manifest.recipe.apply
        path = export_peft(delta, out_dir, trained.rank, trained.lora_alpha, force)
    elif fmt == "open_clip":
        loaded, name = ctx.model(version)
        path = export_bundle(loaded, ctx.recipe.model.ref, out_dir, name, force)
    else:
        raise UsageError(f"unknown format '{fmt}'", "use --format open_clip or --format peft")
    ctx.workspace.log("export", version=version, out=str(path), format=fmt)
    return path


@command
def verify(
    quarantine: Annotated[bool, typer.Option("--quarantine", help="Move versions (and candidates) that do not verify to .vepatch/quarantine/.")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Re-hash every patch and re-check every fingerprint; exit 1 on any problem.

    With --quarantine, a version that does not verify (and every version built on it) is moved
    out of the chain, so the store verifies again; roll HEAD back below it first.

    Example: vepatch verify; vepatch rollback v1 && vepatch verify --quarantine
    """
    from .. import context, store

    ctx = context.open_context(workspace)
    if quarantine:
        with ctx.workspace.lock():
            for name, dest in store.set_aside(ctx.workspace, ctx.base()):
                err.print(f"set aside {name} -> {dest.relative_to(ctx.workspace.root)}", markup=False, highlight=False)
    problems = store.verify(ctx.workspace, ctx.base())  # a fresh base: verify patches it along each chain
    left = [str(p) for p in store.leftovers(ctx.workspace)]
    if as_json:
        emit_json({"ok": not problems, "problems": problems, "leftover_temp": left})
    else:
        for p in problems:
            err.print(f"[red]problem:[/] {p}")
        if left:
            err.print(f"{len(left)} temp folder(s) from an interrupted write (invisible, safe to delete): {', '.join(left)}")
        out.print("store verifies" if not problems else
                  f"{len(problems)} problem(s). next: vepatch rollback <a good version>, then vepatch verify --quarantine")
    if problems:
        raise typer.Exit(1)


@command
def gc(
    yes: Annotated[bool, typer.Option("--yes", help="Delete (without it, only list what would go).")] = False,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """List (or, with --yes, delete) what the store no longer needs: refused, promoted and
    bench candidates, older diagnoses, temp folders left by a crash. Never a version, a cycle
    or a candidate waiting for `vepatch guard`.

    Example: vepatch gc && vepatch gc --yes
    """
    from .. import gc as collector

    ws = find_workspace(workspace)
    with ws.lock():
        items = collector.collect(ws)
        freed = collector.remove(ws, items) if yes else 0
        if yes:
            ws.log("gc", removed=len(items), bytes=freed)
    total = sum(i.nbytes for i in items)
    if as_json:
        emit_json({"deleted": yes, "items": [{"path": str(i.path.relative_to(ws.root)), "why": i.why, "bytes": i.nbytes}
                                             for i in items], "bytes": total})
        return
    for i in items:
        out.print(f"{'deleted' if yes else 'would delete'} {i.path.relative_to(ws.root)}  ({i.why}, {i.nbytes / 1e6:.1f} MB)",
                  markup=False, highlight=False)
    if not items:
        out.print("nothing to delete")
    elif not yes:
        out.print(f"{len(items)} items, {total / 1e6:.1f} MB. next: vepatch gc --yes")
    else:
        out.print(f"freed {freed / 1e6:.1f} MB")


@command
def report(
    version: Annotated[str, typer.Argument(help="vN, or a judged candidate's id.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="HTML file to write (default: reports/<name>.html in the workspace).")] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """One self-contained HTML page of a verdict: per suite before/after with 95% intervals,
    per class, the images the patch fixed and broke (thumbnails), what it touches, the diagnosis.

    Example: vepatch report v1 --out v1.html
    """
    from ..report import write_verdict_report

    path = write_verdict_report(find_workspace(workspace), version, out_file)
    if as_json:
        emit_json({"version": version, "out": str(path)})
    else:
        out.print(f"written: {path}", markup=False, highlight=False)
