"""Guard suites a recipe can name without data of its own, and what a missing suite says."""

import json

import pytest
from typer.testing import CliRunner

import tiny
from vepatch import store
from vepatch.cli import app
from vepatch.context import open_context, open_guard_suite
from vepatch.errors import DataError
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite
from vepatch.workspace import Workspace

runner = CliRunner()


def test_builtin_digits_is_written_once_into_the_workspace(make_workspace, vit_bundle):
    root = make_workspace(vit_bundle, guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path="builtin:digits", name="digits")]))
    ctx = open_context(root)
    images = open_guard_suite(ctx, ctx.recipe.guard.suites[0])
    assert len(images) == 1000 and images.classnames == [str(i) for i in range(10)]
    folder = root / ".vepatch" / "suites" / "digits"
    stamp = sorted(p.stat().st_mtime_ns for p in folder.rglob("*.png"))
    assert len(open_guard_suite(ctx, ctx.recipe.guard.suites[0])) == 1000
    assert sorted(p.stat().st_mtime_ns for p in folder.rglob("*.png")) == stamp  # not written again
    with pytest.raises(DataError, match="no such built-in suite"):
        ctx.resolve("builtin:nope")


def test_a_missing_suite_says_how_to_get_it(make_workspace, vit_bundle, tmp_path):
    root = make_workspace(vit_bundle, guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path="guards/digits", name="digits")]))
    ctx = open_context(root)
    with pytest.raises(DataError) as info:
        open_guard_suite(ctx, ctx.recipe.guard.suites[0])
    assert "guard suite 'digits'" in info.value.message and "builtin:digits" in info.value.hint
    assert "optional: true" in info.value.hint


def test_guard_warns_about_a_suite_the_baseline_is_at_chance_on(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 6, seed=5)
    root = make_workspace(
        vit_bundle, shot_pool=DataSpec(path=str(pool), name="pool"),
        apply=ApplySpec(shots=3, epochs=1, batch_size=6, rank=2, lora_alpha=2.0, augment_scale=1.0),
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path="builtin:digits", name="digits", max_drop_pp=100.0)],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]))
    assert runner.invoke(app, ["apply", "-C", str(root), "--diagnosis", "none"]).exit_code == 0
    result = runner.invoke(app, ["guard", "-C", str(root), "--json"])
    report = json.loads(result.stdout)
    digits = report["trials"][0]["suites"][1]
    assert digits["name"] == "digits" and digits["before"] <= 0.15  # the random tiny model knows no digits
    assert "digits: the baseline is at chance there" in report["reason"]


def test_a_guard_whose_only_suite_is_at_chance_refuses_and_says_how_to_fix_it(make_workspace, vit_bundle, tmp_path):
    """The defect: every suite absent or at chance, and the candidate was promoted with nothing guarded."""
    pool = tiny.make_folder(tmp_path / "pool", 6, seed=5)
    root = make_workspace(
        vit_bundle, shot_pool=DataSpec(path=str(pool), name="pool"),
        apply=ApplySpec(shots=3, epochs=1, batch_size=6, rank=2, lora_alpha=2.0, augment_scale=1.0),
        guard=GuardSpec(suites=[GuardSuite(path="builtin:digits", name="digits", max_drop_pp=100.0),
                                GuardSuite(path="guards/absent", name="absent", optional=True)],
                        min_target_gain_pp=-100.0, strengths=[1.0, 0.5]))
    assert runner.invoke(app, ["apply", "-C", str(root), "--diagnosis", "none"]).exit_code == 0
    result = runner.invoke(app, ["guard", "-C", str(root)], env={"COLUMNS": "100"})
    assert result.exit_code == 3, result.output
    assert "nothing guarded" in result.output and "guard.allow_unguarded: true" in result.output
    assert store.versions(Workspace(root)) == [] and store.head(Workspace(root)) == "base"
    assert "λ 0.5" not in result.output  # no smaller strength can be guarded either: the search stops


def test_builtin_photos_needs_no_data_of_its_own_and_is_the_same_on_every_machine(make_workspace, vit_bundle, tmp_path):
    """Four photos every install has (scikit-learn's and matplotlib's), 20 seeded crops each:
    a guard suite of photos on a machine without ../shared (recipes/textile-vit.yaml uses it)."""
    import hashlib

    from vepatch import suites

    root = make_workspace(vit_bundle, guard=GuardSpec(suites=[GuardSuite(path="builtin:photos", name="photos")]))
    ctx = open_context(root)
    images = open_guard_suite(ctx, ctx.recipe.guard.suites[0])
    assert len(images) == 80 and sorted(images.classnames) == ["flower", "gift box", "military uniform", "pagoda"]
    crops = sorted((root / ".vepatch" / "suites" / "photos").rglob("*.png"))
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in crops}) == 80  # 80 different crops
    again = tmp_path / "again"
    suites.materialize("photos", again)  # another machine, the same seed: the same images
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(again.rglob("*.png"))] == \
        [hashlib.sha256(p.read_bytes()).hexdigest() for p in crops]
