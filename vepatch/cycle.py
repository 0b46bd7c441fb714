"""One continual step, for cron: tonight's drops -> diagnose -> apply -> guard -> promote or
refuse -> move the images to a dated archive. Never deletes an image.

A cycle learns from what operators drop (inbox.py): a seeded share of each class's new images
is set aside as the cycle's target holdout, the rest join the labelled pool, and the patch is
trained on tonight's images plus earlier ones (apply.retain says which); the guard protects
every earlier accepted holdout. Every step is recorded in .vepatch/cycles/<id>/state.json
before the next starts, so a cycle killed at any point is finished by the next run. A cycle
that fails the same way `cycle.max_same_failure` times is set aside (its images quarantined)
so that the next run takes new images; `vepatch cycle --abandon` does that by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from . import clock, store
from ._typed import from_plain, to_plain
from .apply import ShotPlan, holdout_ref
from .context import Context
from .data import ImageSet
from .errors import NothingToDo, VepatchError
from .faults import fault_point
from .fsio import append_line, write_bytes_atomic, write_text_atomic
from .inbox import (InboxFile, Quarantined, class_folder, file_sha256, inbox_dir, inbox_folders, labelled_pool, quarantine,
                    scan_inbox, seen_hashes, split_holdout, stage, staged_samples)
from .recipe import ApplySpec
from .records import ClassOutcome

Step = Literal["staged", "diagnosed", "applied", "judged", "done", "failed", "abandoned"]
FINISHED = ("done", "failed", "abandoned")


@dataclass(frozen=True)
class CycleState:
    cycle_id: str
    step: Step
    files: list[InboxFile]  # tonight's new images, as they lay in the inbox
    duplicates: list[InboxFile] = field(default_factory=list)  # seen before: archived, not used
    holdout: list[str] = field(default_factory=list)  # sha256 of the new images set aside as the target holdout
    seed: int = 0  # this cycle's seed: holdout split, shots, masks, training
    candidate_id: str = ""
    accepted: bool = False
    version: str = ""
    reason: str = ""
    outcomes: list[ClassOutcome] = field(default_factory=list)  # the target holdout, per class
    failures: list[str] = field(default_factory=list)  # errors of failed attempts, oldest first


@dataclass(frozen=True)
class CycleReport:
    cycle_id: str
    status: Literal["promoted", "refused", "nothing-new", "already-right", "pooled", "dry-run", "locked",
                    "failed", "abandoned"]
    new_images: int
    duplicates: int
    candidate_id: str
    version: str
    reason: str
    resumed: bool = False
    holdout_images: int = 0  # of the new images, set aside as the target holdout
    quarantined: list[Quarantined] = field(default_factory=list)  # bad drops moved aside tonight
    outcomes: list[ClassOutcome] = field(default_factory=list)  # what the (promoted) patch did on the holdout
    report_file: str = ""  # the night's HTML page (reports/<version or candidate>.html), when a candidate was judged
    waiting: int = 0  # drops still being written (cycle.settle_s): left in the inbox for the next run

    @property
    def exit_code(self) -> int:
        """What cron reads: 0 promoted (or nothing to learn), 3 refused, 4 nothing new, 5 locked, 1 failed."""
        return {"refused": 3, "nothing-new": 4, "pooled": 4, "locked": 5, "failed": 1}.get(self.status, 0)


def save_state(ctx: Context, state: CycleState) -> None:
    write_text_atomic(ctx.workspace.cycle_state(state.cycle_id), json.dumps(to_plain(state), indent=2))


def states(ctx: Context) -> list[CycleState]:
    """Every cycle's state, oldest first."""
    folder = ctx.workspace.cycles
    paths = sorted(folder.glob("*/state.json")) if folder.is_dir() else []
    return [from_plain(CycleState, json.loads(p.read_text()), strict=False) for p in paths]


def unfinished(ctx: Context) -> Optional[CycleState]:
    return next((s for s in reversed(states(ctx)) if s.step not in FINISHED), None)


def cycle_seed(seed: int, cycle_id: str) -> int:
    """A seed of its own for every cycle (so nights do not repeat one sample), reproducible."""
    return int(hashlib.sha256(f"{seed}:{cycle_id}".encode()).hexdigest()[:8], 16)


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
               candidate=report.candidate_id, version=report.version, resumed=report.resumed,
               quarantined=len(report.quarantined))
    return report


def failure_report(exc: BaseException) -> CycleReport:
    """The report of a cycle that raised: nothing new (4), locked (5) or failed (1)."""
    status = {4: "nothing-new", 5: "locked"}.get(getattr(exc, "exit_code", 1), "failed")
    return CycleReport("", status, 0, 0, "", "", getattr(exc, "message", str(exc)))


def run_cycle(ctx: Context, dry_run: bool = False) -> CycleReport:
    """One step; the caller holds the workspace lock."""
    ws = ctx.workspace
    state = unfinished(ctx)
    resumed, moved, waiting = state is not None, [], 0  # waiting: drops left for the next run
    if state is None:
        scan = scan_inbox(ctx)
        waiting = len(scan.settling)
        if dry_run:
            return CycleReport("", "dry-run", len(scan.new), len(scan.duplicates), "", "",
                               (f"would diagnose, apply and guard {len(scan.new)} new image(s)" if scan.new else "nothing new")
                               + (f"; would quarantine {len(scan.bad)} bad drop(s)" if scan.bad else "")
                               + settling_note(ctx, waiting), waiting=waiting)
        moved = quarantine(ws, scan.bad)
        if not scan.new:
            if scan.duplicates:
                _archive(ctx, CycleState("dups-" + clock.stamp(), "judged", [], scan.duplicates))
            bad = f" ({len(moved)} bad drop(s) moved to quarantine/: {moved[0].reason}{', ...' if len(moved) > 1 else ''})" if moved else ""
            raise NothingToDo(f"{inbox_dir(ctx)}: no new image{bad}{settling_note(ctx, waiting)}",
                              "operators drop misclassified images into inbox/<class>/")
        cycle_id = clock.stamp()
        seed = cycle_seed(ctx.recipe.seed, cycle_id)
        train, holdout = split_holdout(scan.new, ctx.recipe.cycle.holdout_share, seed)
        state = CycleState(cycle_id, "staged", scan.new, scan.duplicates, [f.sha256 for f in holdout], seed)
        stage(ws, cycle_id, ws.root, train, holdout, list(ctx.recipe.classes), inbox_folders(ctx))
        save_state(ctx, state)
    elif dry_run:
        return CycleReport(state.cycle_id, "dry-run", len(state.files), len(state.duplicates), state.candidate_id,
                           state.version, f"would resume the unfinished cycle at step '{state.step}'", True)
    fault_point("after-stage")
    try:
        state = _advance(ctx, state)
    except Exception as exc:
        if _record_failure(ctx, state, exc):
            raise VepatchError(f"{getattr(exc, 'message', exc)} — failed {ctx.recipe.cycle.max_same_failure} times the same "
                               "way: the cycle is set aside, its new images are in quarantine/",
                               (getattr(exc, "hint", "") + "; " if getattr(exc, "hint", "") else "") +
                               "the next run takes new drops; move the images back into inbox/ once fixed") from exc
        raise
    _archive(ctx, state)
    status = ("promoted" if state.accepted else "refused" if state.candidate_id else
              "already-right" if state.holdout else "pooled")  # pooled: no image could be held out
    page = ""
    if state.candidate_id:  # the morning's page; a failure to draw it never fails the night
        from .report import write_verdict_report

        try:
            page = str(write_verdict_report(ctx.workspace, state.version or state.candidate_id))
        except Exception as exc:
            ctx.workspace.log("report-failed", cycle=state.cycle_id, error=str(exc))
    return CycleReport(state.cycle_id, status, len(state.files), len(state.duplicates), state.candidate_id,
                       state.version, state.reason + settling_note(ctx, waiting), resumed, len(state.holdout), moved,
                       state.outcomes, page, waiting)


def settling_note(ctx: Context, waiting: int) -> str:
    """The report's word on drops still being written ('' when there are none)."""
    if not waiting:
        return ""
    return (f"; {waiting} drop(s) changed less than {ctx.recipe.cycle.settle_s:g} s ago (still being copied?): "
            "left in the inbox for the next run")


def _advance(ctx: Context, state: CycleState) -> CycleState:
    """Run the steps left, saving the state after each."""
    from .apply import run_apply
    from .diagnose import run_diagnose
    from .guard import run_guard

    ws = ctx.workspace
    if state.step == "staged":
        holdout = holdout_set(ctx, state)
        if not len(holdout):
            state = dataclasses.replace(state, step="judged", reason="too few new images to set a holdout aside "
                                        "(two of a class are needed); they join the labelled pool for later nights")
        else:
            try:
                run_diagnose(ctx, ws.cycle_train(state.cycle_id), {"seed": state.seed})
            except NothingToDo as exc:  # every new image is already classified right
                state = dataclasses.replace(state, step="judged", reason=exc.message)
            else:
                state = dataclasses.replace(state, step="diagnosed")
        save_state(ctx, state)
        fault_point("after-diagnose")
    if state.step == "diagnosed":
        plan = plan_cycle(ctx, state)
        spec = ctx.recipe.apply
        recipe = dataclasses.replace(ctx.recipe, seed=state.seed,
                                     apply=dataclasses.replace(spec, epochs=night_epochs(spec, plan.shots)))
        manifest = run_apply(ctx, recipe, plan, "latest")
        state = dataclasses.replace(state, step="applied", candidate_id=manifest.candidate_id)
        save_state(ctx, state)
        fault_point("after-apply")
    if state.step == "applied":
        version = store.version_of(ws, state.candidate_id)
        if version:  # promoted before a crash: record it, never judge the candidate again
            report = store.read_verdict(ws, version)
            if report is None:
                raise store.StoreError(f"{store.version_dir(ws, version)}: unreadable guard.json", "run `vepatch verify`")
            if store.finish_promotion(ws, version):  # killed between writing vN and moving HEAD
                ws.log("promote", version=version, current=True, resumed=True)
        elif (judged := store.read_candidate_verdict(ws, state.candidate_id)) is not None:
            report = judged  # refused before a crash: the verdict stands
        else:
            report = run_guard(ctx, state.candidate_id, None)
            fault_point("after-version")  # a version may be written, the state not yet saved
        state = dataclasses.replace(state, step="judged", accepted=report.accepted, version=report.version,
                                    reason=report.reason, outcomes=report.target_outcomes)
        save_state(ctx, state)
        fault_point("after-guard")
    return state


def plan_cycle(ctx: Context, state: CycleState) -> ShotPlan:
    """Tonight's training images, plus earlier labelled ones per apply.retain ('replay': every
    class seen so far; otherwise tonight's classes only), up to apply.shots per class; the
    holdout is tonight's; the reference set (retain: *distill) is the earlier images of other classes
    (beside the recipe's `reference:`, if any)."""
    recipe, ws = ctx.recipe, ctx.workspace
    every = states(ctx)
    usable = [s.cycle_id for s in every if s.step not in ("failed", "abandoned")]
    pool = labelled_pool(ctx, usable, {h for s in every for h in s.holdout} | version_holdouts(ctx))
    tonight_dir = str(ws.cycle_train(state.cycle_id))
    tonight = [i for i, s in enumerate(pool.samples) if s.source.startswith(tonight_dir + os.sep)]
    tonight_classes = {pool.samples[i].label for i in tonight}
    classes = {s.label for s in pool.samples} if recipe.apply.replays else tonight_classes
    rng, tonight_set = random.Random(state.seed), set(tonight)
    have = Counter(pool.samples[i].label for i in tonight)
    # balanced: an earlier class is replayed with as many images as tonight's biggest class
    # brings, so that no class outweighs another in tonight's update
    per_class = max([recipe.apply.shots, *have.values()])
    chosen = list(tonight)
    for k in sorted(classes):
        earlier = [i for i, s in enumerate(pool.samples) if s.label == k and i not in tonight_set]
        chosen += rng.sample(earlier, max(0, min(len(earlier), per_class - have[k])))
    others = [i for i, s in enumerate(pool.samples) if s.label not in tonight_classes]
    holdout = holdout_set(ctx, state)
    return ShotPlan(pool.subset(sorted(chosen), "shots"), holdout_ref(holdout, f"cycle {state.cycle_id}", recipe, ctx.workspace),
                    state.cycle_id, pool.subset(others, "reference") if others else None)


def night_epochs(spec: ApplySpec, shots: ImageSet) -> int:
    """Epochs for a night that trains on every new image: as many image passes as apply.epochs
    over apply.shots per class would take, so a big drop sees each image fewer times instead
    of making the night longer (never fewer than one pass, never more than apply.epochs)."""
    budget = spec.epochs * spec.shots * len({s.label for s in shots.samples})
    return max(1, min(spec.epochs, math.ceil(budget / max(1, len(shots)))))


def version_holdouts(ctx: Context) -> set[str]:
    """Content hashes of every accepted version's target holdout (files that still exist): they
    guard later patches, so no cycle may train on them."""
    ws = ctx.workspace
    paths = {ws.root / s for v in store.versions(ws) for s in store.read_manifest(ws, v).holdout.sources}
    return {file_sha256(p) for p in paths if p.is_file()}


def holdout_set(ctx: Context, state: CycleState) -> ImageSet:
    """The cycle's target holdout, from its own copy of the images, and every earlier night's
    held-out drop of tonight's classes that no accepted version holds (nights refused, or
    already right): never trained on, so they can still show a fix. A night of 3 images a
    class cannot show a gain by itself (README "Guard statistics"); the nights since the last
    promotion together can. Empty when tonight set nothing aside."""
    ws, classes = ctx.workspace, list(ctx.recipe.classes)
    folder = ws.cycle_holdout(state.cycle_id)
    mapped = inbox_folders(ctx)
    samples = staged_samples(folder, classes, mapped)
    if samples:
        tonight = {x.label for x in samples}
        held = {ws.portable(s) for v in store.versions(ws) for s in store.read_manifest(ws, v).holdout.sources}
        for earlier in states(ctx):
            if earlier.cycle_id < state.cycle_id and earlier.step == "done" and not earlier.accepted:
                samples += [x for x in staged_samples(ws.cycle_holdout(earlier.cycle_id), classes, mapped)
                            if x.label in tonight and ws.portable(x.source) not in held]
    return ImageSet("target-holdout", str(folder), classes, samples)


def _record_failure(ctx: Context, state: CycleState, exc: Exception) -> bool:
    """Count a failed attempt; the same failure `cycle.max_same_failure` times in a row sets the
    cycle aside (returns True): its images go to quarantine with the error, so the next run
    takes new ones."""
    message = getattr(exc, "message", "") or f"{type(exc).__name__}: {exc}"
    failures = [*state.failures, message]
    limit = max(1, ctx.recipe.cycle.max_same_failure)
    if len(failures) >= limit and len(set(failures[-limit:])) == 1:
        set_aside(ctx, dataclasses.replace(state, failures=failures), "failed",
                  f"set aside after failing {limit} times the same way: {message}")
        return True
    save_state(ctx, dataclasses.replace(state, failures=failures))
    return False


def set_aside(ctx: Context, state: CycleState, step: Step, reason: str) -> list[Quarantined]:
    """Mark a cycle failed or abandoned; its new images still in the inbox go to quarantine with
    `reason` (images seen before are archived as usual)."""
    ws = ctx.workspace
    bad = [(ws.root / f.source, f"cycle {state.cycle_id}: {reason}") for f in state.files if (ws.root / f.source).is_file()]
    moved = quarantine(ws, bad)
    _archive(ctx, dataclasses.replace(state, files=[]))
    save_state(ctx, dataclasses.replace(state, step=step, reason=reason))
    ws.log("cycle-set-aside", cycle=state.cycle_id, step=step, reason=reason, quarantined=len(moved))
    return moved


def abandon(ctx: Context) -> CycleReport:
    """`vepatch cycle --abandon`: set the unfinished cycle aside by hand."""
    with ctx.workspace.lock():
        state = unfinished(ctx)
        if state is None:
            raise NothingToDo(f"{ctx.workspace.cycles}: no unfinished cycle", "nothing to abandon")
        moved = set_aside(ctx, state, "abandoned", "abandoned by hand")
    return CycleReport(state.cycle_id, "abandoned", len(state.files), len(state.duplicates), state.candidate_id,
                       state.version, "abandoned by hand; its new images are in quarantine/", True, quarantined=moved)


def _archive(ctx: Context, state: CycleState) -> None:
    """Move the cycle's inbox files to archive/<date>/<class>/ (idempotent), then mark done.
    What is archived and marked seen is the content the cycle scanned: a file replaced since
    (same name, new bytes) goes back to the inbox for the next run, and the scanned content
    is archived from the cycle's staged copy."""
    ws = ctx.workspace
    dest = ws.archive_day(state.cycle_id[:8] if state.cycle_id[:1].isdigit() else clock.day())
    recorded = seen_hashes(ws)
    for i, f in enumerate([*state.files, *state.duplicates]):
        target = archive_file(ctx, state, f, dest)
        if f.sha256 not in recorded:
            append_line(ws.seen_path, {"sha256": f.sha256, "archived": str(target.relative_to(ws.root)), "cycle": state.cycle_id})
            recorded.add(f.sha256)
        if i == 0:
            fault_point("mid-archive")
    if state.files:
        save_state(ctx, dataclasses.replace(state, step="done"))


def archive_file(ctx: Context, state: CycleState, f: InboxFile, dest: Path) -> Path:
    """Where the content `f` was scanned with lies in the archive, moved there now if need be."""
    src = ctx.workspace.root / f.source
    target = dest / f.label / src.name
    if target.exists() and file_sha256(target) != f.sha256:
        target = target.with_name(f"{target.stem}-{f.sha256[:8]}{target.suffix}")
    if src.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)  # first the move (a writer from now on makes a new file), then the check
        if file_sha256(target) == f.sha256:
            return target
        back = src if not src.exists() else src.with_name(f"{src.stem}-{file_sha256(target)[:8]}{src.suffix}")
        os.replace(target, back)  # replaced since the scan: a new drop, for the next run
    elif target.is_file():
        return target  # moved before a crash (its content checked above)
    copy = staged_copy(ctx, state, f)
    if copy is not None:  # the scanned content, as the cycle staged it
        write_bytes_atomic(target, copy.read_bytes())
    return target  # (a duplicate's content was archived the night it was new)


def staged_copy(ctx: Context, state: CycleState, f: InboxFile) -> Optional[Path]:
    """The cycle's own copy of a new image (train/ or holdout/), if it has one."""
    ws, folder = ctx.workspace, class_folder(f.label, list(ctx.recipe.classes), inbox_folders(ctx))
    name = f.sha256[:16] + Path(f.source).suffix.lower()
    found = [d / folder / name for d in (ws.cycle_train(state.cycle_id), ws.cycle_holdout(state.cycle_id))]
    return next((p for p in found if p.is_file()), None)
