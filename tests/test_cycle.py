"""`vepatch cycle`, the cron step: idempotent, crash-safe, locked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from vepatch import store
from vepatch.recipe import ApplySpec, CycleSpec, DataSpec, GuardSpec, GuardSuite
from vepatch.workspace import Workspace


def _cycle_ws(make_workspace, bundle, tmp_path) -> Path:
    pool = tiny.make_folder(tmp_path / "pool", 10, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    root = make_workspace(
        bundle, shot_pool=DataSpec(path=str(pool), name="pool"),
        apply=ApplySpec(shots=4, epochs=1, batch_size=6, rank=2, lora_alpha=2.0, augment_scale=1.0),
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]),
        cycle=CycleSpec(settle_s=0),  # tests drop complete files
    )
    return root


def _drop(root: Path, seed: int, per_class: int = 3) -> set[str]:
    """Operators drop images into inbox/<class>/; returns their content hashes."""
    from vepatch.inbox import file_sha256

    folder = tiny.make_folder(root / "inbox", per_class, seed=seed)
    return {file_sha256(p) for p in folder.glob("*/*.png")}


def _run(root: Path, *args, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "VEPATCH_FAULT_AT": fault} if fault else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "vepatch", "cycle", "-C", str(root), "--json", *args],
                          capture_output=True, text=True, env=env)


def _archived_hashes(root: Path) -> list[str]:
    from vepatch.inbox import file_sha256

    return sorted(file_sha256(p) for p in (root / "archive").rglob("*.png"))


def test_cycle_promotes_then_has_nothing_to_do(make_workspace, vit_bundle, tmp_path):
    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    hashes = _drop(root, seed=1)
    dry = _run(root, "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["new_images"] == 9
    done = _run(root)
    report = json.loads(done.stdout)
    assert done.returncode in (0, 3) and report["status"] in ("promoted", "refused", "already-right"), done.stderr
    if report["candidate_id"]:  # the morning's page, named after what the night made
        page = Path(report["report_file"])
        assert page.name == (report["version"] or report["candidate_id"]) + ".html" and "<h1>vepatch report" in page.read_text()
    assert not list((root / "inbox").rglob("*.png")) and sorted(hashes) == _archived_hashes(root)
    again = _run(root)
    assert again.returncode == 4 and json.loads(again.stdout)["status"] == "nothing-new"
    # the same images dropped again are recognized by content and archived, not reprocessed
    _drop(root, seed=1)
    assert _run(root).returncode == 4 and not list((root / "inbox").rglob("*.png"))
    events = [json.loads(line)["event"] for line in (root / ".vepatch" / "log.jsonl").read_text().splitlines()]
    assert events.count("cycle") == 3


@pytest.mark.parametrize("fault", ["after-stage", "after-diagnose", "after-apply", "before-head", "after-version",
                                   "after-guard", "mid-archive"])
def test_a_cycle_killed_anywhere_is_finished_by_the_next(make_workspace, vit_bundle, tmp_path, fault):
    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    hashes = _drop(root, seed=2)
    killed = _run(root, fault=fault)
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL
    ws = Workspace(root)
    verify = subprocess.run([sys.executable, "-m", "vepatch", "verify", "-C", str(root), "--json"], capture_output=True, text=True)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout + verify.stderr
    versions_after_kill = store.versions(ws)
    resumed = _run(root)
    assert resumed.returncode in (0, 3), resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed"]
    # no image lost, none processed twice, at most one version for this batch
    assert sorted(hashes) == _archived_hashes(root) and not list((root / "inbox").rglob("*.png"))
    assert len(store.versions(ws)) <= 1 and set(versions_after_kill) <= set(store.versions(ws))
    # a promoted night leaves HEAD on its version, whenever it was killed
    assert store.head(ws) == (report["version"] if report["status"] == "promoted" else "base")
    assert report["status"] != "promoted" or store.versions(ws) == [report["version"]]
    verify = subprocess.run([sys.executable, "-m", "vepatch", "verify", "-C", str(root), "--json"], capture_output=True, text=True)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout + verify.stderr
    assert _run(root).returncode == 4


def test_a_night_killed_between_writing_a_version_and_moving_head_moves_it_when_resumed(make_workspace, vit_bundle, tmp_path):
    """The window between renaming patches/vN into place and writing HEAD: vN exists, HEAD is
    still its parent; the resumed night must finish the promotion, not only report it."""
    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=2)
    killed = _run(root, fault="before-head")
    assert killed.returncode == -9, killed.stderr  # killed inside write_version: the guard accepted
    ws = Workspace(root)
    assert store.versions(ws) == ["v1"] and store.head(ws) == "base"
    resumed = _run(root)
    report = json.loads(resumed.stdout)
    assert resumed.returncode == 0 and report["resumed"] and report["status"] == "promoted" and report["version"] == "v1"
    assert store.head(ws) == "v1"
    verify = subprocess.run([sys.executable, "-m", "vepatch", "verify", "-C", str(root), "--json"], capture_output=True, text=True)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout + verify.stderr


def test_a_second_cycle_exits_5_while_one_holds_the_lock(make_workspace, vit_bundle, tmp_path):
    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=3)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from vepatch.workspace import Workspace\n"
        "with Workspace(Path(sys.argv[1])).lock():\n    print('held', flush=True); time.sleep(30)"), str(root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _run(root)
        assert second.returncode == 5 and "lock" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    assert _run(root).returncode in (0, 3)  # the kernel released the killed holder's lock


def test_measuring_head_between_rounds_goes_through_the_prediction_cache(make_workspace, vit_bundle, tmp_path):
    """HEAD's predictions on the guard suites are kept, so the next night's guard (whose
    baseline is that HEAD) does not compute them again."""
    from vepatch.context import open_context
    from vepatch.stream import measure_head

    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    ctx = open_context(root)
    kept = Workspace(root).prediction_cache
    first = measure_head(ctx, "start", "-", "", {})
    entries = sorted(kept.glob("*.npy"))
    assert first.guard_accuracy and entries
    again = measure_head(ctx, "start", "-", "", {})
    assert again == first and sorted(kept.glob("*.npy")) == entries


def test_a_promoted_version_s_predictions_are_kept_as_the_guard_made_them(make_workspace, vit_bundle, tmp_path):
    from typer.testing import CliRunner

    from vepatch.cli import app
    from vepatch.context import open_context, open_guard_suite
    from vepatch.evaluate import predict
    from vepatch.models.heads import text_head
    from vepatch.stream import measure_head

    root = _cycle_ws(make_workspace, vit_bundle, tmp_path)
    assert CliRunner().invoke(app, ["apply", "-C", str(root), "--diagnosis", "none"]).exit_code == 0
    assert CliRunner().invoke(app, ["guard", "-C", str(root)]).exit_code == 0  # permissive: promoted v1
    kept = Workspace(root).prediction_cache
    entries = sorted(kept.glob("*.npy"))
    ctx = open_context(root)
    measured = measure_head(ctx, "after", "promoted", "", {})
    assert measured.version == "v1" and sorted(kept.glob("*.npy")) == entries  # nothing computed again
    loaded, _ = ctx.model("v1")  # and what was kept is what v1 predicts
    suite = next(s for s in ctx.recipe.guard.suites if s.name == "colours")
    images = open_guard_suite(ctx, suite)
    fresh = predict(loaded, text_head(loaded, images.classnames, suite.templates), images, ctx.recipe.batch_size, ctx.device)
    assert measured.guard_accuracy["colours"] == fresh.accuracy


def test_five_round_stream_keeps_every_accepted_fix(make_workspace, vit_bundle, tmp_path):
    """LoRSU's protocol on the tiny model: one class group per round; each accepted round's
    holdout joins the guards, so at the end every fix is still there (within 1 pp)."""
    from typer.testing import CliRunner

    from vepatch.cli import app
    from vepatch.records import GuardReport, read_record

    stream = tmp_path / "stream"
    groups = [["red square"], ["green circle"], ["blue stripes"], ["red square"], ["green circle"]]
    for r, group in enumerate(groups, 1):
        for part, n, seed in (("pool", 10, 100 + r), ("errors", 3, 200 + r)):
            folder = tiny.make_folder(tmp_path / "tmp" / f"{r}{part}", n, seed=seed)
            for name in group:
                (stream / f"r{r}" / part).mkdir(parents=True, exist_ok=True)
                (folder / name.replace(" ", "_")).rename(stream / f"r{r}" / part / name.replace(" ", "_"))
    guard_set = tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    root = make_workspace(
        vit_bundle, apply=ApplySpec(shots=4, epochs=3, batch_size=4, rank=2, lora_alpha=2.0, augment_scale=1.0),
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, alpha=1.0),  # every drop counts
    )
    result = CliRunner().invoke(app, ["cycle", "--stream", str(stream), "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout)["rounds"]
    assert [r["round"] for r in rounds] == ["start", "r1", "r2", "r3", "r4", "r5"]
    final = rounds[-1]
    ws = Workspace(root)
    assert len(store.versions(ws)) >= 2  # several fixes were accepted along the way
    for v in store.chain(ws, final["version"]):
        report = read_record(GuardReport, store.version_dir(ws, v) / "guard.json")
        at_acceptance = next(s.after for t in report.trials if t.strength == report.strength for s in t.suites if s.role == "target")
        now = next(acc for k, acc in final["target_accuracy"].items() if k.startswith(f"{v}:"))
        assert now >= at_acceptance - 0.01, (v, now, at_acceptance)
    chain_files = [store.version_dir(ws, v) / "patch.safetensors" for v in store.chain(ws, final["version"])]
    assert final["chain_bytes"] == sum(f.stat().st_size for f in chain_files)
