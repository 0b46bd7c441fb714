"""A chaos run of the nightly loop: many nights of textile drops with the process killed at
random fault points, files still being copied in while a cycle runs, bad files mixed in and
`vepatch apply` started beside the cycle; then every promise of the loop is checked:

  * every file dropped is exactly once in archive/ or quarantine/ (a quarantined one with its
    reason in reasons.jsonl), and every readable image's content is in .vepatch/seen.jsonl
  * `vepatch verify` passes
  * HEAD is the newest version (every promotion moved it, killed or not)

    python examples/chaos_nights.py WS [--nights 20] [--per-class 3] [--kill-share 0.5] [--seed 0]

Needs conformal-clip-data (pip install conformal-clip-data) and the embedded default model.
A measurement, not a test: it takes minutes per night on a small CPU (README, "Chaos run").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1]
VEPATCH = [sys.executable, "-m", "vepatch"]
FAULTS = ["after-stage", "after-diagnose", "after-apply", "before-head", "after-version", "after-guard", "mid-archive"]
CLASSES = {"nominal": "nominal_dir", "local_defect": "local_dir", "global_defect": "global_dir"}
RIVAL = 8  # images per class of the folder `vepatch apply --from` trains on beside the cycle


def vepatch(ws: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "VEPATCH_FAULT_AT": fault} if fault else {k: v for k, v in os.environ.items() if k != "VEPATCH_FAULT_AT"}
    return subprocess.run(VEPATCH + list(args) + ["-C", str(ws)], capture_output=True, text=True, env=env)


def make_workspace(ws: Path) -> None:
    """recipes/textile-nightly.yaml, made cheap enough for many nights: few epochs, one small, permissive guard."""
    subprocess.run(VEPATCH + ["init", str(ws), "--recipe", str(HERE / "recipes" / "textile-nightly.yaml")], check=True,
                   capture_output=True)
    path = ws / "vepatch.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["apply"] = {**recipe.get("apply", {}), "shots": 4, "epochs": 2}
    # a permissive guard: most nights promote, so kills between a version's rename and HEAD happen too
    # (the loop's bookkeeping is what is measured here, not the patches)
    recipe["guard"] = {"suites": [{"path": "builtin:digits", "name": "digits", "templates": ["a photo of the number {}."],
                                   "max_per_class": 5, "max_drop_pp": 100.0}], "strengths": [0.5, 1.0],
                       "min_target_gain_pp": -100.0, "max_mean_drop_pp": 100.0, "holdout_max_drop_pp": 100.0}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def textile_images(per_night: int, nights: int, rng: random.Random) -> dict[str, list[Path]]:
    import conformal_clip_data as ccd

    # per class: the nights' drops, then one late copy per night (nominal), then RIVAL for `apply --from`
    return {name: rng.sample(sorted(getattr(ccd, fn)().glob("*.jpg")), per_night * nights + nights + RIVAL)
            for name, fn in CLASSES.items()}


def rival_folder(ws: Path, images: dict[str, list[Path]]) -> Path:
    """A labelled folder for the `vepatch apply --from` started beside each night."""
    folder = ws / "rival"
    for name, files in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for f in files[-RIVAL:]:
            shutil.copy2(f, folder / name / f.name)
    return folder


class Drops:
    """Everything put into the inbox, by file name (unique): where it came from and what it is."""

    def __init__(self, inbox: Path):
        self.inbox = inbox
        self.files: dict[str, str] = {}  # name -> 'image', 'bad' or 'late'

    def put(self, folder: str, name: str, data: bytes, kind: str, keep_mtime_of: Path | None = None) -> Path:
        target = self.inbox / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if keep_mtime_of is not None:  # an operator's cp -p: the source's times
            st = keep_mtime_of.stat()
            os.utime(target, (st.st_atime, st.st_mtime))
        self.files[name] = kind
        return target


def drop_night(drops: Drops, night: int, images: dict[str, list[Path]], per_class: int, rng: random.Random) -> None:
    """The night's images (copied with their times), sometimes a bad file or an image seen before."""
    for folder, files in images.items():
        for f in files[(night - 1) * per_class: night * per_class]:
            drops.put(folder, f"n{night}-{f.name}", f.read_bytes(), "image", keep_mtime_of=f)
    old = Path(images["nominal"][0])
    if rng.random() < 0.5:
        drops.put("nominal", f"n{night}-empty.jpg", b"", "bad", keep_mtime_of=old)
    if rng.random() < 0.5:
        drops.put("local_defect", f"n{night}-truncated.jpg", old.read_bytes()[:500], "bad", keep_mtime_of=old)
    if rng.random() < 0.3:
        drops.put("zebra", f"n{night}-zebra.jpg", old.read_bytes(), "bad", keep_mtime_of=old)
    if night > 1 and rng.random() < 0.5:  # seen before: archived again, never used again
        seen = images["global_defect"][0]
        drops.put("global_defect", f"n{night}-again-{seen.name}", seen.read_bytes(), "image", keep_mtime_of=seen)


def copy_in_slowly(drops: Drops, night: int, source: Path, pause: float) -> threading.Thread:
    """A copy still going while the cycle runs: half the bytes, a pause, the rest."""
    def run():
        data = source.read_bytes()
        target = drops.put("nominal", f"n{night}-late-{source.name}", data[: len(data) // 2], "late")
        time.sleep(pause)
        with open(target, "ab") as f:
            f.write(data[len(data) // 2:])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def night_until_done(ws: Path, fault: str, stats: Counter) -> tuple[dict, bool]:
    """One cron run (killed at `fault`, if the night gets there), then runs until the night is
    finished; returns the last run's report and whether the night was killed."""
    done = vepatch(ws, "cycle", "--json", "--wait", "900", fault=fault)  # queued behind a rival apply, as cron would be
    killed = done.returncode == -9
    while done.returncode == -9:
        stats[f"killed at {fault}"] += 1
        done = vepatch(ws, "cycle", "--json", "--wait", "900")
    if done.returncode not in (0, 3, 4):
        raise SystemExit(f"cycle failed (exit {done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout), killed


def check(ws: Path, drops: Drops) -> list[str]:
    """Every promise of the loop; returns what failed."""
    sys.path.insert(0, str(HERE))
    from vepatch import store
    from vepatch.inbox import file_sha256, seen_hashes
    from vepatch.workspace import Workspace

    problems = []
    archived = Counter(p.name for p in (ws / "archive").rglob("*") if p.is_file())
    in_quarantine = [p for p in (ws / "quarantine").rglob("*") if p.is_file() and p.name != "reasons.jsonl"]
    quarantined = Counter(p.name for p in in_quarantine)
    moved_to = {json.loads(line)["moved_to"] for f in (ws / "quarantine").rglob("reasons.jsonl")
                for line in f.read_text().splitlines() if line.strip()}
    for name, kind in drops.files.items():
        if archived[name] + quarantined[name] != 1:
            problems.append(f"{name} ({kind}): {archived[name]} time(s) in archive/, {quarantined[name]} in quarantine/")
    for p in in_quarantine:  # its reason names where it (or its folder: an unknown class) was moved to
        here = p.relative_to(ws)
        if not any(str(part) in moved_to for part in (here, *here.parents)):
            problems.append(f"{p}: quarantined without a reason")
    left = [p for p in (ws / "inbox").rglob("*") if p.is_file()]
    problems += [f"{p}: still in the inbox" for p in left]
    seen = seen_hashes(Workspace(ws))
    for p in (ws / "archive").rglob("*"):
        if p.is_file() and file_sha256(p) not in seen:
            problems.append(f"{p}: archived but not marked seen")
    verify = vepatch(ws, "verify", "--json")
    if verify.returncode != 0:
        problems.append(f"verify: {verify.stdout.strip()} {verify.stderr.strip()}")
    versions = store.versions(Workspace(ws))
    if store.head(Workspace(ws)) != (versions[-1] if versions else "base"):
        problems.append(f"HEAD is {store.head(Workspace(ws))}, the newest version {versions[-1] if versions else 'base'}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--nights", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=3, help="new images per class per night")
    parser.add_argument("--kill-share", type=float, default=0.5, help="share of nights killed at a random fault point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, stats, ws = random.Random(args.seed), Counter(), args.workspace
    shutil.rmtree(ws, ignore_errors=True)
    make_workspace(ws)
    images = textile_images(args.per_class, args.nights, rng)
    drops, rival_dir = Drops(ws / "inbox"), rival_folder(ws, images)
    start = time.perf_counter()
    for night in range(1, args.nights + 1):
        drop_night(drops, night, images, args.per_class, rng)
        late = images["nominal"][args.per_class * args.nights + night - 1]
        copier = copy_in_slowly(drops, night, late, pause=rng.uniform(1, 20))
        rival = subprocess.Popen(VEPATCH + ["apply", "--diagnosis", "none", "--epochs", "1", "--shots", "4", "--from", str(rival_dir),
                                            "-C", str(ws)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 3))  # the rival starts first, or the cycle does
        fault = rng.choice(FAULTS) if rng.random() < args.kill_share else ""
        report, killed = night_until_done(ws, fault, stats)
        stats[f"night {report['status']}"] += 1
        stats["drops waiting a night"] += report.get("waiting", 0)
        stats["quarantined"] += len(report.get("quarantined", []))
        stats[f"rival apply exit {rival.wait()}"] += 1
        copier.join()
        print(f"night {night}: {report['status']} {report.get('version') or report.get('candidate_id') or ''}"
              f"{' (killed at ' + fault + ', resumed)' if killed else ''}", flush=True)
    while True:  # the copies are done: the last drops are taken as complete
        last = vepatch(ws, "cycle", "--json", "--settle", "0", "--wait", "900")
        if last.returncode == 4 and not [p for p in (ws / "inbox").rglob("*") if p.is_file()]:
            break
        if last.returncode not in (0, 3, 4):
            raise SystemExit(f"cycle failed (exit {last.returncode}): {last.stderr.strip()}")
    problems = check(ws, drops)
    print(f"{args.nights} nights in {time.perf_counter() - start:.0f} s; {len(drops.files)} files dropped")
    for key, n in sorted(stats.items()):
        print(f"  {key}: {n}")
    print("all checks pass" if not problems else "\n".join(["PROBLEMS:", *problems]))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
