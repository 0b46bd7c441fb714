"""One continual step, for cron: new images in the inbox -> diagnose -> apply -> guard ->
promote or refuse -> move the images to a dated archive. Never deletes an image.

Every step is recorded in .vepatch/cycles/<id>/state.json before the next starts, so a
cycle killed at any point is finished by the next run: images stay in the inbox until the
verdict is written, and the archive move is re-done from the recorded list.
Already-seen images are recognized by content hash (.vepatch/seen.jsonl)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from . import clock
from ._typed import from_plain, to_plain
from .context import Context, open_guard_suite
from .data import IMAGE_SUFFIXES
from .errors import NothingToDo, UsageError
from .fsio import append_line, write_text_atomic

Step = Literal["staged", "diagnosed", "applied", "judged", "done"]  # in this order


@dataclass(frozen=True)
class InboxFile:
    source: str  # path in the inbox, relative to the workspace
    sha256: str
    label: str  # the class folder it came in


@dataclass(frozen=True)
class CycleState:
    cycle_id: str
    step: Step
    files: list[InboxFile]
    duplicates: list[InboxFile] = field(default_factory=list)
    candidate_id: str = ""
    accepted: bool = False
    version: str = ""
    reason: str = ""


@dataclass(frozen=True)
class CycleReport:
    cycle_id: str
    status: Literal["promoted", "refused", "nothing-new", "already-right", "dry-run", "locked", "failed"]
    new_images: int
    duplicates: int
    candidate_id: str
    version: str
    reason: str
    resumed: bool = False

    @property
    def exit_code(self) -> int:
        """What cron reads: 0 promoted (or nothing to learn), 3 refused, 4 nothing new, 5 locked, 1 failed."""
        return {"refused": 3, "nothing-new": 4, "locked": 5, "failed": 1}.get(self.status, 0)


def fault_point(name: str) -> None:
    """Tests kill a real cycle here: VEPATCH_FAULT_AT=<name> sends SIGKILL to this process."""
    if os.environ.get("VEPATCH_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seen_hashes(ctx: Context) -> set[str]:
    path = ctx.workspace.seen_path
    if not path.is_file():
        return set()
    return {json.loads(line)["sha256"] for line in path.read_text().splitlines() if line.strip()}


def inbox_dir(ctx: Context) -> Path:
    """The inbox must lie inside the workspace: cycle moves files out of it."""
    inbox = ctx.resolve(ctx.recipe.inbox).resolve()
    if not inbox.is_relative_to(ctx.workspace.root.resolve()):
        raise UsageError(f"{ctx.workspace.recipe_path}: inbox '{ctx.recipe.inbox}' is outside the workspace",
                         "use a folder inside the workspace (default: inbox)")
    return inbox


def scan_inbox(ctx: Context) -> tuple[list[InboxFile], list[InboxFile]]:
    """(new, already seen) image files in inbox/<class>/; links leading outside are ignored."""
    inbox = inbox_dir(ctx)
    if not inbox.is_dir():
        return [], []
    root, seen, new, dup, batch = ctx.workspace.root, seen_hashes(ctx), [], [], set()
    for f in sorted(inbox.glob("*/*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or not f.resolve().is_relative_to(inbox.resolve()):
            continue
        entry = InboxFile(str(f.relative_to(root)), file_sha256(f), f.parent.name)
        (dup if entry.sha256 in seen or entry.sha256 in batch else new).append(entry)
        batch.add(entry.sha256)
    return new, dup


def save_state(ctx: Context, state: CycleState) -> None:
    write_text_atomic(ctx.workspace.cycle_state(state.cycle_id), json.dumps(to_plain(state), indent=2))


def unfinished(ctx: Context) -> Optional[CycleState]:
    folder = ctx.workspace.cycles
    for path in sorted(folder.glob("*/state.json"), reverse=True) if folder.is_dir() else []:
        state = from_plain(CycleState, json.loads(path.read_text()), strict=False)
        if state.step != "done":
            return state
    return None


def run_logged(ctx: Context, dry_run: bool = False, wait: float = 0.0) -> CycleReport:
    """`vepatch cycle`: take the workspace lock (waiting up to `wait` s), run one cycle, and
    record it in log.jsonl, failures included (then re-raised)."""
    ws = ctx.workspace
    try:
        with ws.lock(wait=wait):
            report = run_cycle(ctx, dry_run=dry_run)
    except Exception as exc:
        failed = failure_report(exc)
        ws.log("cycle", status=failed.status, exit_code=failed.exit_code, reason=failed.reason)
        raise
    if not dry_run:
        ws.log("cycle", status=report.status, exit_code=report.exit_code, cycle=report.cycle_id, new_images=report.new_images,
               candidate=report.candidate_id, version=report.version, resumed=report.resumed)
    return report


def failure_report(exc: BaseException) -> CycleReport:
    """The report of a cycle that raised: nothing new (4), locked (5) or failed (1)."""
    status = {4: "nothing-new", 5: "locked"}.get(getattr(exc, "exit_code", 1), "failed")
    return CycleReport("", status, 0, 0, "", "", getattr(exc, "message", str(exc)))


def run_cycle(ctx: Context, dry_run: bool = False) -> CycleReport:
    """One step; the caller holds the workspace lock."""
    from .apply import run_apply
    from .diagnose import run_diagnose
    from .guard import run_guard

    state = unfinished(ctx)
    resumed = state is not None
    if state is None:
        new, dup = scan_inbox(ctx)
        if dry_run:
            return CycleReport("", "dry-run", len(new), len(dup), "", "",
                               f"would diagnose, apply and guard {len(new)} new image(s)" if new else "nothing new")
        if not new:
            if dup:
                _archive(ctx, CycleState("dups-" + clock.stamp(), "judged", [], dup))
            raise NothingToDo(f"{inbox_dir(ctx)}: no new image", "operators drop misclassified images into inbox/<class>/")
        state = CycleState(clock.stamp(), "staged", new, dup)
        _stage(ctx, state)
        save_state(ctx, state)
    elif dry_run:
        return CycleReport(state.cycle_id, "dry-run", len(state.files), len(state.duplicates), state.candidate_id,
                           state.version, f"would resume the unfinished cycle at step '{state.step}'", True)
    fault_point("after-stage")
    errors_dir = ctx.workspace.cycle_errors(state.cycle_id)

    if state.step == "staged":
        try:
            run_diagnose(ctx, errors_dir, {})
        except NothingToDo as exc:  # every new image is already classified right
            state = dataclasses.replace(state, step="judged", reason=exc.message)
            save_state(ctx, state)
        else:
            state = dataclasses.replace(state, step="diagnosed")
            save_state(ctx, state)
        fault_point("after-diagnose")
    if state.step == "diagnosed":
        manifest = run_apply(ctx, ctx.recipe, "latest")
        state = dataclasses.replace(state, step="applied", candidate_id=manifest.candidate_id)
        save_state(ctx, state)
        fault_point("after-apply")
    if state.step == "applied":
        report = run_guard(ctx, state.candidate_id, None)
        state = dataclasses.replace(state, step="judged", accepted=report.accepted, version=report.version, reason=report.reason)
        save_state(ctx, state)
        fault_point("after-guard")
    _archive(ctx, state)
    status = "promoted" if state.accepted else ("refused" if state.candidate_id else "already-right")
    return CycleReport(state.cycle_id, status, len(state.files), len(state.duplicates), state.candidate_id,
                       state.version, state.reason, resumed)


def _stage(ctx: Context, state: CycleState) -> None:
    """Copy the new images (by hash) into the cycle's own errors/ folder: diagnose reads that."""
    errors = ctx.workspace.cycle_errors(state.cycle_id)
    for f in state.files:
        src = ctx.workspace.root / f.source
        target = errors / f.label / (f.sha256[:16] + src.suffix.lower())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _archive(ctx: Context, state: CycleState) -> None:
    """Move the cycle's inbox files to archive/<date>/<class>/ (idempotent), then mark done."""
    root = ctx.workspace.root
    dest = ctx.workspace.archive_day(state.cycle_id[:8])
    seen_path = ctx.workspace.seen_path
    recorded = seen_hashes(ctx)
    for i, f in enumerate([*state.files, *state.duplicates]):
        src = root / f.source
        target = dest / f.label / src.name
        if src.is_file():
            if target.exists() and file_sha256(target) != f.sha256:
                target = target.with_name(f"{target.stem}-{f.sha256[:8]}{target.suffix}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        if f.sha256 not in recorded:
            append_line(seen_path, {"sha256": f.sha256, "archived": str(target.relative_to(root)), "cycle": state.cycle_id})
            recorded.add(f.sha256)
        if i == 0:
            fault_point("mid-archive")
    if state.files:
        save_state(ctx, dataclasses.replace(state, step="done"))


# --- stream mode: LoRSU's continual protocol ------------------------------------------------


@dataclass(frozen=True)
class StreamRound:
    round: str
    status: str
    version: str  # HEAD after the round
    target_accuracy: dict[str, float]  # every accepted target holdout so far -> HEAD's accuracy
    guard_accuracy: dict[str, float]  # every guard suite -> HEAD's accuracy
    chain_bytes: int  # total size of the patch files from base to HEAD


def run_stream(ctx: Context, stream: Path, wait: float = 0.0,
               on_round: Optional[Callable[[StreamRound], None]] = None) -> list[StreamRound]:
    """`vepatch cycle --stream`: HEAD measured at the start, then one cycle per round."""
    rounds = []
    with ctx.workspace.lock(wait=wait):
        rounds.append(measure_head(ctx, "start", "-"))
        for round_dir in stream_rounds(ctx.resolve(stream)):
            rounds.append(run_stream_round(ctx, round_dir))
            ctx.workspace.log("stream-round", round=round_dir.name, status=rounds[-1].status, version=rounds[-1].version)
            if on_round:
                on_round(rounds[-1])
    return rounds


def stream_rounds(stream: Path) -> list[Path]:
    """stream/<round>/{pool,errors}/<class>/*: one class group per round, in name order."""
    rounds = sorted(d for d in stream.iterdir() if (d / "pool").is_dir() and (d / "errors").is_dir())
    if not rounds:
        raise UsageError(f"{stream}: no rounds", "lay out <stream>/<round>/pool/<class>/ and <stream>/<round>/errors/<class>/")
    return rounds


def run_stream_round(ctx: Context, round_dir: Path) -> StreamRound:
    """Drop the round's errors in the inbox, run one cycle with the round's pool as shot pool,
    then measure HEAD on every target holdout accepted so far and on every guard suite."""
    from .recipe import DataSpec

    inbox = inbox_dir(ctx)
    for f in sorted((round_dir / "errors").glob("*/*")):
        target = inbox / f.parent.name / f"{round_dir.name}-{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    pool = DataSpec(path=str((round_dir / "pool").resolve()), name=round_dir.name)
    round_ctx = dataclasses.replace(ctx, recipe=dataclasses.replace(ctx.recipe, shot_pool=pool), _models={})
    try:
        status = run_cycle(round_ctx).status
    except NothingToDo:
        status = "nothing-new"
    return measure_head(round_ctx, round_dir.name, status)


def measure_head(ctx: Context, name: str, status: str) -> StreamRound:
    from . import store
    from .data import open_holdout
    from .evaluate import predict
    from .models.heads import text_head

    ws = ctx.workspace
    version = store.head(ws)
    loaded, _ = ctx.model(version)
    targets = {}
    chain = store.chain(ws, version) if version != "base" else []
    for v in chain:
        ref = store.read_manifest(ws, v).holdout
        images = open_holdout(ref)
        targets[f"{v}:{ref.name}"] = predict(
            loaded, text_head(loaded, images.classnames, ref.templates), images, ctx.recipe.batch_size, ctx.device).accuracy
    guards = {}
    for spec in ctx.recipe.guard.suites:
        if not ctx.resolve(spec.path).is_dir():
            continue
        images = open_guard_suite(ctx, spec)
        guards[images.name] = predict(loaded, text_head(loaded, images.classnames, spec.templates), images,
                                      ctx.recipe.batch_size, ctx.device).accuracy
    size = sum(store.read_manifest(ws, v).patch_bytes for v in chain)
    return StreamRound(name, status, version, targets, guards, size)
