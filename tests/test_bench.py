import json

import pytest

from typer.testing import CliRunner

import tiny
from vepatch.bench import BenchRun, summarize
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite


def _run(method, seed, after, worst):
    return BenchRun(method, seed, "c", 10, 100, 1.0, 1.0, 0.2, after, {"g": worst}, {"g": 1.0}, 0.5, 0.3, {"g": 0.0})


def test_pareto_front_is_the_undominated_methods():
    rows = summarize([_run("a", 0, 0.8, -0.1), _run("b", 0, 0.7, -2.0), _run("c", 0, 0.6, 0.0), _run("d", 0, 0.9, -3.0)])
    front = {r.method for r in rows if r.pareto}
    assert front == {"a", "c", "d"}  # b is worse than a on both axes
    a = next(r for r in rows if r.method == "a")
    assert abs(a.target_gain_pp_mean - 60.0) < 1e-9 and a.worst_guard_pp_mean == -0.1
    assert a.guard_strengths == [0.5] and abs(a.target_gain_at_guard_pp_mean - 10.0) < 1e-9


def test_bench_writes_json_markdown_and_plot(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 8, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 3, seed=9)
    root = make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool)),
                          apply=ApplySpec(shots=3, epochs=1, augment_scale=1.0),
                          # a permissive guard that searches strengths without 1.0: the bench must
                          # still score strength 1, and name the strength the guard promotes
                          guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                                          min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[0.25, 0.5]))
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--methods", "lorsu,ln", "--seeds", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(r["method"], r["seed"]) for r in out["runs"]] == [("lorsu", 0), ("ln", 0), ("lorsu", 1), ("ln", 1)]
    assert {r["method"] for r in out["summary"]} == {"lorsu", "ln"}
    assert all(r["peak_memory_mb"] > 0 and r["apply_seconds"] > 0 for r in out["runs"])
    folder = root / ".vepatch" / "bench"
    (run_dir,) = list(folder.iterdir())
    assert (run_dir / "bench.md").read_text().startswith("| method")
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run_dir / "bench.html").read_text()
    assert page.count("<tr>") == 3 and "<td class=l>lorsu</td>" in page and 'src="data:image/png;base64,' in page
    # bench candidates are never judged implicitly
    assert CliRunner().invoke(app, ["guard", "-C", str(root)]).exit_code == 4
    # the strength the bench scores "at the guard's lambda" is the one the guard itself chooses
    for run in out["runs"][:2]:
        judged = CliRunner().invoke(app, ["guard", "-C", str(root), run["candidate_id"], "--no-promote", "--json"])
        assert judged.exit_code in (0, 3), judged.output
        verdict = json.loads(judged.stdout)
        assert verdict["accepted"] and verdict["strength"] == run["guard_strength"] in (0.25, 0.5)
        chosen = next(t for t in verdict["trials"] if t["strength"] == verdict["strength"])
        assert abs(next(x["after"] for x in chosen["suites"] if x["role"] == "target") - run["target_at_guard"]) < 1e-9


def test_a_learning_rate_sweep_on_a_tuning_seed_trains_each_method_at_each_rate(make_workspace, vit_bundle, tmp_path):
    from vepatch import store
    from vepatch.workspace import Workspace

    pool = tiny.make_folder(tmp_path / "pool", 8, seed=5)
    root = make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool)), apply=ApplySpec(shots=3, epochs=1, augment_scale=1.0),
                          guard=GuardSpec(min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, allow_unguarded=True))
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--methods", "ln", "--seeds", "1", "--first-seed", "100",
                                      "--lrs", "1e-4,3e-2", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("ln lr=0.0001", 100), ("ln lr=0.03", 100)]
    ws = Workspace(root)
    rates = [store.read_candidate(ws, r["candidate_id"])[0].recipe.apply.learning_rate for r in runs]
    assert rates == [1e-4, 3e-2]
    sizes = [float(store.read_candidate(ws, r["candidate_id"])[1].tensors[k].abs().sum())
             for r in runs for k in [next(k for k in store.read_candidate(ws, r["candidate_id"])[1].tensors)]]
    assert sizes[0] < sizes[1]  # the larger rate moved the norms further
    bad = CliRunner().invoke(app, ["bench", "-C", str(root), "--methods", "ln", "--lrs", "fast"])
    assert bad.exit_code == 2 and "--lrs" in bad.output


def test_a_bench_that_stops_part_way_keeps_the_runs_it_finished(make_workspace, vit_bundle, tmp_path, monkeypatch):
    from vepatch import bench
    from vepatch.errors import VepatchError

    pool = tiny.make_folder(tmp_path / "pool", 8, seed=5)
    root = make_workspace(vit_bundle, shot_pool=DataSpec(path=str(pool)), apply=ApplySpec(shots=3, epochs=1, augment_scale=1.0),
                          guard=GuardSpec(min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, allow_unguarded=True))
    real, calls = bench.apply_in_subprocess, []

    def second_apply_fails(workspace, method, *args):
        calls.append(method)
        if len(calls) == 2:
            raise VepatchError(f"bench: apply --method {method} failed: planted")
        return real(workspace, method, *args)

    monkeypatch.setattr(bench, "apply_in_subprocess", second_apply_fails)
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--methods", "ln,lorsu", "--seeds", "1"])
    assert result.exit_code == 1 and "planted" in result.output
    (run_dir,) = list((root / ".vepatch" / "bench").iterdir())
    kept = json.loads((run_dir / "bench.json").read_text())
    assert [r["method"] for r in kept["runs"]] == ["ln"] and kept["planned"] == 2
    assert [r["method"] for r in kept["summary"]] == ["ln"] and (run_dir / "bench.md").read_text().count("| ln |") == 1


def test_benches_run_apart_join_into_one_table_and_one_pareto_front(make_workspace, vit_bundle, tmp_path):
    from vepatch.bench import write_bench

    root = make_workspace(vit_bundle)
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    # alone, "a" is on its front; beside "b" (higher target, smaller drop) it is dominated
    write_bench(a, [_run("a", 0, 0.6, -2.0), _run("a", 1, 0.6, -2.0)], 2, "cpu")
    write_bench(b, [_run("b", 0, 0.8, -0.5)], 1, "cuda")
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--join", f"{a},{b / 'bench.json'}", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [(r["method"], r["seed"]) for r in out["runs"]] == [("a", 0), ("b", 0), ("a", 1)]  # seed by seed
    assert {r["method"]: r["pareto"] for r in out["summary"]} == {"a": False, "b": True}
    assert out["device"] == "cpu+cuda" and out["planned"] == 3
    assert json.loads((tmp_path.parent / out["folder"] / "bench.json").read_text())["runs"] == out["runs"]
    # refused: the same run twice, another base or split on a seed, a folder no bench wrote
    twice = CliRunner().invoke(app, ["bench", "-C", str(root), "--join", f"{a},{a}"])
    assert twice.exit_code == 2 and "a seed 0 is in both" in twice.output
    moved = _run("c", 1, 0.7, 0.0)
    write_bench(other, [BenchRun(**{**moved.__dict__, "target_before": 0.3})], 1, "cpu")
    split = CliRunner().invoke(app, ["bench", "-C", str(root), "--join", f"{a},{other}"])
    assert split.exit_code == 2 and "seed 1's base holdout accuracy is 20.0%" in split.output and str(other) in split.output
    missing = CliRunner().invoke(app, ["bench", "-C", str(root), "--join", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output and "not a bench's bench.json" in missing.output
    assert CliRunner().invoke(app, ["bench", "-C", str(root), "--join", ","]).exit_code == 2


def test_base_to_new_trains_on_the_base_classes_only_and_measures_both(vit_bundle, tmp_path):
    from pathlib import Path

    from vepatch import store
    from vepatch.basenew import harmonic_mean
    from vepatch.recipe import ModelSpec, Recipe
    from vepatch.workspace import init_workspace

    classes = tiny.CLASSES + tiny.NEW_CLASSES  # CoOp's split: the first 3 are base, the last 2 new
    pool = tiny.make_folder(tmp_path / "pool", 6, seed=5, classes=classes)
    root = tmp_path / "ws"
    init_workspace(root, Recipe(model=ModelSpec(ref=f"local-dir:{vit_bundle}"), classes=list(classes),
                                shot_pool=DataSpec(path=str(pool)),
                                apply=ApplySpec(shots=2, epochs=1, augment_scale=1.0, method_lr={"coop": 0.5})))
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--base-new", "--methods", "lorsu", "--seeds", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["base"] == classes[:3] and out["new"] == classes[3:]
    (run,) = out["runs"]
    assert abs(run["h_after"] - harmonic_mean(run["base_after"], run["new_after"])) < 1e-12
    sub = store.Workspace(Path(out["folder"]) / "workspace")
    manifest, _ = store.read_candidate(sub, run["candidate_id"])
    base_folders = {c.replace(" ", "_") for c in classes[:3]}
    assert manifest.train_files and {Path(f).parent.name for f in manifest.train_files} <= base_folders
    assert manifest.recipe.classes == classes[:3] and manifest.holdout.classnames == classes[:3]
    assert (Path(out["folder"]) / "base-new.md").read_text().startswith("base: red square")

    # a prompt patch is measured with the heads its prompt makes (before: the base model's heads,
    # so coop's base and new accuracies never moved)
    result = CliRunner().invoke(app, ["bench", "-C", str(root), "--base-new", "--methods", "coop", "--seeds", "1", "--json"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert (run["base_after"], run["new_after"]) != (run["base_before"], run["new_before"])

    small = tmp_path / "small"
    init_workspace(small, Recipe(model=ModelSpec(ref=f"local-dir:{vit_bundle}"), classes=list(tiny.CLASSES),
                                 shot_pool=DataSpec(path=str(pool))))
    refused = CliRunner().invoke(app, ["bench", "-C", str(small), "--base-new", "--methods", "lorsu"])
    assert refused.exit_code == 2 and "at least 4 classes" in refused.output


def test_a_stream_summary_reads_seen_accuracy_forgetting_and_guard_change_from_the_rounds(tmp_path):
    """Planted rounds: r1's holdout peaks at 0.9 after r2 and ends at 0.8 (10 pp forgotten from
    its best, not from its first reading); a refused round counts as not promoted."""
    from vepatch.stream import StreamRound, stream_markdown, summarize_stream

    def at(name, status, rounds, imagenette):
        return StreamRound(name, status, "v1", "", rounds, {}, {"imagenette": imagenette}, 0)

    rounds = [at("start", "-", {}, 0.78),
              at("r1", "promoted", {"r1": 0.8}, 0.78),
              at("r2", "promoted", {"r1": 0.9, "r2": 0.6}, 0.77),
              at("r3", "refused", {"r1": 0.8, "r2": 0.6, "r3": 0.0}, 0.75)]
    run = summarize_stream("lorsu", "lorsu", "replay", rounds, 120.0)
    assert run.seen_accuracy == pytest.approx([0.8, 0.75, (0.8 + 0.6 + 0.0) / 3])
    assert run.average_accuracy == pytest.approx((0.8 + 0.75 + 1.4 / 3) / 3)
    assert run.forgetting_pp == pytest.approx({"r1": 10.0, "r2": 0.0})
    assert run.guard_change_pp == pytest.approx({"imagenette": -3.0})
    assert run.promoted == 2
    row = stream_markdown([run]).splitlines()[2]
    assert row.startswith("| lorsu | 80.0 | 75.0 | 46.7 |") and "| +10.0 | -3.0 | 2/3 |" in row
