"""Measuring commands: bench, speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from ..methods import names as method_names
from ._app import command, emit_json, err, out
from .progress_view import progress_bar
from .options import DeviceOpt, JsonOpt, WorkspaceOpt


@command
def bench(
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated methods to compare, or 'all' ({', '.join(method_names())}).")] = "all",
    shots: Annotated[Optional[int], typer.Option("--shots", help="Training images per class.")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..N-1 (each seed: its own shots and holdout).")] = 3,
    first_seed: Annotated[int, typer.Option("--first-seed", help="Start the seeds here (a tuning split: e.g. 100, never the reported 0..N-1).")] = 0,
    lrs: Annotated[Optional[str], typer.Option("--lrs", help="Comma-separated learning rates: every method at each (a sweep; rows 'method lr=X').")] = None,
    stream: Annotated[Optional[Path], typer.Option("--stream", help="Instead: drive each method through the rounds of STREAM/<round>/ (LoRSU's protocol).")] = None,
    retain: Annotated[Optional[str], typer.Option("--retain", help="With --stream: comma-separated apply.retain settings to compare (default: the recipe's).")] = None,
    base_new: Annotated[bool, typer.Option("--base-new", help="Instead: train on the first half of the classes only, report base, new and H (CoOp's protocol).")] = False,
    join: Annotated[Optional[str], typer.Option("--join", help="Instead: comma-separated bench folders (of one setting) joined into one table and Pareto front.")] = None,
    workspace: WorkspaceOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
):
    """Compare patch methods on this workspace's data: same shots, holdout, guards, loss and budget.

    Writes .vepatch/bench/<utc>/bench.json, bench.md and bench.png (target gain vs worst guard
    change, one point per method and seed), rewritten after every run. Candidates stay in
    candidates/. Benches run one method at a time (or in two workspaces side by side) are joined
    with --join.

    Example: vepatch bench --methods lorsu,lora,full --seeds 3
    """
    from .. import context
    from ..bench import bench_folder, bench_result, join_benches, markdown, run_bench, summarize, write_bench
    from ..errors import UsageError
    from ..methods import get

    chosen = method_names() if methods == "all" else [get(m.strip()).name for m in methods.split(",") if m.strip()]
    if not chosen and join is None:
        raise UsageError(f"--methods {methods!r} names no method", "e.g. --methods lorsu,lora, or all")
    ctx = context.open_context(workspace, device=device)
    if join is not None:
        runs, devices = join_benches([Path(p.strip()) for p in join.split(",") if p.strip()])
        folder = bench_folder(ctx)
        result = write_bench(folder, runs, len(runs), devices)
        ctx.workspace.log("bench-join", folder=str(folder), sources=join, runs=len(runs))
        return _show(result, folder, lambda: markdown(summarize(runs)), as_json)
    if stream is not None:
        from ..stream import bench_stream, stream_markdown

        retains = [r.strip() for r in retain.split(",")] if retain else [ctx.recipe.apply.retain]
        folder, runs = bench_stream(ctx, stream.resolve(), chosen, retains,
                                    lambda label, r: err.print(f"{label}: round {r.round} {r.status}, HEAD {r.version}"))
        return _show({"runs": runs}, folder, lambda: stream_markdown(runs), as_json)
    if base_new:
        from ..basenew import bench_base_new

        with progress_bar("bench") as advance:
            folder, result, table = bench_base_new(ctx, chosen, list(range(first_seed, first_seed + seeds)), shots or ctx.recipe.apply.shots,
                                                   ["--device", ctx.device], advance)
        return _show(result, folder, lambda: table, as_json)
    try:
        rates = [float(x) for x in lrs.split(",") if x.strip()] if lrs else None
    except ValueError:
        rates = [0.0]
    if rates is not None and not (rates and all(r > 0 for r in rates)):
        raise UsageError(f"--lrs {lrs}: learning rates must be above 0", "e.g. --lrs 1e-5,1e-4,1e-3")
    folder = bench_folder(ctx)
    planned = len(chosen) * len(rates or [None]) * seeds
    with progress_bar("bench") as advance:
        runs = run_bench(ctx, chosen, list(range(first_seed, first_seed + seeds)), shots or ctx.recipe.apply.shots,
                         ["--device", ctx.device], advance, rates,
                         keep=lambda so_far: write_bench(folder, so_far, planned, ctx.device))
    result = bench_result(runs, planned, ctx.device)  # the files were written after the last run
    ctx.workspace.log("bench", folder=str(folder), methods=chosen, seeds=seeds, runs=len(runs))
    _show(result, folder, lambda: markdown(summarize(runs)), as_json)


def _show(result: dict, folder: Path, table: Callable[[], str], as_json: bool) -> None:
    """A bench's result: as JSON (with its folder), or its table and where it was written."""
    if as_json:
        emit_json({**result, "folder": str(folder)})
    else:
        out.print(table())
        out.print(f"written: {folder}")


@command
def speed(
    model: Annotated[str, typer.Option("--model", help="'default', an open_clip name (random init, e.g. ViT-B-16) or local-dir:PATH.")] = "default",
    method: Annotated[str, typer.Option("--method", help=f"Whose trainable set the patch step updates ({', '.join(method_names())}).")] = "lorsu",
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
    from .. import context

    if guard is not None:
        from ..speed import time_guard

        ctx = context.open_context(workspace, device=device)
        timing = time_guard(ctx, None if guard == "latest" else guard)
        if as_json:
            emit_json(timing)
            return
        out.print(f"guard on {timing.candidate_id}: {timing.passes} passes x {timing.images} images, kept inputs at "
                  f"'{timing.entry or 'images'}'")
        out.print(f"  plain {timing.plain_seconds:.1f} s | fast, cold cache {timing.fast_cold_seconds:.1f} s "
                  f"({timing.plain_seconds / timing.fast_cold_seconds:.2f}x) | fast, warm cache {timing.fast_warm_seconds:.1f} s "
                  f"({timing.plain_seconds / timing.fast_warm_seconds:.2f}x) | identical results: {timing.identical}")
        out.print(f"  every strength ({timing.every_strength_passes} passes), fast, cold cache {timing.every_strength_seconds:.1f} s: "
                  f"stopping at the first pass saves {timing.every_strength_seconds / timing.fast_cold_seconds:.2f}x")
        return
    from ..speed import measure

    ctx = context.open_context(workspace, model=model, device=device, required=False)
    report = measure(ctx.base(), model, method, batch_size, steps, ctx.device)
    if as_json:
        emit_json(report)
        return
    from .render import speed_report

    for line in speed_report(report):
        out.print(line)
