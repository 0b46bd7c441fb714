"""The versioned patch store under .vepatch/ (DESIGN.md):

  candidates/<id>/delta.safetensors + candidate.json (+ guard.json once judged)
  patches/vNNNN/patch.safetensors + patch.json + guard.json   (accepted only)
  HEAD                                                        (current version; absent = base)

A version is written into a hidden temp folder and renamed into place, then HEAD moves:
a crash leaves either no new version or a complete one. Loading vN applies base + v1..vN,
checking each file's sha256 and each fingerprint on the way; any mismatch is refused."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NothingToDo, StoreError, UsageError
from .faults import fault_point
from .fsio import fsync_dir, sha256_bytes, sha256_file, write_bytes_atomic, write_text_atomic
from .records import GuardReport, PatchManifest, VersionSummary, read_record, to_json
from .workspace import CANDIDATE_FILE, DELTA_FILE, EVIDENCE_FILE, GUARD_FILE, MANIFEST_FILE, PATCH_FILE, Workspace

if TYPE_CHECKING:  # torch comes in with the first delta or model: `log` and `show` answer without it
    from .delta import Delta
    from .models import LoadedModel

VERSION_RE = re.compile(r"^v(\d+)$")


def version_dir(ws: Workspace, version: str) -> Path:
    m = VERSION_RE.match(version)
    if not m:
        raise UsageError(f"'{version}' is not a version", "versions are written vN (v1, v2, ...) or 'base'")
    return ws.version_dir(int(m.group(1)))


def versions(ws: Workspace) -> list[str]:
    """Accepted versions in order (complete folders only; temp folders are invisible)."""
    found = []
    for d in ws.patches.glob("v[0-9]*"):
        if d.is_dir() and (d / MANIFEST_FILE).is_file():
            found.append(int(d.name[1:]))
    return [f"v{n}" for n in sorted(found)]


def head(ws: Workspace) -> str:
    path = ws.head_path
    if not path.is_file():
        return "base"
    value = path.read_text().strip()
    if value != "base" and value not in versions(ws):
        raise StoreError(f"{path}: names '{value}', which is not an accepted version", "run `vepatch rollback vN` to a listed version")
    return value


def set_head(ws: Workspace, version: str) -> None:
    if version != "base" and version not in versions(ws):
        raise UsageError(f"no version '{version}'", f"known: base, {', '.join(versions(ws)) or '(none yet)'}")
    write_text_atomic(ws.head_path, version + "\n")


def chain(ws: Workspace, version: str) -> list[str]:
    """The versions to apply, oldest first, to reach `version`."""
    out, current = [], version
    while current != "base":
        manifest = read_manifest(ws, current)
        out.append(current)
        current = manifest.parent
        if current in out:
            raise StoreError(f"{version_dir(ws, version)}: the parent chain loops", "the store is corrupt")
    return out[::-1]


def version_of(ws: Workspace, candidate_id: str) -> str:
    """The version a candidate became ('' if none): a crash after writing a version but before
    the caller recorded it must not lead to the candidate being judged again."""
    for v in versions(ws):
        if read_manifest(ws, v).candidate_id == candidate_id:
            return v
    return ""


def read_verdict(ws: Workspace, version: str) -> GuardReport | None:
    """The guard's verdict stored with a version (None if unreadable: `verify` says why)."""
    try:
        return read_record(GuardReport, version_dir(ws, version) / GUARD_FILE)
    except Exception:
        return None


def summary(ws: Workspace, version: str) -> VersionSummary:
    m, verdict = read_manifest(ws, version), read_verdict(ws, version)
    return VersionSummary(version, m.parent, m.method, m.strength, m.candidate_id, m.cycle, m.created, m.patch_bytes,
                          m.trainable_params, len(m.train_files), len(m.holdout.sources),
                          verdict.target_outcomes if verdict else [])


def read_manifest(ws: Workspace, version: str) -> PatchManifest:
    path = version_dir(ws, version) / MANIFEST_FILE
    if not path.is_file():
        raise UsageError(f"no version '{version}'", f"known: base, {', '.join(versions(ws)) or '(none yet)'}")
    try:
        return read_record(PatchManifest, path)
    except Exception as exc:
        raise StoreError(f"{path}: unreadable manifest ({exc})", "roll back to a version that verifies") from None


def load_delta(path: Path, expected_sha256: str) -> Delta:
    """Read a delta only if its bytes are the ones the manifest recorded."""
    from .delta import Delta

    check_sha256(path, expected_sha256)
    return Delta.from_file(path)


def check_sha256(path: Path, expected_sha256: str) -> None:
    """A StoreError unless `path` holds the bytes a manifest recorded."""
    if not path.is_file():
        raise StoreError(f"{path}: missing", "roll back to a version that verifies")
    if sha256_file(path) != expected_sha256:
        raise StoreError(f"{path}: sha256 mismatch (tampered or corrupt)", "it is refused; roll back to a version that verifies")


def delta_entries(path: Path, expected_sha256: str) -> list[str]:
    """The entry names of a delta whose bytes are the recorded ones, read from the safetensors
    header alone (no tensor, no torch: what `vepatch show` needs to know what a patch holds)."""
    import json
    import struct

    check_sha256(path, expected_sha256)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        raise StoreError(f"{path}: not a valid safetensors delta", "it is refused; roll back to a version that verifies") from None
    return sorted(k for k in header if k != "__metadata__")


def holds_prompts(entries: list[str]) -> bool:
    """Whether a delta with these entries is (or holds) a prompt patch: learned prompt vectors,
    description weights or a visual prompt (delta.py's kinds; DCAR's border is a dense entry of
    the tower's visual prompt bank, visual_prompts.BANK)."""
    kinds = ("prompt.ids", "prompt.text", "weights.text", "vprompt.tokens")
    return any(e.partition("#")[2] in kinds or ".vepatch_visual_prompts." in e for e in entries)


def apply_version(ws: Workspace, loaded: LoadedModel, version: str) -> LoadedModel:
    """Apply base -> version to `loaded` (which must be the base), checking every fingerprint."""
    from .delta import apply_delta
    from .models.load import model_fingerprint

    for v in chain(ws, version):
        manifest = read_manifest(ws, v)
        folder = version_dir(ws, v)
        if manifest.parent_fingerprint != loaded.fingerprint:
            raise StoreError(
                f"{folder / MANIFEST_FILE}: made for a parent with another fingerprint",
                "this patch belongs to another base model or chain; it is refused",
            )
        apply_delta(loaded.model, load_delta(folder / PATCH_FILE, manifest.patch_sha256))
        loaded.fingerprint = model_fingerprint(loaded.model)
        if loaded.fingerprint != manifest.fingerprint:
            raise StoreError(f"{folder}: the patched tower does not match its recorded fingerprint", "roll back to a version that verifies")
    return loaded


# --- candidates ---------------------------------------------------------------------------


def write_candidate(ws: Workspace, manifest: PatchManifest, delta_bytes: bytes) -> Path:
    folder = ws.candidate_dir(manifest.candidate_id)
    staging = ws.candidates / f".{manifest.candidate_id}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_bytes_atomic(staging / DELTA_FILE, delta_bytes)
    write_text_atomic(staging / CANDIDATE_FILE, to_json(manifest))
    os.replace(staging, folder)
    fsync_dir(ws.candidates)
    return folder


def write_verdict(ws: Workspace, candidate_id: str, report: GuardReport, evidence: bytes) -> None:
    """The guard's verdict and its per-example evidence, beside the candidate it judged
    (evidence first: guard.json is what marks a candidate judged)."""
    write_bytes_atomic(ws.candidate_dir(candidate_id) / EVIDENCE_FILE, evidence)
    write_text_atomic(ws.candidate_dir(candidate_id) / GUARD_FILE, to_json(report))


def read_candidate_verdict(ws: Workspace, candidate_id: str) -> GuardReport | None:
    """The verdict written beside a candidate, if it was judged."""
    path = ws.candidate_dir(candidate_id) / GUARD_FILE
    return read_record(GuardReport, path) if path.is_file() else None


def newest_candidate(ws: Workspace) -> str:
    known = candidates(ws)
    if not known:
        raise NothingToDo(f"{ws.candidates}: no candidate", "run `vepatch apply` first")
    return known[-1]


def waiting_candidate(ws: Workspace) -> str:
    """The newest candidate `vepatch apply` made that was not judged yet: never a bench run's
    or a cycle's (those are judged by their own command, or named explicitly)."""
    for cid in reversed(candidates(ws)):
        path = ws.candidate_dir(cid)
        if (path / GUARD_FILE).is_file():
            continue
        try:
            origin = read_record(PatchManifest, path / CANDIDATE_FILE).origin
        except Exception:
            continue  # `vepatch verify` reports it
        if origin == "apply":
            return cid
    newest_candidate(ws)  # none at all: "run `vepatch apply` first"
    raise NothingToDo(f"{ws.candidates}: every candidate `vepatch apply` made is judged already",
                      "run `vepatch apply` for a new one, or name one: vepatch guard ID (ids: ls .vepatch/candidates/)")


def check_unjudged(ws: Workspace, candidate_id: str) -> None:
    """A candidate's verdict is written once: judging it again is an error naming its fate."""
    version = version_of(ws, candidate_id)
    if version:
        current = "" if head(ws) != read_manifest(ws, version).parent else \
            f"; HEAD is still its parent (--no-promote, or a crash before HEAD moved): `vepatch rollback {version}` makes it current"
        raise UsageError(f"candidate {candidate_id} is already {version}", f"`vepatch show {version}` shows its verdict{current}")
    verdict = read_candidate_verdict(ws, candidate_id)
    if verdict is not None:
        raise UsageError(f"candidate {candidate_id} was judged already ({'accepted' if verdict.accepted else 'refused'})",
                         f"`vepatch show {candidate_id}` shows why; `vepatch apply` makes a new candidate")


def candidates(ws: Workspace) -> list[str]:
    found = [d for d in ws.candidates.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / CANDIDATE_FILE).is_file()]
    return [d.name for d in sorted(found, key=lambda d: d.name)]


def read_candidate(ws: Workspace, candidate_id: str) -> tuple[PatchManifest, Delta]:
    manifest = read_candidate_manifest(ws, candidate_id)
    return manifest, load_delta(ws.candidate_dir(candidate_id) / DELTA_FILE, manifest.patch_sha256)


def read_candidate_manifest(ws: Workspace, candidate_id: str) -> PatchManifest:
    folder = ws.candidate_dir(candidate_id)
    if not (folder / CANDIDATE_FILE).is_file():
        raise UsageError(f"no candidate '{candidate_id}'", f"known: {', '.join(candidates(ws)) or '(none)'}")
    return read_record(PatchManifest, folder / CANDIDATE_FILE)


# --- versions -----------------------------------------------------------------------------


def write_version(ws: Workspace, manifest: PatchManifest, delta: Delta, report: GuardReport, evidence: bytes,
                  make_current: bool = True) -> str:
    """Write an accepted candidate (delta already scaled to the chosen strength) as the next vN."""
    set_aside_numbers = [int(d.name[1:5]) for d in ws.set_aside.glob("v[0-9][0-9][0-9][0-9]-*")]
    number = max([int(v[1:]) for v in versions(ws)] + set_aside_numbers + [0]) + 1  # a set-aside vN is never reused
    version = f"v{number}"
    folder = version_dir(ws, version)
    staging = ws.patches / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    data = delta.to_bytes()
    manifest = dataclasses.replace(manifest, version=version, patch_sha256=sha256_bytes(data), patch_bytes=len(data))
    report = dataclasses.replace(report, version=version)
    write_bytes_atomic(staging / PATCH_FILE, data)
    write_bytes_atomic(staging / EVIDENCE_FILE, evidence)
    write_text_atomic(staging / GUARD_FILE, to_json(report))
    write_text_atomic(staging / MANIFEST_FILE, to_json(manifest))  # last: marks the folder complete
    os.replace(staging, folder)
    fsync_dir(ws.patches)
    fault_point("before-head")  # a crash here leaves vN complete and HEAD on its parent: see finish_promotion
    if make_current:
        set_head(ws, version)
    return version


def finish_promotion(ws: Workspace, version: str) -> bool:
    """Move HEAD to `version` when it still names the version's parent: what a process killed
    between writing vN and moving HEAD left undone. Returns whether HEAD moved."""
    if head(ws) != read_manifest(ws, version).parent:
        return False  # HEAD moved on since (a rollback, a later version): leave it
    set_head(ws, version)
    return True


# --- verify -------------------------------------------------------------------------------


def verify(ws: Workspace, base: LoadedModel) -> list[str]:
    """Re-hash everything; returns the problems found (empty: the store is valid).
    `base` is a freshly loaded base model; it is patched along each chain as it goes."""
    problems = []
    try:
        head(ws)
    except StoreError as exc:
        problems.append(str(exc))
    return problems + list(bad_versions(ws, base).values()) + list(bad_candidates(ws).values())


def bad_versions(ws: Workspace, base: LoadedModel) -> dict[str, str]:
    """Version -> why it does not verify (its files, its fingerprints, its verdict)."""
    import copy

    from .models.load import model_fingerprint
    from .prompts import detach as detach_prompts
    from .visual_prompts import load_pristine

    bad = {}
    pristine = copy.deepcopy(base.model.visual.state_dict())
    for v in versions(ws):
        folder = version_dir(ws, v)
        try:
            load_pristine(base.model.visual, pristine)
            detach_prompts(base.model)
            base.fingerprint = model_fingerprint(base.model)
            manifest = read_manifest(ws, v)
            if manifest.base_fingerprint != base.fingerprint:
                bad[v] = f"{folder}: made for another base model (fingerprint {manifest.base_fingerprint[:12]})"
                continue
            apply_version(ws, base, v)
            read_record(GuardReport, folder / GUARD_FILE)
        except Exception as exc:
            bad[v] = str(exc)
    load_pristine(base.model.visual, pristine)
    detach_prompts(base.model)
    base.fingerprint = model_fingerprint(base.model)
    return bad


def bad_candidates(ws: Workspace) -> dict[str, str]:
    bad = {}
    for c in candidates(ws):
        try:
            read_candidate(ws, c)
        except Exception as exc:
            bad[c] = str(exc)
    return bad


def set_aside(ws: Workspace, base: LoadedModel) -> list[tuple[str, Path]]:
    """`vepatch verify --quarantine`: move every version that does not verify — and every later
    version built on one — and every corrupt candidate to .vepatch/quarantine/, so the store
    verifies again. Refused while HEAD is one of them (roll back first). Returns (name, moved to)."""
    from . import clock

    bad = set(bad_versions(ws, base))
    doomed = [v for v in versions(ws) if v in bad or bad & set(_chain_names(ws, v))]
    current = head(ws)
    if current in doomed:
        raise UsageError(f"HEAD is {current}, which does not verify (or is built on a version that does not)",
                         f"roll back first: vepatch rollback {_last_good(ws, doomed)}")
    moved = []
    target = ws.set_aside
    stamp = clock.stamp()
    for v in reversed(doomed):  # newest first: a crash midway never leaves a child without its parent
        folder = version_dir(ws, v)
        dest = target / f"{folder.name}-{stamp}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, dest)
        moved.append((v, dest))
    for c in bad_candidates(ws):
        dest = target / f"candidate-{c}-{stamp}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ws.candidate_dir(c), dest)
        moved.append((c, dest))
    if moved:
        fsync_dir(ws.patches)
        ws.log("quarantine", moved=[name for name, _ in moved])
    return moved


def _chain_names(ws: Workspace, version: str) -> list[str]:
    try:
        return chain(ws, version)
    except Exception:
        return [version]


def _last_good(ws: Workspace, doomed: list[str]) -> str:
    good = [v for v in versions(ws) if v not in doomed]
    return good[-1] if good else "base"


def leftovers(ws: Workspace) -> list[Path]:
    """Temp folders left by a crash: invisible to every reader, safe to delete."""
    return sorted(p for d in (ws.patches, ws.candidates) for p in d.glob(".*.tmp*"))
