"""The guard's fast path gives exactly the plain path's predictions: kept inputs at the first
touched module, the on-disk baseline cache, and sharding over torchrun processes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny
from vepatch.delta import Delta, apply_delta, restore
from vepatch.evaluate import predict
from vepatch.guard import Suite, search_strengths
from vepatch.models.heads import text_head
from vepatch.models import load_model
from vepatch.runtime.passes import Budget, SuiteInputs
from vepatch.runtime.predcache import PredictionCache
from vepatch.recipe import GuardSpec
from vepatch.models.towers import describe_tower


def _images(tmp_path, n=7):
    from vepatch.data import open_image_set

    return open_image_set(tiny.make_folder(tmp_path / "set", n, seed=3), list(tiny.CLASSES), name="set")


def _delta(loaded, names, seed=0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    params = dict(loaded.model.named_parameters())
    delta = Delta()
    for name in names:
        delta.add_dense(name, 0.5 * torch.randn(params[name].shape, generator=g))
    return delta


def test_entry_is_the_first_module_a_change_touches(vit_bundle, cnn_bundle):
    vit = describe_tower(load_model(f"local-dir:{vit_bundle}").model)
    assert vit.entry_for(["visual.transformer.resblocks.3.mlp.c_fc.weight", "visual.transformer.resblocks.2.attn.in_proj_weight"]) \
        == "visual.transformer.resblocks.2"
    assert vit.entry_for(["visual.proj"]) == "visual.ln_post"
    assert vit.entry_for(["visual.proj", "visual.positional_embedding"]) == ""  # before the blocks: nothing kept but images
    cnn = describe_tower(load_model(f"local-dir:{cnn_bundle}").model)
    assert cnn.entry_for(["visual.head.proj.weight"]) == "visual.head"
    assert cnn.entry_for(["visual.trunk.blocks.4.0.conv_pw.weight"]) == "visual.trunk.blocks.4.0"
    assert cnn.entry_for(["visual.trunk.conv_stem.weight"]) == ""


@pytest.mark.parametrize("bundle,changed", [
    ("vit_bundle", ["visual.transformer.resblocks.2.mlp.c_fc.weight", "visual.proj"]),
    ("vit_bundle", ["visual.proj"]),
    ("cnn_bundle", ["visual.trunk.blocks.4.0.conv_pw.weight"]),
    ("cnn_bundle", ["visual.head.proj.weight"]),
])
def test_kept_inputs_give_the_plain_predictions_at_every_strength(request, tmp_path, bundle, changed):
    loaded = load_model(f"local-dir:{request.getfixturevalue(bundle)}")
    images = _images(tmp_path)
    head = text_head(loaded, images.classnames, ["a photo of a {}."])
    delta = _delta(loaded, changed)
    entry = describe_tower(loaded.model).entry_for(delta.params)
    assert entry  # something before the change is kept
    inputs = SuiteInputs(images, loaded.preprocess, 3, entry, Budget(1 << 30))
    assert np.array_equal(inputs.predict(loaded.model, head, "cpu").preds, predict(loaded, head, images, 3, "cpu").preds)
    assert len(inputs.kept) == len(inputs.bounds) == 7  # 21 images in batches of 3
    batch = torch.stack([loaded.preprocess(images.load(s)) for s in images.samples[:3]])
    with torch.no_grad():
        before = loaded.model.encode_image(batch, normalize=True)
    for strength in (1.0, 0.5):
        originals = apply_delta(loaded.model, delta, strength)
        fast, plain = inputs.predict(loaded.model, head, "cpu"), predict(loaded, head, images, 3, "cpu")
        with torch.no_grad():
            features = loaded.model.encode_image(batch, normalize=True)
            assert torch.equal(inputs.features(loaded.model, 0, "cpu"), features)  # bit for bit
        restore(loaded.model, originals)
        assert np.array_equal(fast.preds, plain.preds)
        assert not torch.allclose(features, before)  # the change moves the features the kept inputs feed
    # the kept activations themselves equal a fresh capture (bit for bit)
    again = SuiteInputs(images, loaded.preprocess, 3, entry, Budget(1 << 30))
    again.predict(loaded.model, head, "cpu")
    assert all(torch.equal(inputs.kept[b], again.kept[b]) for b in inputs.kept)


def test_budget_bounds_what_is_kept(vit_bundle, tmp_path):
    loaded = load_model(f"local-dir:{vit_bundle}")
    images = _images(tmp_path)
    head = text_head(loaded, images.classnames, ["a photo of a {}."])
    one_batch = 3 * 3 * 32 * 32 * 4  # one batch: three preprocessed images, float32
    inputs = SuiteInputs(images, loaded.preprocess, 3, "", Budget(one_batch))
    assert np.array_equal(inputs.predict(loaded.model, head, "cpu").preds, predict(loaded, head, images, 3, "cpu").preds)
    assert list(inputs.kept) == [0]


def test_search_is_the_same_with_and_without_the_fast_path_and_the_cache_hits(vit_bundle, tmp_path):
    loaded = load_model(f"local-dir:{vit_bundle}")
    images = _images(tmp_path)
    suites = [Suite("set", "guard", images, text_head(loaded, images.classnames, ["a photo of a {}."]), 1.0)]
    delta = _delta(loaded, ["visual.transformer.resblocks.1.mlp.c_fc.weight"])
    spec = GuardSpec(strengths=[0.5, 1.0])
    plain = search_strengths(loaded, delta, suites, spec, 4, "cpu", keep_bytes=0)
    cache = PredictionCache(tmp_path / "cache")
    fast = search_strengths(loaded, delta, suites, spec, 4, "cpu", cache=cache)
    again = search_strengths(loaded, delta, suites, spec, 4, "cpu", cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    for other in (fast, again):
        assert other[0] == plain[0]  # identical trials
        assert all(np.array_equal(other[1][k]["set"].preds, plain[1][k]["set"].preds) for k in plain[1])
        assert np.array_equal(other[2]["set"].preds, plain[2]["set"].preds)
    # a changed image is a different key: the cache is not consulted for stale predictions
    victim = next((tmp_path / "set").rglob("*.png"))
    os.utime(victim, ns=(1, 1))
    search_strengths(loaded, delta, suites, spec, 4, "cpu", cache=cache)
    assert (cache.misses, cache.hits) == (2, 1)


def test_torchrun_sharded_guard_equals_one_process(make_workspace, vit_bundle, tmp_path):
    """Two gloo processes on the CPU: the same verdict and per-example predictions as one."""
    from vepatch.recipe import ApplySpec, DataSpec, GuardSpec as GS, GuardSuite

    pool = tiny.make_folder(tmp_path / "pool", 14, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 11, seed=9)
    root = make_workspace(
        vit_bundle, shot_pool=DataSpec(path=str(pool), name="pool"), batch_size=4,
        apply=ApplySpec(shots=6, epochs=2, batch_size=6, lr=3e-3, rank=4, lora_alpha=4.0),
        guard=GS(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                 min_target_gain_pp=-100.0, max_mean_drop_pp=100.0),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vp = [sys.executable, "-m", "vepatch"]
    assert subprocess.run([*vp, "apply", "-C", str(root), "--diagnosis", "none"], env=env, capture_output=True).returncode == 0
    twin = tmp_path / "twin"  # a candidate is judged once: the sharded run judges its own copy, cache-less
    shutil.copytree(root, twin)
    one = subprocess.run([*vp, "guard", "-C", str(root), "--no-promote", "--json"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vepatch", "guard", "-C", str(twin), "--no-promote", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert a["predictions_sha256"] == b["predictions_sha256"]
    assert a["trials"] == b["trials"] and a["accepted"] == b["accepted"]
    assert len(two.stdout.strip().splitlines()) == 1  # rank 1 printed nothing


def test_commands_that_write_more_than_a_verdict_refuse_torchrun(make_workspace, vit_bundle):
    from typer.testing import CliRunner

    from vepatch.cli import app

    root = make_workspace(vit_bundle)
    result = CliRunner().invoke(app, ["apply", "-C", str(root)], env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.exit_code == 2 and "not under torchrun" in result.output
