"""Compare patch methods on the workspace's own data: same shots, holdout, guard suites,
loss and step budget; each apply runs in its own process (clean time and peak memory),
evaluation runs here, paired against the parent."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import captioning, clock, store
from ._typed import from_plain, to_plain
from .context import Context
from .errors import UsageError, VepatchError
from .fsio import write_text_atomic
from .guard import choose, guard_suites, level_of, mcnemar_p, search_strengths
from .report import bench_page
from .records import PatchManifest
from .runtime.passes import Scores


@dataclass(frozen=True)
class BenchRun:
    method: str
    seed: int
    candidate_id: str
    trainable_params: int
    patch_bytes: int
    apply_seconds: float
    peak_memory_mb: float
    target_before: float
    target_after: float
    guard_change_pp: dict[str, float]  # suite -> after - before, percentage points (at strength 1)
    guard_p: dict[str, float]  # suite -> McNemar p (at strength 1; a captioning row: Wilcoxon signed-rank p)
    # what the guard's search would promote: its strength (0.0: it refuses, the parent stays)
    # and the target accuracy and guard changes there
    guard_strength: float
    target_at_guard: float
    guard_change_pp_at_guard: dict[str, float]

    @property
    def worst_guard_pp(self) -> float:
        return min(self.guard_change_pp.values(), default=0.0)


@dataclass(frozen=True)
class BenchSummary:
    method: str
    seeds: int
    target_after_mean: float
    target_after_std: float
    target_gain_pp_mean: float
    guard_change_pp_mean: dict[str, float]
    guard_change_pp_std: dict[str, float]
    worst_guard_pp_mean: float
    guard_strengths: list[float]  # per seed, the strength the guard would promote (0.0: refused)
    target_gain_at_guard_pp_mean: float  # the target gain at those strengths (0 for a refusal)
    trainable_params: int
    patch_bytes: int
    apply_seconds_mean: float
    peak_memory_mb_mean: float
    pareto: bool  # no other method has both a higher target accuracy and a smaller worst guard drop


def apply_in_subprocess(workspace: Path, method: str, seed: int, shots: int, extra: list[str]) -> PatchManifest:
    cmd = [sys.executable, "-m", "vepatch", "apply", "-C", str(workspace), "--method", method, "--seed", str(seed),
           "--shots", str(shots), "--diagnosis", "none", "--origin", "bench", "--json", *extra]
    from .workspace import LOCK_HELD_ENV

    env = {**os.environ, LOCK_HELD_ENV: str(workspace)}  # the bench holds the lock on the child's behalf
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise VepatchError(f"bench: apply --method {method} --seed {seed} failed: {done.stderr.strip().splitlines()[-1:]}",
                           "run that apply by hand to see why")
    return from_plain(PatchManifest, json.loads(done.stdout), strict=False)


def run_bench(ctx: Context, methods: list[str], seeds: list[int], shots: int, extra: Optional[list[str]] = None,
              progress: Optional[Callable[[int, int], None]] = None, lrs: Optional[list[float]] = None,
              keep: Optional[Callable[[list[BenchRun]], None]] = None) -> list[BenchRun]:
    """Every method on every seed; with `lrs`, every method at each of those learning rates (a
    sweep on a tuning split: rows are labelled 'method lr=X'). `keep` is handed the runs so far
    after each one (to write them: a bench that stops part-way keeps what it finished)."""
    with ctx.workspace.lock():
        return _run_bench(ctx, methods, seeds, shots, extra, progress, lrs, keep)


def _run_bench(ctx: Context, methods: list[str], seeds: list[int], shots: int, extra: Optional[list[str]],
               progress: Optional[Callable[[int, int], None]], lrs: Optional[list[float]] = None,
               keep: Optional[Callable[[list[BenchRun]], None]] = None) -> list[BenchRun]:
    parent, version = ctx.model()
    plans = [(m, lr) for m in methods for lr in (lrs or [None])]
    runs, total, step = [], len(plans) * len(seeds), 0
    cache = ctx.prediction_cache()  # the parent's predictions: computed once per suite and holdout
    for seed in seeds:
        for method, lr in plans:
            rate = [] if lr is None else ["--lr", f"{lr:g}"]
            manifest = apply_in_subprocess(ctx.workspace.root, method, seed, shots, (extra or []) + rate)
            _, delta = store.read_candidate(ctx.workspace, manifest.candidate_id)
            suites, _ = guard_suites(ctx, parent, manifest, version)
            # scored at strength 1 and at the strength the guard's own search would promote
            spec = ctx.recipe.guard
            trials, preds, base = search_strengths(parent, delta, suites, dataclasses.replace(
                spec, strengths=sorted({*spec.strengths, 1.0})), ctx.recipe.batch_size, ctx.device, cache=cache,
                level=level_of(spec), every=True)
            after = preds[1.0]
            best = choose([t for t in trials if t.strength in spec.strengths])
            guards = [s.name for s in suites if s.role == "guard"]
            at_guard = {r.name: r for r in best.suites} if best else {}
            runs.append(BenchRun(
                method if lr is None else f"{method} lr={lr:g}", seed, manifest.candidate_id, manifest.trainable_params, manifest.patch_bytes,
                manifest.metrics.apply_seconds, manifest.metrics.peak_memory_mb,
                base["target-holdout"].accuracy, after["target-holdout"].accuracy,
                {g: 100 * (after[g].accuracy - base[g].accuracy) for g in guards},
                {g: captioning.paired_p(base[g], after[g]) if isinstance(base[g], Scores)  # a captioning row: signed-rank
                    else mcnemar_p(base[g].correct, after[g].correct) for g in guards},
                best.strength if best else 0.0,
                at_guard["target-holdout"].after if best else base["target-holdout"].accuracy,
                {g: at_guard[g].change_pp if best else 0.0 for g in guards},
            ))
            step += 1
            if keep:
                keep(list(runs))
            if progress:
                progress(step, total)
    return runs


def bench_folder(ctx: Context) -> Path:
    """Where a new bench writes: .vepatch/bench/<utc>/."""
    return ctx.workspace.bench / clock.stamp()


def write_bench(folder: Path, runs: list[BenchRun], planned: int, device: str) -> dict:
    """`folder`/: bench.json (every run, the summary, and how many runs were `planned`: fewer
    runs than that means the bench stopped part-way), bench.md, bench.png, bench.html. Each file
    is replaced atomically, so it can be rewritten after every run."""
    rows = summarize(runs)
    result = bench_result(runs, planned, device)
    write_text_atomic(folder / "bench.json", json.dumps(result, indent=2))
    write_text_atomic(folder / "bench.md", markdown(rows))
    plot(runs, rows, folder / "bench.png")
    write_text_atomic(folder / "bench.html", bench_page(f"vepatch bench {folder.name} ({device})", markdown(rows),
                                                        (folder / "bench.png").read_bytes()))
    return result


def bench_result(runs: list[BenchRun], planned: int, device: str) -> dict:
    """What bench.json holds: every run, the summary, the device, how many runs were planned."""
    return {"runs": to_plain(runs), "summary": to_plain(summarize(runs)), "device": device, "planned": planned}


def read_bench(path: Path) -> tuple[list[BenchRun], str]:
    """The runs and device of a bench folder (or its bench.json)."""
    file = path / "bench.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        return [from_plain(BenchRun, r, f"{file}: runs", strict=False) for r in data["runs"]], str(data.get("device", "?"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"bench --join: {file} is not a bench's bench.json ({type(exc).__name__}: {exc})",
                         "name folders under .vepatch/bench/ that a bench wrote") from None


def join_benches(paths: list[Path]) -> tuple[list[BenchRun], str]:
    """The runs of several benches as one (one table, one Pareto front; seed by seed, so that
    each method's per-seed columns read in seed order), and their devices.
    Refused unless they measured the same thing: the same guard suites, and on each seed the same
    base accuracy on the target holdout (the same base and split); each method and seed once."""
    if not paths:
        raise UsageError("bench --join: no bench folders named", "e.g. --join .vepatch/bench/A,.vepatch/bench/B")
    joined: list[BenchRun] = []
    devices: list[str] = []
    seen: dict[tuple[str, int], Path] = {}
    base: dict[int, tuple[float, Path]] = {}
    suites: Optional[tuple[list[str], Path]] = None
    for path in paths:
        runs, device = read_bench(path)
        if device not in devices:
            devices.append(device)
        for run in runs:
            names = sorted(run.guard_change_pp)
            if suites is None:
                suites = (names, path)
            elif names != suites[0]:
                raise UsageError(f"bench --join: {path} has guard suites {names}, {suites[1]} has {suites[0]}",
                                 "join benches of one workspace setting")
            if (run.method, run.seed) in seen:
                raise UsageError(f"bench --join: {run.method} seed {run.seed} is in both {seen[run.method, run.seed]} and {path}",
                                 "name each bench once, and each run in one of them")
            seen[run.method, run.seed] = path
            before, where = base.setdefault(run.seed, (run.target_before, path))
            if run.target_before != before:
                raise UsageError(f"bench --join: seed {run.seed}'s base holdout accuracy is {100 * before:.1f}% in {where} "
                                 f"but {100 * run.target_before:.1f}% in {path}: not the same base and split",
                                 "join benches of one workspace setting")
            joined.append(run)
    return sorted(joined, key=lambda r: r.seed), "+".join(devices)  # seed order, as a bench runs them


def summarize(runs: list[BenchRun]) -> list[BenchSummary]:
    methods = list(dict.fromkeys(r.method for r in runs))
    rows = []
    for m in methods:
        rs = [r for r in runs if r.method == m]
        suites = list(rs[0].guard_change_pp)
        target = np.array([r.target_after for r in rs])
        rows.append(BenchSummary(
            m, len(rs), float(target.mean()), float(target.std()),
            float(np.mean([100 * (r.target_after - r.target_before) for r in rs])),
            {s: float(np.mean([r.guard_change_pp[s] for r in rs])) for s in suites},
            {s: float(np.std([r.guard_change_pp[s] for r in rs])) for s in suites},
            float(np.mean([r.worst_guard_pp for r in rs])),
            [r.guard_strength for r in rs], float(np.mean([100 * (r.target_at_guard - r.target_before) for r in rs])),
            rs[0].trainable_params, rs[0].patch_bytes,
            float(np.mean([r.apply_seconds for r in rs])), float(np.mean([r.peak_memory_mb for r in rs])), False,
        ))
    front = []
    for a in rows:
        dominated = any(
            b is not a and b.target_after_mean >= a.target_after_mean and b.worst_guard_pp_mean >= a.worst_guard_pp_mean
            and (b.target_after_mean > a.target_after_mean or b.worst_guard_pp_mean > a.worst_guard_pp_mean)
            for b in rows
        )
        front.append(BenchSummary(**{**a.__dict__, "pareto": not dominated}))
    return front


def markdown(rows: list[BenchSummary]) -> str:
    suites = list(rows[0].guard_change_pp_mean) if rows else []
    head = ["method", "target acc", "gain pp", *[f"{s} Δpp" for s in suites], "worst Δpp", "guard λ", "gain at guard λ",
            "params", "bytes", "apply s", "peak MB", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, f"{100 * r.target_after_mean:.1f} ± {100 * r.target_after_std:.1f}", f"{r.target_gain_pp_mean:+.1f}",
                 *[f"{r.guard_change_pp_mean[s]:+.1f} ± {r.guard_change_pp_std[s]:.1f}" for s in suites],
                 f"{r.worst_guard_pp_mean:+.1f}", " / ".join(f"{g:g}" if g else "—" for g in r.guard_strengths),
                 f"{r.target_gain_at_guard_pp_mean:+.1f}", f"{r.trainable_params:,}", f"{r.patch_bytes:,}",
                 f"{r.apply_seconds_mean:.0f}", f"{r.peak_memory_mb_mean:.0f}", "yes" if r.pareto else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[BenchRun], rows: list[BenchSummary], path: Path) -> Path:
    """bench.png: target gain vs worst guard change, one point per method and seed; each
    method a colour and a marker in the legend, the Pareto front's outlined in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    front = {r.method for r in rows if r.pareto}
    colours = plt.get_cmap("tab10")
    markers = "osD^vPX*hp"
    for i, method in enumerate(dict.fromkeys(r.method for r in runs)):
        rs = [r for r in runs if r.method == method]
        xs = [r.worst_guard_pp for r in rs]
        ys = [100 * (r.target_after - r.target_before) for r in rs]
        # each method its own colour and marker, named in the legend (labels beside points overlapped)
        ax.scatter(xs, ys, color=colours(i % 10), marker=markers[i % len(markers)], s=46, alpha=0.85,
                   label=method + (" (Pareto front)" if method in front else ""),
                   edgecolor="black" if method in front else "none", linewidths=1.2)
    worst = min((r.worst_guard_pp for r in runs), default=0.0)
    if worst < -5:  # one method far off (e.g. full fine-tuning): linear near 0, logarithmic beyond
        ax.set_xscale("symlog", linthresh=3.0)
        best = max((r.worst_guard_pp for r in runs), default=0.0)
        ticks = [t for t in (-100, -50, -20, -10, -5, -3, -2, -1, 0, 1, 2, 3, 5) if worst - 1 <= t <= best + 1]
        ax.set_xticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    ax.axvline(0, color="grey", lw=0.8)
    ax.axvline(-1, color="red", lw=0.8, ls="--", label="guard bar (-1 pp)")
    ax.set_xlabel("worst guard-suite change (pp)   <- forgets more" + (" (symlog: linear within ±3)" if worst < -5 else ""))
    ax.set_ylabel("target-holdout gain (pp)")
    ax.set_title("patch methods: target gain vs retention (one point per seed)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    from .fsio import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path
