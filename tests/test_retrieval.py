"""Retrieval guard suites: images with captions, Recall@K both ways, judged per direction."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny
from vepatch.cli import app
from vepatch.errors import DataError
from vepatch.guard import Suite, evaluate_suites, judge
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite
from vepatch.retrieval import Row, open_caption_set, query_sources, row_predictions, rows_for

runner = CliRunner()


def test_a_caption_folder_opens_with_its_distinct_captions_as_classes(tmp_path):
    folder = tiny.caption_folder(tiny.make_folder(tmp_path / "src", 3), tmp_path / "caps")
    (folder / "lost.png").write_bytes((folder / "red_square-000.png").read_bytes())  # no caption beside it
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.txt").write_text("a photo of nothing.")
    images = open_caption_set(folder)
    assert images.classnames == [f"a photo of a {c}." for c in ("blue stripes", "green circle", "red square")]
    assert len(images) == 9 and images.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    reasons = {s.source.rsplit("/", 1)[1]: s.reason for s in images.skipped}
    assert "no caption" in reasons["lost.png"] and "empty file" in reasons["empty.png"]
    # text->image queries are the distinct captions, each shown by its first image
    assert query_sources(images, "t→i") == [images.samples[i].source for i in (0, 3, 6)]
    assert rows_for(images) == [Row("i→t", 1), Row("t→i", 1), Row("t→i", 5)]  # 3 captions: i→t R@5 is always a hit
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "red_square-000.png", one / "a.png")
    (one / "a.txt").write_text("a red square")
    with pytest.raises(DataError, match="at least two different captions"):
        open_caption_set(one)


def test_recall_at_k_both_ways_by_hand():
    captions = torch.eye(3)
    # images 0,1 carry caption 0, image 2 caption 1, image 3 caption 2
    features = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.1, 0.9, 0.0], [0.0, 0.3, 0.7]])
    labels = np.array([0, 0, 1, 2])
    i2t = row_predictions(features, captions, labels, Row("i→t", 1))
    assert i2t.correct.tolist() == [True, False, True, True] and i2t.preds.tolist() == [0, 1, 1, 2]
    i2t2 = row_predictions(features, captions, labels, Row("i→t", 2))
    assert i2t2.correct.tolist() == [True, True, True, True]
    # caption 0 ranks image 0 first (hit); caption 1 ranks image 2 first (0.9 > 0.8: hit); caption 2: image 3
    t2i = row_predictions(features, captions, labels, Row("t→i", 1))
    assert t2i.labels.tolist() == [0, 1, 2] and t2i.correct.all()
    worse = features.clone()
    worse[1] = torch.tensor([0.0, 0.95, 0.0])  # image 1 (caption 0) now outranks image 2 for caption 1
    t2i = row_predictions(worse, captions, labels, Row("t→i", 1))
    assert t2i.correct.tolist() == [True, False, True] and t2i.preds.tolist() == [0, 0, 2]


def test_a_retrieval_guard_refuses_a_candidate_that_only_hurts_text_to_image(tmp_path):
    """Caption 0's images are only just closer to it than to caption 1; the candidate moves the
    caption-1 image towards caption 0 while it stays closer to caption 1: every image still finds
    its caption (image->text unchanged), but caption 0 now retrieves the wrong image."""
    images = open_caption_set(tiny.caption_folder(tiny.make_folder(tmp_path / "src", 2, classes=tiny.CLASSES[:2]), tmp_path / "caps"))
    captions = torch.eye(3)[:2]  # caption 0 (blue stripes), caption 1 (green circle)
    before = torch.tensor([[0.5, 0.4, 0.768], [0.5, 0.4, 0.768], [0.3, 0.9, 0.316], [0.3, 0.9, 0.316]])
    after = before.clone()
    after[2] = torch.tensor([0.6, 0.7, 0.387])  # still closer to caption 1, but outranks caption 0's images for caption 0
    suites = [Suite(r.name("captions"), "guard", images, captions, 1.0, row=r, group="captions") for r in rows_for(images)]
    assert [s.name for s in suites] == ["captions i→t R@1", "captions t→i R@1"]  # 2 captions, 4 images: t→i R@5 trivial
    calls = []

    def embed_with(features):
        def embed(s):
            calls.append(s.name)
            return features
        return embed

    base = evaluate_suites(suites, lambda s: pytest.fail("no classification suite here"), embed_with(before))
    cand = evaluate_suites(suites, lambda s: pytest.fail("no classification suite here"), embed_with(after))
    assert calls == ["captions i→t R@1", "captions i→t R@1"]  # one pass of the images serves every row
    spec = GuardSpec(min_target_gain_pp=-100.0, alpha=1.0, strengths=[1.0])  # two queries a row: the observed change decides
    verdict = judge(suites, base, cand, spec, 1.0)
    rows = {r.name: r for r in verdict.suites}
    assert rows["captions i→t R@1"].change_pp == 0.0 and rows["captions i→t R@1"].passed
    assert rows["captions t→i R@1"].change_pp == -50.0 and not rows["captions t→i R@1"].passed
    assert not verdict.passed and "t→i" in verdict.why
    assert judge(suites, base, evaluate_suites(suites, None, embed_with(before)), spec, 1.0).passed


def test_guard_and_eval_measure_a_retrieval_suite(make_workspace, vit_bundle, tmp_path):
    pool = tiny.make_folder(tmp_path / "pool", 10, seed=5)
    captions = tiny.caption_folder(tiny.make_folder(tmp_path / "capsrc", 6, seed=9), tmp_path / "captions")
    root = make_workspace(
        vit_bundle, shot_pool=DataSpec(path=str(pool), name="pool"),
        apply=ApplySpec(shots=4, epochs=2, batch_size=6, lr=3e-3, rank=4, lora_alpha=4.0),
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(captions), name="captions", kind="retrieval", max_drop_pp=100.0)],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]),
    )
    result = runner.invoke(app, ["eval", str(captions), "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    base = json.loads(result.stdout)
    assert base["images"] == 18 and base["captions"] == 3 and set(base["recall"]) == {"i→t R@1", "t→i R@1", "t→i R@5"}
    assert runner.invoke(app, ["apply", "-C", str(root), "--diagnosis", "none"]).exit_code == 0
    result = runner.invoke(app, ["guard", "-C", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accepted"], report["reason"]
    rows = {s["name"]: s for s in report["trials"][0]["suites"]}
    assert {"captions i→t R@1", "captions t→i R@1", "captions t→i R@5"} <= set(rows)
    for name, row in rows.items():
        if name.startswith("captions"):
            assert row["before"] == pytest.approx(base["recall"][name.removeprefix("captions ")])
    after = json.loads(runner.invoke(app, ["eval", str(captions), "-C", str(root), "--json"]).stdout)
    assert after["version"] == "v1"
    assert after["recall"]["t→i R@1"] == pytest.approx(rows["captions t→i R@1"]["after"])
    # the verdict's evidence keeps one entry per query: images for i→t, distinct captions for t→i
    from vepatch import evidence, store
    from vepatch.workspace import Workspace

    ws = Workspace(root)
    proof = evidence.read(ws.candidate_dir(report["candidate_id"]) / store.EVIDENCE_FILE)
    by_name = {s.name: s for s in proof.suites}
    assert len(by_name["captions i→t R@1"].labels) == 18 and len(by_name["captions t→i R@1"].labels) == 3
