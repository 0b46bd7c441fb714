"""The nightly cycle as a learner: it trains on what operators drop, keeps every earlier fix,
and a bad drop never blocks it."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import tiny
from vepatch import store
from vepatch.recipe import ApplySpec, CycleSpec, DataSpec, GuardSpec, GuardSuite
from vepatch.workspace import Workspace

FAST = ApplySpec(shots=4, epochs=2, batch_size=6, rank=2, lora_alpha=2.0, augment_scale=1.0)


SETTLED = CycleSpec(settle_s=0)  # tests drop complete files: none waits for the next night


def _ws(make_workspace, bundle, tmp_path, guard_path=None, apply=FAST, cycle=SETTLED, **guard) -> Path:
    """A workspace with no shot_pool at all: the inbox is its only source of labelled images."""
    guard_set = guard_path or tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    spec = dict(min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0])
    spec.update(guard)
    return make_workspace(bundle, apply=apply, cycle=cycle, guard=GuardSpec(
        allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)], **spec))


def _drop(root: Path, seed: int, per_class: int = 4, classes=tiny.CLASSES) -> None:
    staging = tiny.make_folder(root / ".drop" / str(seed), per_class, seed=seed, classes=classes)
    for f in sorted(staging.glob("*/*.png")):
        target = root / "inbox" / f.parent.name / f"s{seed}-{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        f.rename(target)


def _cycle(root: Path, *args, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "VEPATCH_FAULT_AT": fault} if fault else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "vepatch", "cycle", "-C", str(root), "--json", *args],
                          capture_output=True, text=True, env=env)


def _manifest(root: Path, candidate_id: str):
    return store.read_candidate(Workspace(root), candidate_id)[0]


def test_a_cycle_trains_on_the_drops_and_never_on_a_holdout(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    ws = Workspace(root)
    holdouts, trained = set(), []
    for night in (1, 2):
        _drop(root, seed=night)
        done = _cycle(root)
        assert done.returncode in (0, 3), done.stderr
        report = json.loads(done.stdout)
        assert report["new_images"] == 12 and report["holdout_images"] == 3  # 30% of 4 per class, floored
        m = _manifest(root, report["candidate_id"])
        tonight = ws.cycle_train(report["cycle_id"])
        files, held = [str(root / f) for f in m.train_files], [str(root / s) for s in m.holdout.sources]
        assert not [f for f in m.train_files + m.holdout.sources if Path(f).is_absolute()]  # stored relative: movable
        assert sorted(f for f in files if f.startswith(str(tonight))) == sorted(str(p) for p in tonight.rglob("*.png"))
        assert len(held) == 3 and all(s.startswith(str(ws.cycle_holdout(report["cycle_id"]))) for s in held)
        holdouts |= set(held)
        trained.append(set(files))
    assert not holdouts & (trained[0] | trained[1])  # no holdout image, of this night or an earlier one, is trained on
    # replay: the second night tops tonight's 3 images per class up to 4 shots with the first night's
    assert len(trained[1]) == 12 and len(trained[0] & trained[1]) == 3


def test_class_incremental_rounds_are_each_promoted_and_keep_earlier_fixes(make_workspace, fitted_bundle, tmp_path):
    """Each night brings a kind of object the model has never seen (beside a known one); each
    night's fix is promoted and no later night undoes it: every image lost on an earlier
    holdout counts (alpha above 1)."""
    root = _ws(make_workspace, fitted_bundle, tmp_path, apply=dataclasses.replace(FAST, shots=8, epochs=10),
               min_target_gain_pp=10.0, alpha=1.0)
    recipe = root / "vepatch.yaml"
    recipe.write_text(recipe.read_text().replace("- blue stripes\n", "- blue stripes\n- yellow cross\n- purple dots\n"))
    ws = Workspace(root)
    for night, names in enumerate([["red square", "yellow cross"], ["green circle", "purple dots"]], 1):
        _drop(root, seed=10 + night, per_class=10, classes=names)
        done = _cycle(root)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "promoted", done.stdout + done.stderr
    assert store.versions(ws) == ["v1", "v2"]
    verdict = store.read_verdict(ws, "v2")
    chosen = next(t for t in verdict.trials if t.strength == verdict.strength)
    earlier = next(s for s in chosen.suites if s.name == "history")  # every earlier version's holdout, pooled
    assert earlier.n == 6 and earlier.change_pp >= 0


def test_an_inbox_folder_mapped_through_shot_pool_folders_is_trained_on(make_workspace, vit_bundle, tmp_path):
    """inbox/local/ holds red squares (shot_pool.folders maps 'local' to the class): staged,
    held out and trained on like any class folder, never archived unused."""
    pool = tiny.make_folder(tmp_path / "pool", 2, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    root = make_workspace(vit_bundle, apply=FAST, cycle=SETTLED, shot_pool=DataSpec(path=str(pool), folders={"local": "red square"}),
                          guard=GuardSpec(suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                                          min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]))
    _drop(root, seed=1)
    (root / "inbox" / "red_square").rename(root / "inbox" / "local")
    done = _cycle(root)
    assert done.returncode in (0, 3), done.stderr
    report = json.loads(done.stdout)
    assert report["new_images"] == 12 and report["holdout_images"] == 3 and not report["quarantined"]
    m = _manifest(root, report["candidate_id"])
    tonight = Workspace(root).cycle_train(report["cycle_id"])
    staged = sorted(str(p) for p in tonight.rglob("*.png"))
    assert len(staged) == 9 and sorted(str(root / f) for f in m.train_files if str(root / f) in staged) == staged
    assert len(m.holdout.sources) == 3 and sorted(m.holdout.labels) == [0, 1, 2]
    assert sum(1 for f in m.train_files if f.startswith(str(tonight.relative_to(root)) + "/red_square/")) == 3


def test_a_mapped_folder_staged_under_its_own_name_by_an_earlier_version_is_still_read(tmp_path):
    from vepatch.inbox import staged_samples

    tiny.make_folder(tmp_path / "train", 2, classes=["local", "green circle"])
    samples = staged_samples(tmp_path / "train", list(tiny.CLASSES), {"local": "red square"})
    assert sorted(s.label for s in samples) == [0, 0, 1, 1]


def test_bad_drops_are_quarantined_and_the_night_goes_on(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=3)
    (root / "inbox" / "zebra").mkdir()
    tiny.draw(0, __import__("numpy").random.default_rng(0)).save(root / "inbox" / "zebra" / "z.png")
    (root / "inbox" / "red_square" / "empty.png").write_bytes(b"")
    (root / "inbox" / "loose.png").write_bytes((root / "inbox" / "red_square" / "s3-000.png").read_bytes() + b"x")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    (root / "inbox" / "green_circle" / "link.png").symlink_to(outside)
    done = _cycle(root)
    assert done.returncode in (0, 3), done.stderr
    report = json.loads(done.stdout)
    assert report["new_images"] == 12
    reasons = {Path(q["source"]).name: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {"zebra", "empty.png", "loose.png", "link.png"}
    assert "unknown class 'zebra'" in reasons["zebra"] and "empty file" in reasons["empty.png"]
    assert "outside" in reasons["link.png"] and "class folder" in reasons["loose.png"]
    day = next((root / "quarantine").iterdir())
    assert (day / "zebra" / "z.png").is_file() and (day / "red_square" / "empty.png").is_file()
    assert outside.read_bytes() == b"not yours" and (day / "green_circle" / "link.png").is_symlink()
    assert len([json.loads(x) for x in (day / "reasons.jsonl").read_text().splitlines()]) == 4
    assert not [p for p in (root / "inbox").rglob("*") if p.is_file()]
    # the next night runs normally
    assert _cycle(root).returncode == 4
    _drop(root, seed=4)
    assert _cycle(root).returncode in (0, 3)


def test_a_drop_with_only_bad_files_exits_4(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    (root / "inbox" / "red_square").mkdir(parents=True)
    (root / "inbox" / "red_square" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    done = _cycle(root)
    assert done.returncode == 4 and "quarantine" in json.loads(done.stdout)["reason"]
    assert next((root / "quarantine").iterdir()).joinpath("red_square", "broken.jpg").is_file()


def _age(root: Path, seconds: float, now: float) -> None:
    """Every file in the inbox as if last written `seconds` before `now`."""
    for f in (root / "inbox").rglob("*.png"):
        os.utime(f, (now - seconds, now - seconds))


def test_a_drop_still_being_copied_waits_for_the_next_night_never_quarantined(make_workspace, vit_bundle, tmp_path):
    """cron may start while an operator's cp is half-way: a file written less than
    cycle.settle_s ago stays in the inbox; once it has stood still that long it is judged."""
    from vepatch.context import open_context
    from vepatch.inbox import scan_inbox

    root = _ws(make_workspace, vit_bundle, tmp_path, cycle=CycleSpec(settle_s=120))
    _drop(root, seed=1, per_class=2)
    now = 2_000_000_000.0  # the scan's clock, injected: no sleeping, no race
    _age(root, 600, now)
    whole = (root / "inbox" / "red_square" / "s1-000.png").read_bytes()
    partial = root / "inbox" / "red_square" / "half.png"
    partial.write_bytes(whole[: len(whole) // 2])  # the copy is half-way
    os.utime(partial, (now - 30, now - 30))
    ctx = open_context(root)
    scan = scan_inbox(ctx, now=now)
    assert len(scan.new) == 6 and scan.settling == [partial] and not scan.bad
    scan = scan_inbox(ctx, now=now + 91)  # untouched for two minutes: a truncated file is a bad drop
    assert [p for p, _ in scan.bad] == [partial] and not scan.settling


def test_a_file_that_grows_while_it_is_read_waits_for_the_next_night(make_workspace, vit_bundle, tmp_path, monkeypatch):
    import vepatch.inbox
    from vepatch.context import open_context

    root = _ws(make_workspace, vit_bundle, tmp_path)  # settle_s 0: only the growth itself tells
    _drop(root, seed=1, per_class=2)
    growing = root / "inbox" / "green_circle" / "s1-001.png"
    real = vepatch.inbox.read_image

    def copier_still_writing(path):
        if path == growing:
            with open(growing, "ab") as f:
                f.write(b"more bytes")
        return real(path)

    monkeypatch.setattr(vepatch.inbox, "read_image", copier_still_writing)
    scan = vepatch.inbox.scan_inbox(open_context(root))
    assert scan.settling == [growing] and len(scan.new) == 5 and not scan.bad


def test_a_night_leaves_a_fresh_drop_in_the_inbox_and_says_so(make_workspace, vit_bundle, tmp_path):
    import time

    root = _ws(make_workspace, vit_bundle, tmp_path, cycle=CycleSpec(settle_s=86_400))  # a day: the test's clock cannot matter
    _drop(root, seed=1)
    _age(root, 2 * 86_400, time.time())
    fresh = root / "inbox" / "blue_stripes" / "fresh.png"
    fresh.write_bytes((root / "inbox" / "blue_stripes" / "s1-000.png").read_bytes()[:100])  # being copied right now
    done = _cycle(root)
    assert done.returncode in (0, 3), done.stderr
    report = json.loads(done.stdout)
    assert report["new_images"] == 12 and report["waiting"] == 1 and not report["quarantined"]
    assert [p for p in (root / "inbox").rglob("*.png")] == [fresh] and not (root / "quarantine").exists()


def test_a_file_replaced_during_the_night_is_neither_archived_unseen_nor_lost(make_workspace, vit_bundle, tmp_path,
                                                                              monkeypatch):
    """An operator drops a new image under the name of one the night is training on: the
    night archives what it trained on and leaves the new one in the inbox for the next."""
    import io

    import numpy as np
    from typer.testing import CliRunner

    import vepatch.cycle
    from vepatch.cli import app
    from vepatch.inbox import file_sha256, seen_hashes

    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=1)
    victim = root / "inbox" / "red_square" / "s1-000.png"
    old = file_sha256(victim)
    buf = io.BytesIO()
    tiny.draw(0, np.random.default_rng(99)).save(buf, format="PNG")
    real = vepatch.cycle._advance

    def operator_replaces_a_drop(ctx, state):
        done = real(ctx, state)
        victim.write_bytes(buf.getvalue())  # same name, new content, while the night runs
        return done

    monkeypatch.setattr(vepatch.cycle, "_advance", operator_replaces_a_drop)
    result = CliRunner().invoke(app, ["cycle", "-C", str(root), "--json"])
    assert result.exit_code in (0, 3), result.output
    monkeypatch.undo()
    new = file_sha256(victim)  # still in the inbox, unseen
    archived = {file_sha256(p) for p in (root / "archive").rglob("*.png")}
    seen = seen_hashes(Workspace(root))
    assert new != old and old in archived and old in seen and new not in archived and new not in seen
    assert len(archived) == 12
    nxt = _cycle(root)  # the next night takes it (one image: it joins the pool)
    assert nxt.returncode == 4 and json.loads(nxt.stdout)["new_images"] == 1, nxt.stderr
    assert not list((root / "inbox").rglob("*.png"))
    assert new in {file_sha256(p) for p in (root / "archive").rglob("*.png")}


def test_a_cycle_failing_the_same_way_twice_is_set_aside(make_workspace, vit_bundle, tmp_path):
    guard_path = tmp_path / "guard-not-yet"
    root = _ws(make_workspace, vit_bundle, tmp_path, guard_path=guard_path)
    _drop(root, seed=5)
    first, second = _cycle(root), _cycle(root)
    assert first.returncode == 1 and second.returncode == 1, first.stderr + second.stderr
    assert "guard-not-yet is not there" in json.loads(first.stdout)["reason"]
    assert "set aside" in json.loads(second.stdout)["reason"] and "quarantine/" in second.stderr
    quarantined = [p for p in (root / "quarantine").rglob("*.png")]
    assert len(quarantined) == 12 and not [p for p in (root / "inbox").rglob("*.png")]
    reasons = next((root / "quarantine").iterdir()).joinpath("reasons.jsonl").read_text()
    assert "failing 2 times the same way" in reasons
    tiny.make_folder(guard_path, 4, seed=9)  # the operator fixes the recipe's guard suite
    _drop(root, seed=6)
    third = _cycle(root)
    assert third.returncode in (0, 3), third.stderr
    report = json.loads(third.stdout)
    assert not report["resumed"] and report["new_images"] == 12


def test_abandon_sets_the_unfinished_cycle_aside(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=7)
    assert _cycle(root, fault="after-stage").returncode == -9
    abandoned = _cycle(root, "--abandon")
    assert abandoned.returncode == 0 and json.loads(abandoned.stdout)["status"] == "abandoned", abandoned.stderr
    assert len(list((root / "quarantine").rglob("*.png"))) == 12
    assert _cycle(root).returncode == 4
    assert _cycle(root, "--abandon").returncode == 4  # nothing left to abandon


def test_torn_last_lines_are_tolerated_and_repaired(make_workspace, vit_bundle, tmp_path):
    from vepatch.fsio import append_line, read_lines

    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')  # a crash mid-write
    assert read_lines(path) == [{"a": 1}]
    append_line(path, {"a": 3})
    assert read_lines(path) == [{"a": 1}, {"a": 3}] and path.read_text() == '{"a": 1}\n{"a": 3}\n'

    root = _ws(make_workspace, vit_bundle, tmp_path)
    store_dir = root / ".vepatch"
    (store_dir / "seen.jsonl").write_text('{"sha256": "ab')
    with open(store_dir / "log.jsonl", "a") as f:
        f.write('{"event": "tor')
    _drop(root, seed=8)
    assert _cycle(root).returncode in (0, 3)
    for name in ("seen.jsonl", "log.jsonl"):
        lines = (store_dir / name).read_text().splitlines()
        assert lines and all(json.loads(x) for x in lines)


def test_a_crash_after_the_version_is_written_does_not_judge_it_again(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=9)
    killed = _cycle(root, fault="after-version")
    assert killed.returncode == -9
    ws = Workspace(root)
    assert store.versions(ws) == ["v1"]
    resumed = _cycle(root)
    report = json.loads(resumed.stdout)
    assert resumed.returncode == 0 and report["resumed"] and report["version"] == "v1", resumed.stderr
    assert store.versions(ws) == ["v1"] and store.head(ws) == "v1"
    guards = [json.loads(x) for x in (root / ".vepatch" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for g in guards if g["event"] == "guard") == 1


def test_the_night_says_what_it_fixed_per_class(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=12, per_class=6)
    report = json.loads(_cycle(root).stdout)
    outcomes = report["outcomes"]
    assert [o["name"] for o in outcomes] == list(tiny.CLASSES)
    assert sum(o["n"] for o in outcomes) == report["holdout_images"] == 3 * 1
    for o in outcomes:
        assert o["fixed"] + o["still_wrong"] + o["newly_wrong"] + o["kept_right"] == o["n"]
    if report["status"] == "promoted":
        log = subprocess.run([sys.executable, "-m", "vepatch", "log", "-C", str(root), "--json"], capture_output=True, text=True)
        (v1,) = json.loads(log.stdout)["versions"]
        assert v1["target_outcomes"] == outcomes and "/" not in json.dumps(v1)  # no image paths in the log


def test_retain_decides_which_earlier_images_a_night_trains_on(make_workspace, vit_bundle, tmp_path):
    from vepatch.context import open_context
    from vepatch.cycle import plan_cycle, unfinished
    from vepatch.recipe import with_overrides

    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=21, classes=["red square"])
    assert _cycle(root).returncode in (0, 3)
    _drop(root, seed=22, classes=["green circle"])
    assert _cycle(root, fault="after-stage").returncode == -9
    ctx = open_context(root)
    state = unfinished(ctx)
    for retain, expected in (("replay", {"red_square", "green_circle"}), ("none", {"green_circle"}),
                             ("batch-classes", {"green_circle"}), ("distill", {"green_circle"}),
                             ("replay+distill", {"red_square", "green_circle"})):
        plan = plan_cycle(dataclasses.replace(ctx, recipe=with_overrides(ctx.recipe, {"apply.retain": retain})), state)
        assert {Path(s.source).parent.name for s in plan.shots.samples} == expected, retain
        assert {Path(s.source).parent.name for s in plan.reference.samples} == {"red_square"}  # distill's reference set


def test_batch_classes_loss_ignores_the_classes_absent_from_the_batch():
    import torch

    from vepatch.losses import batch_classes_ce_loss, ce_loss

    torch.manual_seed(0)
    features, head = torch.randn(3, 8), torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    labels, scale = torch.tensor([0, 0, 2]), torch.tensor(10.0)
    loss = batch_classes_ce_loss(features, head, scale, labels)
    assert torch.allclose(loss, ce_loss(features, head[[0, 2]], scale, torch.tensor([0, 0, 1])))
    moved = head.clone()
    moved[1] = -moved[1]  # class 1 is not in the batch: it cannot matter
    assert torch.equal(loss, batch_classes_ce_loss(features, moved, scale, labels))
    assert not torch.equal(ce_loss(features, head, scale, labels), ce_loss(features, moved, scale, labels))


def test_apply_from_a_labelled_folder_trains_on_it_and_holds_the_rest_out(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)  # no shot_pool
    errors = tiny.make_folder(tmp_path / "errors", 6, seed=30)
    run = subprocess.run([sys.executable, "-m", "vepatch", "apply", "-C", str(root), "--from", str(errors), "--shots", "4",
                          "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout)
    files = {str(p) for p in errors.rglob("*.png")}
    assert len(m["train_files"]) == 12 and len(m["holdout"]["sources"]) == 6
    assert set(m["train_files"]) | set(m["holdout"]["sources"]) == files
    assert not set(m["train_files"]) & set(m["holdout"]["sources"])
    no_pool = subprocess.run([sys.executable, "-m", "vepatch", "apply", "-C", str(root)], capture_output=True, text=True)
    assert no_pool.returncode == 2 and "--from DIR" in no_pool.stderr


def test_too_few_new_images_wait_in_the_pool_for_the_next_night(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _drop(root, seed=40, per_class=1)  # one image a class: none can be held out
    first = _cycle(root)
    assert first.returncode == 4 and json.loads(first.stdout)["status"] == "pooled", first.stderr
    pooled = {str(p) for p in (root / ".vepatch" / "cycles").rglob("train/*/*.png")}
    assert len(pooled) == 3 and not [p for p in (root / "inbox").rglob("*.png")]
    _drop(root, seed=41)
    second = json.loads(_cycle(root).stdout)
    assert pooled <= {str(root / f) for f in _manifest(root, second["candidate_id"]).train_files}


def test_a_holdout_image_is_not_trained_on_through_the_shot_pool_either(make_workspace, vit_bundle, tmp_path):
    import shutil

    from vepatch.inbox import file_sha256
    from vepatch.recipe import DataSpec

    pool = tiny.make_folder(tmp_path / "pool", 4, seed=50)
    guard_set = tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    root = make_workspace(vit_bundle, cycle=SETTLED, shot_pool=DataSpec(path=str(pool), name="pool"),  # 8 shots: the whole pool is wanted
                          apply=dataclasses.replace(FAST, shots=8), guard=GuardSpec(
        allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]))
    shutil.copytree(pool, root / "inbox")  # operators drop images the shot pool also holds
    report = json.loads(_cycle(root).stdout)
    m = _manifest(root, report["candidate_id"])
    held = {file_sha256(root / s) for s in m.holdout.sources}
    assert len(held) == 3 and not held & {file_sha256(root / s) for s in m.train_files}


def test_an_accepted_versions_holdout_is_never_trained_on_by_a_cycle(make_workspace, vit_bundle, tmp_path):
    import shutil

    from vepatch.inbox import file_sha256
    from vepatch.recipe import DataSpec

    pool = tiny.make_folder(tmp_path / "pool", 6, seed=60)
    guard_set = tiny.make_folder(tmp_path / "guardset", 4, seed=9)
    root = make_workspace(vit_bundle, cycle=SETTLED, shot_pool=DataSpec(path=str(pool), name="pool"),
                          apply=dataclasses.replace(FAST, shots=3), guard=GuardSpec(
        allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]))
    for args in (["apply", "--diagnosis", "none"], ["guard"]):
        assert subprocess.run([sys.executable, "-m", "vepatch", *args, "-C", str(root)], capture_output=True).returncode == 0
    v1_holdout = {file_sha256(Path(s)) for s in store.read_manifest(Workspace(root), "v1").holdout.sources}
    shutil.copytree(pool, root / "inbox")  # the same images come back as drops, v1's holdout among them
    report = json.loads(_cycle(root).stdout)
    trained = {file_sha256(root / s) for s in _manifest(root, report["candidate_id"]).train_files}
    assert len(v1_holdout) == 9 and not v1_holdout & trained


def test_the_cycle_report_keeps_bracketed_notes(make_workspace, vit_bundle, tmp_path):
    """Rich would read '[...]' as markup and drop it: the guard's notes are in brackets."""
    from typer.testing import CliRunner

    from vepatch.cli import app

    root = _ws(make_workspace, vit_bundle, tmp_path)
    text = (root / "vepatch.yaml").read_text()
    (root / "vepatch.yaml").write_text(text.replace("  suites:\n", "  suites:\n  - path: nowhere\n    name: gone\n    optional: true\n"))
    _drop(root, seed=70)
    result = CliRunner().invoke(app, ["cycle", "-C", str(root)], env={"COLUMNS": "200"})
    assert result.exit_code in (0, 3) and "[gone: not there, skipped (optional);" in result.output, result.output


def test_a_big_drop_trains_each_image_fewer_times_not_for_longer():
    """A night with more drops than apply.shots per class keeps the image passes of
    apply.epochs x apply.shots per class (README 'One night's wall time')."""
    from vepatch.cycle import night_epochs
    from vepatch.data import ImageSet, Sample

    def drops(per_class: int, classes: int = 3) -> ImageSet:
        return ImageSet("shots", "", [str(k) for k in range(classes)],
                        [Sample(f"{k}/{i}.png", k) for k in range(classes) for i in range(per_class)])

    spec = ApplySpec(shots=16, epochs=30)
    assert night_epochs(spec, drops(16)) == 30  # shots per class: the recipe's epochs
    assert night_epochs(spec, drops(5)) == 30  # fewer: never more than the recipe's epochs
    assert night_epochs(spec, drops(24)) == 20  # 72 drops over 3 classes: 1,440 passes, 20 epochs
    assert night_epochs(spec, drops(24)) * 24 * 3 == 30 * 16 * 3
    assert night_epochs(ApplySpec(shots=1, epochs=1), drops(50)) == 1  # at least one pass


def test_replay_balances_earlier_classes_with_tonight_s(make_workspace, vit_bundle, tmp_path):
    """A night bringing more than apply.shots of a class replays each earlier class with as many
    images, so the new class does not outweigh the ones it could erase."""
    from collections import Counter

    from vepatch.context import open_context
    from vepatch.cycle import plan_cycle, unfinished

    root = _ws(make_workspace, vit_bundle, tmp_path)  # apply.shots 4
    _drop(root, seed=31, per_class=10, classes=["red square"])
    assert _cycle(root).returncode in (0, 3)
    _drop(root, seed=32, per_class=10, classes=["green circle"])
    assert _cycle(root, fault="after-stage").returncode == -9
    ctx = open_context(root)
    counts = Counter(Path(s.source).parent.name for s in plan_cycle(ctx, unfinished(ctx)).shots.samples)
    assert counts == {"green_circle": 7, "red_square": 7}  # 10 dropped, 3 held out; not 7 and 4


def test_a_nights_target_is_judged_on_every_held_out_drop_since_the_last_promotion(make_workspace, vit_bundle, tmp_path):
    """3 held-out images a night cannot show a gain; the held-out drops of refused nights join
    the next night's target holdout (never trained on), until a version holds them."""
    root = _ws(make_workspace, vit_bundle, tmp_path, min_target_gain_pp=100.0)  # no gain can pass: refused
    ws = Workspace(root)
    _drop(root, seed=1)
    first = json.loads(_cycle(root).stdout)
    assert first["status"] == "refused"
    night1 = {str(p) for p in ws.cycle_holdout(first["cycle_id"]).rglob("*.png")}
    assert len(night1) == 3
    recipe = root / "vepatch.yaml"
    recipe.write_text(recipe.read_text().replace("min_target_gain_pp: 100.0", "min_target_gain_pp: -100.0"))
    _drop(root, seed=2)
    second = json.loads(_cycle(root).stdout)
    assert second["status"] == "promoted", second
    held = {str(root / s) for s in _manifest(root, second["candidate_id"]).holdout.sources}
    assert len(held) == 6 and night1 < held  # tonight's 3 and night 1's 3
    _drop(root, seed=3)
    third = json.loads(_cycle(root).stdout)
    held = {str(root / s) for s in _manifest(root, third["candidate_id"]).holdout.sources}
    assert len(held) == 3 and not night1 & held  # v1 holds night 1's now: they guard, they are no target
