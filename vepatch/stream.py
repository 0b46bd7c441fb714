"""Measuring continual use (LoRSU's protocol): a stream of rounds, each a class group, driven
through the inbox exactly as cron would drive it, with the current version measured after every
round on every round's holdout so far and on every guard suite.

  STREAM/<round>/{pool,errors}/<class>/*   every image of a round is dropped into the inbox
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .context import Context, absolute_paths, open_guard_suite
from .cycle import holdout_set, run_cycle, states
from .errors import NothingToDo, UsageError
from .inbox import inbox_dir


@dataclass(frozen=True)
class StreamRound:
    round: str
    status: str
    version: str  # HEAD after the round
    cycle_id: str  # the cycle that took the round's images ('' if none)
    round_accuracy: dict[str, float]  # every round so far -> HEAD's accuracy on that round's cycle holdout
    target_accuracy: dict[str, float]  # every accepted target holdout so far -> HEAD's accuracy
    guard_accuracy: dict[str, float]  # every guard suite -> HEAD's accuracy
    chain_bytes: int  # total size of the patch files from base to HEAD


def stream_rounds(stream: Path) -> list[Path]:
    """stream/<round>/{pool,errors}/<class>/*: one class group per round, in name order."""
    rounds = sorted(d for d in stream.iterdir() if (d / "pool").is_dir() or (d / "errors").is_dir()) if stream.is_dir() else []
    if not rounds:
        raise UsageError(f"{stream}: no rounds", "lay out <stream>/<round>/pool/<class>/ (and/or errors/<class>/)")
    return rounds


def run_stream(ctx: Context, stream: Path, wait: float = 0.0,
               on_round: Optional[Callable[[StreamRound], None]] = None) -> list[StreamRound]:
    """`vepatch cycle --stream`: HEAD measured at the start, then one cycle per round."""
    rounds, cycles = [], {}
    with ctx.workspace.lock(wait=wait):
        rounds.append(measure_head(ctx, "start", "-", "", cycles))
        for round_dir in stream_rounds(ctx.resolve(stream)):
            rounds.append(run_stream_round(ctx, round_dir, cycles))
            ctx.workspace.log("stream-round", round=round_dir.name, status=rounds[-1].status, version=rounds[-1].version)
            if on_round:
                on_round(rounds[-1])
    return rounds


def run_stream_round(ctx: Context, round_dir: Path, cycles: dict[str, str]) -> StreamRound:
    """Drop every image of the round into the inbox, run one cycle, measure HEAD."""
    inbox = inbox_dir(ctx)
    for part in ("pool", "errors"):
        for f in sorted((round_dir / part).glob("*/*")):
            target = inbox / f.parent.name / f"{round_dir.name}-{part}-{f.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    # versions change between rounds; the round's files were copied whole just now: none waits to settle
    recipe = dataclasses.replace(ctx.recipe, cycle=dataclasses.replace(ctx.recipe.cycle, settle_s=0.0))
    fresh = Context(ctx.workspace, recipe, ctx.device)
    try:
        report = run_cycle(fresh)
        status, cycle_id = report.status, report.cycle_id
    except NothingToDo:
        status, cycle_id = "nothing-new", ""
    if cycle_id:
        cycles[round_dir.name] = cycle_id
    return measure_head(fresh, round_dir.name, status, cycle_id, cycles)


def measure_head(ctx: Context, name: str, status: str, cycle_id: str, cycles: dict[str, str]) -> StreamRound:
    from . import store
    from .data import open_holdout
    from .evaluate import predict
    from .models.heads import text_head
    from .retrieval import recalls as retrieval_recalls
    from .runtime.predcache import key

    ws = ctx.workspace
    version = store.head(ws)
    loaded, _ = ctx.model(version)
    cache, bs = ctx.prediction_cache(), ctx.recipe.batch_size

    def accuracy(images, templates) -> float:
        # through the prediction cache: an accepted round's holdout is read once, and the next
        # night's guard finds HEAD's predictions on its suites already made
        head = text_head(loaded, images.classnames, templates)
        k = key(loaded.fingerprint, loaded.preprocess, head, images, bs, ctx.device)
        return cache.get_or_compute(k, images.labels, lambda: predict(loaded, head, images, bs, ctx.device)).accuracy

    by_id = {s.cycle_id: s for s in states(ctx)}
    rounds = {}
    for r, cid in cycles.items():
        images = holdout_set(ctx, by_id[cid])
        if len(images):
            rounds[r] = accuracy(images, ctx.recipe.templates)
    targets = {}
    chain = store.chain(ws, version)
    for v in chain:
        ref = store.read_manifest(ws, v).holdout
        images = open_holdout(ref, ws.root)
        targets[f"{v}:{ref.name}"] = accuracy(images, ref.templates)
    guards = {}
    for spec in ctx.recipe.guard.suites:
        if not ctx.resolve(spec.path).is_dir():
            continue
        images = open_guard_suite(ctx, spec)
        if spec.kind == "retrieval":  # one row per direction and K, as the guard judges them
            guards.update(retrieval_recalls(loaded, images, bs, ctx.device))
            continue
        if spec.kind == "captioning":  # as the guard's row; not through the cache (guard.keep_predictions says why)
            from .captioning import mean_likelihood, require_suite_model, row_name

            require_suite_model(loaded, spec.label)
            guards[row_name(images.name)] = mean_likelihood(loaded, images, bs, ctx.device)
            continue
        guards[images.name] = accuracy(images, spec.templates)
    size = sum(store.read_manifest(ws, v).patch_bytes for v in chain)
    return StreamRound(name, status, version, cycle_id, rounds, targets, guards, size)


# --- comparing methods over a stream (`vepatch bench --stream`) ---------------------------


@dataclass(frozen=True)
class StreamRun:
    """One method (and retention setting) driven through every round of a stream."""

    label: str  # 'lorsu' or 'lorsu/replay'
    method: str
    retain: str
    rounds: list[StreamRound]
    seen_accuracy: list[float]  # after each round: mean accuracy over every round's holdout so far
    average_accuracy: float  # mean of seen_accuracy over the rounds (LoRSU's average accuracy)
    final_accuracy: float  # seen_accuracy after the last round
    forgetting_pp: dict[str, float]  # earlier round -> best accuracy it had after its own round - final, pp
    guard_change_pp: dict[str, float]  # suite -> final - start, pp
    promoted: int  # rounds whose candidate became a version
    chain_bytes: int
    seconds: float


def bench_stream(ctx: Context, stream: Path, methods: list[str], retains: list[str],
                 on_round: Optional[Callable[[str, StreamRound], None]] = None) -> tuple[Path, list[StreamRun]]:
    """Every method x retention setting over the stream, each in a workspace of its own under
    .vepatch/bench/<utc>/<label>/ (same recipe, paths made absolute); results written beside."""
    import time

    from . import clock
    from .recipe import with_overrides
    from .workspace import Workspace, init_workspace

    folder = ctx.workspace.bench / f"{clock.stamp()}-stream"
    stream = ctx.resolve(stream).resolve()
    runs = []
    for method in methods:
        for retain in retains:
            label = method if len(retains) == 1 else f"{method}/{retain}"
            recipe = with_overrides(absolute_paths(ctx, ctx.recipe), {"apply.method": method, "apply.retain": retain})
            root = folder / label.replace("/", "-")
            init_workspace(root, recipe)
            sub = Context(Workspace(root.resolve()), recipe, ctx.device)
            start = time.perf_counter()
            rounds = run_stream(sub, stream, on_round=(lambda r, label=label: on_round(label, r)) if on_round else None)
            runs.append(summarize_stream(label, method, retain, rounds, time.perf_counter() - start))
            write_stream_bench(ctx, folder, runs)  # after every run: a long bench stopped midway keeps what it finished
    return folder, runs


def summarize_stream(label: str, method: str, retain: str, rounds: list[StreamRound], seconds: float) -> StreamRun:
    played = [r for r in rounds if r.round != "start"]
    seen = [sum(r.round_accuracy.values()) / len(r.round_accuracy) if r.round_accuracy else 0.0 for r in played]
    final = played[-1] if played else rounds[0]
    forgetting = {}
    for i, r in enumerate(played[:-1]):
        history = [later.round_accuracy[r.round] for later in played[i:] if r.round in later.round_accuracy]
        if history and r.round in final.round_accuracy:
            forgetting[r.round] = 100 * (max(history) - final.round_accuracy[r.round])
    guards = {k: 100 * (final.guard_accuracy[k] - rounds[0].guard_accuracy[k]) for k in rounds[0].guard_accuracy
              if k in final.guard_accuracy}
    return StreamRun(label, method, retain, rounds, seen, sum(seen) / len(seen) if seen else 0.0, seen[-1] if seen else 0.0,
                     forgetting, guards, sum(1 for r in played if r.status == "promoted"), final.chain_bytes, seconds)


def stream_markdown(runs: list[StreamRun]) -> str:
    suites = list(runs[0].guard_change_pp) if runs else []
    rounds = [r.round for r in runs[0].rounds if r.round != "start"] if runs else []
    head = ["method", *[f"after {r}" for r in rounds], "average acc", "max forgetting pp", *[f"{s} Δpp" for s in suites],
            "promoted", "chain bytes", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        worst = max(run.forgetting_pp.values(), default=0.0)
        cells = [run.label, *[f"{100 * a:.1f}" for a in run.seen_accuracy], f"{100 * run.average_accuracy:.1f}",
                 f"{worst:+.1f}", *[f"{run.guard_change_pp[s]:+.1f}" for s in suites],
                 f"{run.promoted}/{len(rounds)}", f"{run.chain_bytes:,}", f"{run.seconds / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_stream_bench(ctx: Context, folder: Path, runs: list[StreamRun]) -> None:
    """bench-stream.json (every round of every run), bench-stream.md, bench-stream.png, bench-stream.html."""
    import io
    import json

    import matplotlib

    from ._typed import to_plain
    from .fsio import write_bytes_atomic, write_text_atomic
    from .report import bench_page

    write_text_atomic(folder / "bench-stream.json", json.dumps({"runs": to_plain(runs), "device": ctx.device}, indent=2))
    write_text_atomic(folder / "bench-stream.md", stream_markdown(runs))
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for run in runs:
        names = [r.round for r in run.rounds if r.round != "start"]
        ax.plot(names, [100 * a for a in run.seen_accuracy], marker="o", label=f"{run.label} ({run.promoted} promoted)")
    ax.set_xlabel("after round")
    ax.set_ylabel("accuracy on every round's holdout so far (%)")
    ax.set_title("continual stream: accuracy on all classes seen so far")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(folder / "bench-stream.png", buffer.getvalue())
    write_text_atomic(folder / "bench-stream.html", bench_page(f"vepatch continual stream {folder.name} ({ctx.device})",
                                                               stream_markdown(runs), buffer.getvalue()))
    ctx.workspace.log("bench-stream", folder=str(folder), runs=[r.label for r in runs])  # one line per finished run
