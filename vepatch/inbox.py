"""What operators drop into the inbox, and the labelled pool it grows into.

  scan_inbox     new images in inbox/<class>/ (by content hash: .vepatch/seen.jsonl), the ones
                 seen before, and the bad drops with their reason: a folder that is no class of
                 the recipe, a file outside a class folder, a file that is no readable image
                 (empty, truncated, not an image, a decompression bomb), a link leading outside
  quarantine     bad drops moved to quarantine/<date>/ as they lay in the inbox, each reason a
                 line of quarantine/<date>/reasons.jsonl: nothing is deleted, nothing blocks
  split_holdout  tonight's new images per class: a seeded share set aside as the cycle's target
                 holdout (never trained on, in this cycle or later), the rest for training
  stage          both parts copied into the cycle's own folders (.vepatch/cycles/<id>/)
  labelled_pool  every image any cycle kept for training (failed and abandoned cycles aside),
                 plus the recipe's shot_pool if it has one: what later cycles train from
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import clock
from .context import Context
from .data import ImageSet, Sample, class_of_folder, open_image_set
from .images import IMAGE_SUFFIXES, BadImage, read_image
from .errors import DataError, UsageError
from .fsio import append_line, read_lines, write_bytes_atomic
from .workspace import Workspace


@dataclass(frozen=True)
class InboxFile:
    source: str  # path in the inbox, relative to the workspace
    sha256: str
    label: str  # the class folder it came in


@dataclass(frozen=True)
class Quarantined:
    source: str  # where it lay, relative to the workspace
    moved_to: str  # where it is now, relative to the workspace
    reason: str


@dataclass(frozen=True)
class Scan:
    new: list[InboxFile]
    duplicates: list[InboxFile]  # seen in an earlier cycle (or twice tonight)
    bad: list[tuple[Path, str]]  # (file or folder, why it cannot be used)
    settling: list[Path] = field(default_factory=list)  # still being written (cycle.settle_s): left for the next run


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seen_hashes(ws: Workspace) -> set[str]:
    return {r["sha256"] for r in read_lines(ws.seen_path) if "sha256" in r}


def inbox_dir(ctx: Context) -> Path:
    """The inbox must lie inside the workspace: cycle moves files out of it."""
    inbox = ctx.resolve(ctx.recipe.inbox).resolve()
    if not inbox.is_relative_to(ctx.workspace.root.resolve()):
        raise UsageError(f"{ctx.workspace.recipe_path}: inbox '{ctx.recipe.inbox}' is outside the workspace",
                         "use a folder inside the workspace (default: inbox)")
    return inbox


def inbox_folders(ctx: Context) -> dict[str, str]:
    """Inbox folder -> class, where a folder is not named after its class: shot_pool.folders."""
    return dict(ctx.recipe.shot_pool.folders) if ctx.recipe.shot_pool else {}


def scan_inbox(ctx: Context, now: Optional[float] = None) -> Scan:
    """What the inbox holds now (`now`: the clock the settle time is measured on, seconds
    since the epoch; tests pass their own)."""
    inbox = inbox_dir(ctx)
    if not inbox.is_dir():
        return Scan([], [], [])
    settle_s, now = ctx.recipe.cycle.settle_s, time.time() if now is None else now
    root, seen, batch = ctx.workspace.root, seen_hashes(ctx.workspace), set()
    new, dup, bad, settling = [], [], [], []
    for entry in sorted(inbox.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(inbox):
            bad.append((entry, "a link leading outside the inbox"))
        elif not entry.is_dir():
            bad.append((entry, "not inside a class folder (drop images into inbox/<class>/)"))
        elif class_of_folder(entry.name, ctx.recipe.classes, inbox_folders(ctx)) is None:
            bad.append((entry, f"unknown class '{entry.name}' (known: {', '.join(ctx.recipe.classes)})"))
        else:
            for f in sorted(entry.rglob("*")):
                if f.name.startswith(".") or (f.is_dir() and not f.is_symlink()):
                    continue
                why = _misplaced(f, entry, inbox)
                read = Read(why=why) if why else settled_read(f, now, settle_s)
                if read is None:
                    settling.append(f)
                elif read.why:
                    bad.append((f, read.why))
                else:
                    item = InboxFile(str(f.relative_to(root)), read.sha256, entry.name)
                    (dup if item.sha256 in seen or item.sha256 in batch else new).append(item)
                    batch.add(item.sha256)
    return Scan(new, dup, bad, settling)


def _misplaced(f: Path, class_dir: Path, inbox: Path) -> str:
    """Why `f` is no drop whatever its bytes ('' if it may be one)."""
    if f.is_symlink() and not f.resolve().is_relative_to(inbox.resolve()):
        return "a link leading outside the inbox"
    if f.parent != class_dir:
        return f"in a sub-folder of '{class_dir.name}' (drop images directly into inbox/<class>/)"
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ('{f.suffix or f.name}')"
    return ""


@dataclass(frozen=True)
class Read:
    """What the scan found a file to be, once it stood still."""

    sha256: str = ""  # its content ('' when it is no usable image)
    why: str = ""  # why it is no usable image ('' when it is one)


def settled_read(f: Path, now: float, settle_s: float) -> Optional[Read]:
    """The content hash, or why it is no readable image, of a file that stands still; None while it
    may still be written: its size or mtime changed less than `settle_s` before `now`, or
    while it was read. An mtime in the future (a copy that kept its source's times, a skewed
    clock) counts as settled: a copier sets such times only once the bytes are written."""
    before = _size_mtime(f)
    if before is None:  # gone since it was listed (moved away), or a link to nothing
        return Read(why="a link to a file that is not there") if f.is_symlink() else None
    if 0 <= now - before[1] / 1e9 < settle_s:
        return None
    try:
        read_image(f)
        why = ""
    except BadImage as exc:
        why = str(exc)
    try:
        sha = file_sha256(f) if not why else ""
    except OSError:  # moved away while read
        return None
    return None if _size_mtime(f) != before else Read(sha, why)


def _size_mtime(f: Path) -> Optional[tuple[int, int]]:
    try:
        st = f.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def quarantine(ws: Workspace, bad: list[tuple[Path, str]], note: str = "") -> list[Quarantined]:
    """Move bad drops to quarantine/<date>/ (same relative place as in the inbox); the reason
    is written first, then the file moves, so a crash leaves at worst a reason twice."""
    day = ws.quarantine_day(clock.day())
    out = []
    for path, reason in bad:
        relative = path.relative_to(ws.root)
        inside = Path(*relative.parts[1:]) if len(relative.parts) > 1 else relative
        target = day / inside
        if target.exists() or target.is_symlink():
            target = target.with_name(f"{target.stem}-{clock.stamp()}{target.suffix}")
        record = Quarantined(str(relative), str(target.relative_to(ws.root)), reason + (f" ({note})" if note else ""))
        append_line(day / "reasons.jsonl", {"source": record.source, "moved_to": record.moved_to, "reason": record.reason,
                                            "time": clock.iso()})
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        out.append(record)
    return out


def split_holdout(files: list[InboxFile], share: float, seed: int) -> tuple[list[InboxFile], list[InboxFile]]:
    """Per class, a seeded `share` of the new images (at least one of every class that
    brought two or more) for the holdout; the rest for training."""
    rng = random.Random(seed)
    train, holdout = [], []
    for label in sorted({f.label for f in files}):
        group = sorted((f for f in files if f.label == label), key=lambda f: f.sha256)
        rng.shuffle(group)
        k = int(share * len(group))
        k = max(k, 1) if len(group) >= 2 and share > 0 else k
        holdout += group[:k]
        train += group[k:]
    return train, holdout


def stage(ws: Workspace, cycle_id: str, root: Path, train: list[InboxFile], holdout: list[InboxFile],
          classes: list[str], folders: dict[str, str]) -> None:
    """Copy the new images (named by hash) into the cycle's own train/ and holdout/ folders,
    one per class, named after the class (an inbox folder mapped by shot_pool.folders, e.g.
    inbox/local/, is staged under its class: every later reader finds it without the map)."""
    for folder, files in ((ws.cycle_train(cycle_id), train), (ws.cycle_holdout(cycle_id), holdout)):
        for f in files:
            src = root / f.source
            target = folder / class_folder(f.label, classes, folders) / (f.sha256[:16] + src.suffix.lower())
            data = src.read_bytes()
            if hashlib.sha256(data).hexdigest() != f.sha256:  # replaced in the moment since the scan
                raise DataError(f"{src}: changed since the inbox was scanned", "run `vepatch cycle` again: it scans anew")
            write_bytes_atomic(target, data)


def class_folder(folder: str, classes: list[str], folders: dict[str, str]) -> str:
    """The staged folder name of inbox folder `folder`: its class's name, '_' for a space."""
    label = class_of_folder(folder, classes, folders)
    if label is None:  # the scan let it through, so the recipe changed since
        raise UsageError(f"inbox/{folder}: unknown class", f"known: {', '.join(classes)}; map it in shot_pool.folders")
    return classes[label].replace(" ", "_")


def labelled_pool(ctx: Context, usable_cycles: list[str], held_out: set[str]) -> Optional[ImageSet]:
    """Every training image of `usable_cycles` plus the recipe's shot pool, less any image whose
    content is in `held_out` (every holdout that guards: a cycle's, an accepted version's), as
    one set with the recipe's classes; None when there is none."""
    recipe, ws = ctx.recipe, ctx.workspace
    classes = list(recipe.classes)
    samples = [x for cycle_id in usable_cycles for x in staged_samples(ws.cycle_train(cycle_id), classes, inbox_folders(ctx))]
    if recipe.shot_pool is not None:
        spec = recipe.shot_pool
        pool = open_image_set(ctx.resolve(spec.path), classes, spec.folders, spec.name or "pool", spec.max_per_class, recipe.seed)
        if pool.dataset is not None:
            raise UsageError(f"{ctx.workspace.recipe_path}: a cycle cannot mix a saved `datasets` shot_pool with drops",
                             "save the shot pool as an image folder (<class>/*.png), or remove shot_pool")
        samples += pool.samples
    samples = [x for x in samples if file_sha256(Path(x.source)) not in held_out]
    return ImageSet("labelled", str(ws.cycles), classes, samples) if samples else None


def staged_samples(folder: Path, classes: list[str], folders: Optional[dict[str, str]] = None) -> list[Sample]:
    """The images a cycle staged in `folder` (<class>/<hash>.<ext>), labelled by their folder
    (`folders`: shot_pool.folders, for cycles that staged a mapped inbox folder under its own name)."""
    samples = []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        label = class_of_folder(d.name, classes, folders)
        samples += [Sample(str(f), label) for f in sorted(d.iterdir())
                    if label is not None and f.is_file() and not f.name.startswith(".")]  # '.': a write a crash cut short
    return samples
