import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny
from vepatch.data import open_image_set, split_shots
from vepatch.images import read_image
from vepatch.errors import DataError


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims a huge image: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_every_bad_file_kind_is_converted_or_skipped_with_a_reason(tmp_path):
    root = tiny.make_folder(tmp_path / "set", per_class=2)
    d = root / "red_square"
    rgb = tiny.draw(0, np.random.default_rng(0))
    rgb.save(d / "good.jpg")
    (d / "truncated.jpg").write_bytes((d / "good.jpg").read_bytes()[:200])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all")
    (d / "notes.txt").write_text("operator notes")
    _png_claiming(d / "bomb.png", 100_000, 100_000)
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(d / "sixteen.png")
    rgb.convert("L").save(d / "grey.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    rgb.convert("P").save(d / "palette.gif", transparency=0)

    s = open_image_set(root)
    reasons = {p.rsplit("/", 1)[1]: r for p, r in ((k.source, k.reason) for k in s.skipped)}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg", "notes.txt", "bomb.png"}
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert "0 bytes" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.jpg"] and "not an image file" in reasons["notes.txt"]
    assert "decompression bomb" in reasons["bomb.png"]
    kept = {smp.source.rsplit("/", 1)[1] for smp in s.samples}
    assert {"cmyk.jpg", "sixteen.png", "grey.png", "alpha.png", "palette.gif", "good.jpg"} <= kept
    for name in ("cmyk.jpg", "sixteen.png", "grey.png", "alpha.png", "palette.gif"):
        img = read_image(d / name)
        assert img.mode == "RGB" and img.size == (32, 32)
    sixteen = np.asarray(read_image(d / "sixteen.png"))
    assert sixteen.max() > 200 and sixteen.min() == 0  # scaled from 16 bits, not clipped to white


def test_unknown_class_folder_lists_the_known_classes(tmp_path):
    root = tiny.make_folder(tmp_path / "set", per_class=1)
    (root / "purple_blob").mkdir()
    with pytest.raises(DataError) as info:
        open_image_set(root, classnames=tiny.CLASSES)
    assert "purple_blob" in str(info.value) and "red square" in info.value.hint


def test_folder_map_and_underscores(tmp_path):
    root = tiny.make_folder(tmp_path / "set", per_class=1, classes=["local", "nominal"])
    s = open_image_set(root, classnames=["nominal", "local defect"], folders={"local": "local_defect"})
    assert s.classnames == ["nominal", "local defect"]
    assert sorted(s.labels) == [0, 1]


def test_a_set_with_no_readable_image_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "set" / "cat").mkdir(parents=True)
    (tmp_path / "set" / "cat" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        open_image_set(tmp_path / "set")
    with pytest.raises(DataError, match="not a folder"):
        open_image_set(tmp_path / "missing")


def test_shots_are_seeded_and_disjoint_from_the_holdout(tmp_path):
    s = open_image_set(tiny.make_folder(tmp_path / "set", per_class=10))
    train, holdout = split_shots(s, shots=3, seed=7)
    assert not set(train) & set(holdout) and len(train) == 9 and len(holdout) == 21
    assert split_shots(s, 3, seed=7) == (train, holdout)
    assert split_shots(s, 3, seed=8)[0] != train
    per_class = np.bincount([s.samples[i].label for i in train])
    assert per_class.tolist() == [3, 3, 3]
    assert len(split_shots(s, 3, seed=7, holdout_per_class=2)[1]) == 6


def test_saved_datasets_and_classnames_txt(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red_square", "blue_stripes"])})
    ds = datasets.Dataset.from_dict({"image": [tiny.draw(0, rng), tiny.draw(2, rng)], "label": [0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    s = open_image_set(tmp_path / "saved", classnames=tiny.CLASSES)
    assert [smp.label for smp in s.samples] == [0, 2]
    assert s.load(s.samples[1]).mode == "RGB"

    root = tiny.make_folder(tmp_path / "bench", per_class=1, classes=["c0", "c1", "c2"])
    (root / "classnames.txt").write_text("apple\nbanana\ncherry\n")
    assert open_image_set(root).classnames == ["apple", "banana", "cherry"]


def test_merged_sets_join_classes_by_name_and_keep_each_image_once():
    """The guard's history suite: every version's holdout in one set (guard.history_suites)."""
    from vepatch.data import ImageSet, Sample, merge_sets

    v1 = ImageSet("v1", "/a", ["nominal", "global defect"], [Sample("/a/1.png", 0), Sample("/a/2.png", 1)])
    v2 = ImageSet("v2", "/b", ["global defect", "local defect"], [Sample("/b/3.png", 1), Sample("/a/2.png", 0)])
    pooled = merge_sets("history", [v1, v2])
    assert pooled.name == "history" and pooled.classnames == ["nominal", "global defect", "local defect"]
    assert [(s.source, pooled.classnames[s.label]) for s in pooled.samples] == [
        ("/a/1.png", "nominal"), ("/a/2.png", "global defect"), ("/b/3.png", "local defect")]


def test_a_hash_sign_in_a_path_is_part_of_the_file_name(tmp_path):
    """A saved dataset's rows are '<dir>#<row>'; a file or folder whose name holds '#' is still
    a file: its set hashes (the prediction cache's key), loads and reopens as a holdout."""
    import datasets
    import torch

    from vepatch.data import open_holdout
    from vepatch.records import HoldoutRef
    from vepatch.runtime.predcache import key

    ws = tmp_path / "ws#1"
    root = tiny.make_folder(ws / "suite#2", 2)
    for f in root.glob("*/*.png"):
        f.rename(f.with_name(f"IMG#{f.stem}.png"))
    s = open_image_set(root, tiny.CLASSES)
    assert len(s) == 6 and s.load(s.samples[0]).size == (32, 32)
    before = key("fp", "pre", torch.zeros(3, 4), s, 8, "cpu")
    first = Path(s.samples[0].source)
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert key("fp", "pre", torch.zeros(3, 4), s, 8, "cpu") != before  # a replaced file is a new key
    ref = HoldoutRef("h", list(s.classnames), ["{}"], [str(Path(x.source).relative_to(ws)) for x in s.samples], s.labels)
    held = open_holdout(ref, ws)
    assert [x.source for x in held.samples] == [x.source for x in s.samples] and held.dataset is None

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red_square", "blue_stripes"])})
    ds = datasets.Dataset.from_dict({"image": [tiny.draw(0, rng), tiny.draw(2, rng)], "label": [0, 1]}, features=features)
    ds.save_to_disk(str(ws / "saved#3"))
    rows = open_image_set(ws / "saved#3", classnames=tiny.CLASSES)
    assert rows.samples[1].source.endswith("saved#3#1") and rows.load(rows.samples[1]).mode == "RGB"
    assert key("fp", "pre", torch.zeros(3, 4), rows, 8, "cpu")
    ref = HoldoutRef("h", list(rows.classnames), ["{}"], [str(Path(x.source).relative_to(ws)) for x in rows.samples], rows.labels)
    again = open_holdout(ref, ws)
    assert again.dataset is not None and [x.source for x in again.samples] == [x.source for x in rows.samples]
