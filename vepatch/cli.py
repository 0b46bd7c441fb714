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


def command(fn=None, *, name: str | None = None, sharded: bool = False):
    """Register `fn` as a command; VepatchError -> one clean line + its exit code. Only
    `sharded` commands may run under torchrun (distributed.py)."""
    if fn is None:
        return functools.partial(command, name=name, sharded=sharded)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import distributed
        from .allocator import tune

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
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    if hint:
        err.print(f"  [dim]fix:[/] {hint}", soft_wrap=True)


def emit_json(obj: Any) -> None:
    from ._typed import to_plain

    if out.quiet:
        return
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


@command(name="eval", sharded=True)
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


@command
def apply(
    shots: Annotated[Optional[int], typer.Option("--shots", help="Training images per class.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="lorsu, lorsu-random, lorsu-fc1, lorsu-heads, spu, lora, full, ln.")] = None,
    diagnosis: Annotated[str, typer.Option("--diagnosis", help="'latest', a diagnosis file, or 'none' (masks from the shots).")] = "latest",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the shots.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for shots, masks and training.")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="'ce' (frozen text head) or 'contrastive'.")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Train a candidate patch on the current version from a few shots per class.

    The candidate lands in .vepatch/candidates/<id>/; it becomes a version only when
    `vepatch guard` accepts it.

    Example: vepatch apply --shots 16
    """
    from . import session
    from .patching import run_apply
    from .recipe import with_overrides

    ctx = session.open_context(workspace, device=device)
    recipe = with_overrides(ctx.recipe, {"apply.shots": shots, "apply.method": method, "apply.epochs": epochs,
                                         "apply.lr": lr, "seed": seed, "apply.loss": loss})
    with _progress("training") as advance:
        manifest = run_apply(ctx, recipe, diagnosis, advance)
    if as_json:
        emit_json(manifest)
        return
    m = manifest.metrics
    out.print(f"candidate {manifest.candidate_id}: {manifest.method} on {manifest.parent}, "
              f"{manifest.trainable_params:,} trainable numbers, {manifest.patch_bytes:,} bytes, "
              f"{m['apply_seconds']:.1f}s, peak {m['peak_memory_mb']:.0f} MB")
    out.print("next: vepatch guard")


@command(sharded=True)
def guard(
    candidate: Annotated[Optional[str], typer.Argument(help="Candidate id (default: the latest).")] = None,
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
    from . import session
    from .patching import run_guard
    from .render import guard_tables

    ctx = session.open_context(workspace, device=device)
    report = run_guard(ctx, candidate, baseline, promote=True, make_current=not no_promote)
    if as_json:
        emit_json(report)
    else:
        for table in guard_tables(report):
            out.print(table)
        out.print(f"[bold]{'ACCEPTED as ' + report.version if report.accepted else 'REFUSED'}[/]: {report.reason}")
    if not report.accepted:
        raise typer.Exit(3)


@command
def log(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """The version chain and what happened in this workspace.

    Example: vepatch log
    """
    from . import store
    from .render import log_table

    ws = _workspace(workspace)
    manifests = [store.read_manifest(ws, v) for v in store.versions(ws)]
    current = store.head(ws)
    if as_json:
        emit_json({"head": current, "versions": manifests})
        return
    out.print(log_table(manifests, current))


@command
def show(
    version: Annotated[str, typer.Argument(help="vN, or a candidate id.")],
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """What a version (or candidate) changed: blocks, heads, parameters, metrics, verdict.

    Example: vepatch show v1
    """
    from . import store
    from .records import GuardReport, read_record
    from .render import show_tables

    ws = _workspace(workspace)
    if store.VERSION_RE.match(version):
        folder = store.version_dir(ws, version)
        manifest = store.read_manifest(ws, version)
    else:
        folder = store.candidate_dir(ws, version)
        manifest, _ = store.read_candidate(ws, version)
    report = read_record(GuardReport, folder / store.GUARD_FILE) if (folder / store.GUARD_FILE).is_file() else None
    if as_json:
        emit_json({"manifest": manifest, "guard": report})
        return
    for table in show_tables(manifest, report):
        out.print(table)


@command
def rollback(
    version: Annotated[str, typer.Argument(help="vN or base.")],
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Make an earlier version current (moves HEAD; nothing is deleted).

    Example: vepatch rollback v3
    """
    from . import store

    ws = _workspace(workspace)
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
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Write a version as a merged model open_clip loads by itself (local-dir:), or a peft adapter.

    Example: vepatch export v1 --out exported/ && python -c "import open_clip; open_clip.create_model('local-dir:exported')"
    """
    from . import session, store
    from .export import export_bundle, export_peft

    ctx = session.open_context(workspace)
    if fmt == "peft":
        if len(store.chain(ctx.workspace, version)) != 1:
            raise UsageError("--format peft exports one patch on the base", "export a v1-on-base patch, or use --format open_clip")
        manifest = store.read_manifest(ctx.workspace, version)
        delta = store.load_delta(store.version_dir(ctx.workspace, version) / store.PATCH_FILE, manifest.patch_sha256)
        path = export_peft(delta, out_dir, ctx.recipe.apply.rank, ctx.recipe.apply.lora_alpha)
    elif fmt == "open_clip":
        loaded, name = ctx.model(version)
        path = export_bundle(loaded, ctx.recipe.model.ref, out_dir, name)
    else:
        raise UsageError(f"unknown format '{fmt}'", "use --format open_clip or --format peft")
    ctx.workspace.log("export", version=version, out=str(path), format=fmt)
    if as_json:
        emit_json({"version": version, "out": str(path), "format": fmt})
    else:
        out.print(f"exported {version} to {path} ({fmt})")


@command
def verify(
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
):
    """Re-hash every patch and re-check every fingerprint; exit 1 on any problem.

    Example: vepatch verify
    """
    from . import session, store

    ctx = session.open_context(workspace)
    problems = store.verify(ctx.workspace, ctx.base())  # a fresh base: verify patches it along each chain
    left = [str(p) for p in store.leftovers(ctx.workspace)]
    if as_json:
        emit_json({"ok": not problems, "problems": problems, "leftover_temp": left})
    else:
        for p in problems:
            err.print(f"[red]problem:[/] {p}")
        if left:
            err.print(f"{len(left)} temp folder(s) from an interrupted write (invisible, safe to delete): {', '.join(left)}")
        out.print("store verifies" if not problems else f"{len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


def _stream(ctx, stream: Path, wait: float, as_json: bool) -> None:
    from .cycle import measure_head, run_stream_round, stream_rounds
    from .render import stream_table

    rounds = []
    with ctx.workspace.lock(wait=wait):
        rounds.append(measure_head(ctx, "start", "-"))
        for round_dir in stream_rounds(ctx.resolve(stream)):
            rounds.append(run_stream_round(ctx, round_dir))
            ctx.workspace.log("stream-round", round=round_dir.name, status=rounds[-1].status, version=rounds[-1].version)
            if not as_json:
                err.print(f"round {round_dir.name}: {rounds[-1].status}, HEAD {rounds[-1].version}")
    if as_json:
        emit_json({"rounds": rounds})
    else:
        out.print(stream_table(rounds))


def _progress(label: str):
    """A rich progress bar on a terminal; nothing when piped. Yields advance(step, total)."""
    import contextlib

    @contextlib.contextmanager
    def bar():
        if not err.is_terminal:
            yield None
            return
        from rich.progress import Progress

        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(label, total=None)
            yield lambda step, total: progress.update(task, completed=step, total=total)

    return bar()


@command
def bench(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods to compare.")] = "lorsu,lora,spu,full,full+wise,ln,lorsu-random",
    shots: Annotated[Optional[int], typer.Option("--shots", help="Training images per class.")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..N-1 (each seed: its own shots and holdout).")] = 3,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Compare patch methods on this workspace's data: same shots, holdout, guards, loss and budget.

    Writes .vepatch/bench/<utc>/bench.json, bench.md and bench.png (target gain vs worst guard
    change, one point per method and seed). Candidates stay in candidates/.

    Example: vepatch bench --methods lorsu,lora,full --seeds 3
    """
    from datetime import datetime, timezone

    from . import session
    from ._typed import to_plain
    from .bench import markdown, plot, run_bench, summarize
    from .fsio import write_text_atomic

    ctx = session.open_context(workspace, device=device)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    with _progress("bench") as advance:
        runs = run_bench(ctx, chosen, list(range(seeds)), shots or ctx.recipe.apply.shots,
                         ["--device", ctx.device], advance)
    rows = summarize(runs)
    folder = ctx.workspace.store / "bench" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"runs": to_plain(runs), "summary": to_plain(rows), "device": ctx.device}
    write_text_atomic(folder / "bench.json", json.dumps(result, indent=2))
    write_text_atomic(folder / "bench.md", markdown(rows))
    plot(runs, rows, folder / "bench.png")
    ctx.workspace.log("bench", folder=str(folder), methods=chosen, seeds=seeds)
    if as_json:
        emit_json({**result, "folder": str(folder)})
    else:
        out.print(markdown(rows))
        out.print(f"written: {folder}")


@command
def speed(
    model: Annotated[str, typer.Option("--model", help="'default', an open_clip name (random init, e.g. ViT-B-16) or local-dir:PATH.")] = "default",
    method: Annotated[str, typer.Option("--method", help="Whose trainable set the patch step updates.")] = "lorsu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 32,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps (after one warm-up).")] = 10,
    guard: Annotated[Optional[str], typer.Option("--guard", help="Instead: time the guard on this candidate ('latest'), plain vs fast path.")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Patch-step and guard throughput, FLOPs utilisation against the device's bf16 peak, peak
    memory and where the time goes; or, with --guard, the guard's fast path against the plain one.

    Example: vepatch speed --model ViT-B-16 --batch-size 64 --device cuda
    """
    from . import session

    if guard is not None:
        from .speed import time_guard

        ctx = session.open_context(workspace, device=device)
        timing = time_guard(ctx, None if guard == "latest" else guard)
        if as_json:
            emit_json(timing)
            return
        out.print(f"guard on {timing.candidate_id}: {timing.passes} passes x {timing.images} images, kept inputs at "
                  f"'{timing.entry or 'images'}'")
        out.print(f"  plain {timing.plain_seconds:.1f} s | fast, cold cache {timing.fast_cold_seconds:.1f} s "
                  f"({timing.plain_seconds / timing.fast_cold_seconds:.2f}x) | fast, warm cache {timing.fast_warm_seconds:.1f} s "
                  f"({timing.plain_seconds / timing.fast_warm_seconds:.2f}x) | identical results: {timing.identical}")
        return
    from .speed import measure

    ctx = session.open_context(workspace, model=model, device=device, required=False)
    report = measure(ctx.base(), model, method, batch_size, steps, ctx.device)
    if as_json:
        emit_json(report)
        return
    from .render import speed_report

    for line in speed_report(report):
        out.print(line)


@command
def cycle(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen; change nothing.")] = False,
    wait: Annotated[float, typer.Option("--wait", help="Wait up to SECONDS for the workspace lock (default: exit 5 at once).")] = 0.0,
    stream: Annotated[Optional[Path], typer.Option("--stream", help="Measure: run one cycle per round of STREAM/<round>/{pool,errors}/.")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """One continual step for cron: inbox -> diagnose -> apply -> guard -> promote -> archive.

    Exit 0 promoted, 3 refused (candidate and verdict kept), 4 nothing new, 5 locked, 1 error.
    A cycle killed at any point is finished by the next one; no image is lost or used twice.

    Example: vepatch cycle --json   (crontab: see examples/crontab)
    """
    from . import session
    from .cycle import CycleReport, run_cycle

    ctx = session.open_context(workspace, device=device)
    ws = ctx.workspace
    if stream is not None:
        return _stream(ctx, stream, wait, as_json)
    try:
        with ws.lock(wait=wait):
            report = run_cycle(ctx, dry_run=dry_run)
    except Exception as exc:
        exit_code = getattr(exc, "exit_code", 1)
        status = {4: "nothing-new", 5: "locked"}.get(exit_code, "failed")
        ws.log("cycle", status=status, exit_code=exit_code, reason=getattr(exc, "message", str(exc)))
        if as_json:
            emit_json(CycleReport("", status, 0, 0, "", "", getattr(exc, "message", str(exc))))
        raise
    code = {"promoted": 0, "refused": 3, "already-right": 0, "dry-run": 0}[report.status]
    if not dry_run:
        ws.log("cycle", status=report.status, exit_code=code, cycle=report.cycle_id, new_images=report.new_images,
               candidate=report.candidate_id, version=report.version, resumed=report.resumed)
    if as_json:
        emit_json(report)
    else:
        out.print(f"cycle {report.cycle_id or '-'}: {report.status} — {report.new_images} new image(s), "
                  f"{report.duplicates} seen before; {report.version or report.candidate_id or ''} {report.reason}")
    if code:
        raise typer.Exit(code)
