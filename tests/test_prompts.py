"""Prompt patches (coop, ck-coop): learned prefix vectors, both towers frozen, chained with
vision patches in the same store."""

import json

import torch
from typer.testing import CliRunner

import tiny
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite

runner = CliRunner()


def _ws(make_workspace, bundle, tmp_path, **apply_fields):
    pool = tiny.make_folder(tmp_path / "pool", 12, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 6, seed=9)
    spec = ApplySpec(**{"shots": 6, "epochs": 4, "batch_size": 6, "lr": 3e-3, "rank": 4, "lora_alpha": 4.0, **apply_fields})
    return make_workspace(
        bundle, shot_pool=DataSpec(path=str(pool), name="pool"), apply=spec,
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0,
                                           templates=["itap of a {}."])],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[1.0]),
    )


def _run(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if result.stdout.strip().startswith("{") else None


def _head(root, version, classes=tiny.CLASSES, templates=("a photo of a {}.",)):
    from vepatch.context import open_context
    from vepatch.models.heads import compute_text_head

    loaded, _ = open_context(root).model(version)
    return loaded, compute_text_head(loaded, classes, list(templates))


def test_a_prompt_slot_at_its_start_changes_nothing_and_a_learned_one_only_its_own_prompts(vit_bundle):
    from vepatch.models import load_model
    from vepatch.models.heads import compute_text_head
    from vepatch.prompts import ensure_slot, prefix_ids

    loaded = load_model(f"local-dir:{vit_bundle}")
    before = {t: compute_text_head(loaded, tiny.CLASSES, [t]) for t in ("a photo of a {}.", "itap of a {}.")}
    ids, text = prefix_ids(loaded.tokenizer, "a photo of a {}.")
    assert text == "a photo of a" and len(ids) == 4
    _, slot = ensure_slot(loaded.model, ids, text)
    for t, head in before.items():  # at its start: bit for bit the same
        assert torch.equal(compute_text_head(loaded, tiny.CLASSES, [t]), head)
    with torch.no_grad():
        slot.context.add_(torch.randn_like(slot.context))
    assert not torch.allclose(compute_text_head(loaded, tiny.CLASSES, ["a photo of a {}."]), before["a photo of a {}."])
    assert torch.equal(compute_text_head(loaded, tiny.CLASSES, ["itap of a {}."]), before["itap of a {}."])


def test_a_prompt_patch_chained_after_a_vision_patch_leaves_the_tower_bit_identical(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    _run("apply", "-C", str(root), "--diagnosis", "none", "--json")
    assert _run("guard", "-C", str(root), "--json")["version"] == "v1"
    manifest = _run("apply", "-C", str(root), "--method", "coop", "--lr", "0.05", "--json")
    assert list(manifest["masks"]) == [n for n in manifest["masks"] if n.startswith("vepatch_prompts.")]
    assert manifest["trainable_params"] == 4 * 32  # "a photo of a": 4 tokens x width 32
    report = _run("guard", "-C", str(root), "--json")
    assert report["version"] == "v2"
    assert _run("verify", "-C", str(root), "--json")["problems"] == []
    shown = runner.invoke(app, ["show", "v2", "-C", str(root)], env={"COLUMNS": "100"})
    assert 'prompt "a photo of a" (learned vectors)' in shown.output and "128" in shown.output

    v1, head1 = _head(root, "v1")
    v2, head2 = _head(root, "v2")
    tower1, tower2 = v1.model.visual.state_dict(), v2.model.visual.state_dict()
    assert all(torch.equal(tower1[k], tower2[k]) for k in tower1)  # every vision-tower tensor
    assert v2.fingerprint != v1.fingerprint  # a prompt patch is a version of its own
    assert not torch.allclose(head1, head2)  # what the text side makes of the classes changed
    # the guard suite's own template starts otherwise: the patch does not touch its head
    assert torch.equal(_head(root, "v1", templates=["itap of a {}."])[1], _head(root, "v2", templates=["itap of a {}."])[1])
    # rolled back, the model reads the classes as v1 did
    _run("rollback", "v1", "-C", str(root), "--json")
    assert torch.equal(_head(root, None)[1], head1)

    # exported, plain open_clip loads the weights; the learned vectors travel beside them
    import open_clip

    from vepatch.prompts import EXPORT_FILE, install

    out = tmp_path / "export"
    _run("export", "v2", "--out", str(out), "-C", str(root), "--json")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    install(model, out / EXPORT_FILE)
    texts = tokenizer([f"a photo of a {c}." for c in tiny.CLASSES])
    with torch.no_grad():
        plain = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
    assert torch.allclose(plain, head2, atol=1e-6)


def test_ck_coop_learns_fewer_numbers_from_centres_computed_once_per_token_table(make_workspace, vit_bundle, tmp_path,
                                                                                 monkeypatch):
    import sklearn.cluster

    fits = []
    real = sklearn.cluster.KMeans.fit

    def counted(self, x, *args, **kwargs):
        fits.append(x.shape)
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(sklearn.cluster.KMeans, "fit", counted)
    root = _ws(make_workspace, vit_bundle, tmp_path, codebook=8)
    first = _run("apply", "-C", str(root), "--method", "ck-coop", "--json")
    second = _run("apply", "-C", str(root), "--method", "ck-coop", "--seed", "1", "--json")
    assert fits == [(49408, 32)]  # the tiny text tower's table, clustered once; the second apply reads the cache
    # 4 tokens x 8 centres + 4 x 4 + 32 / 4 (the Kronecker factors of width 32) < coop's 4 x 32
    assert first["trainable_params"] == second["trainable_params"] == 4 * 8 + 4 * 4 + 8
    from vepatch import store
    from vepatch.workspace import Workspace

    _, delta = store.read_candidate(Workspace(root), first["candidate_id"])
    assert delta.touches_text and all(k.startswith("vepatch_prompts.") for k in delta.tensors)
    change = next(v for k, v in delta.tensors.items() if k.endswith("#dense"))
    assert change.shape == (4, 32) and change.abs().sum() > 0


def test_a_prompt_patch_is_guarded_with_heads_remade_per_strength_from_one_read_of_every_image(vit_bundle, tmp_path,
                                                                                                  monkeypatch):
    import numpy as np

    from vepatch import guard
    from vepatch.data import open_image_set
    from vepatch.delta import Delta, apply_delta, restore
    from vepatch.evaluate import predict
    from vepatch.models import load_model
    from vepatch.models.heads import text_head
    from vepatch.prompts import PREFIX, key_of, prefix_ids

    loaded = load_model(f"local-dir:{vit_bundle}")
    images = open_image_set(tiny.make_folder(tmp_path / "set", 4, seed=3))
    template = "a photo of a {}."
    suites = [guard.Suite("set", "guard", images, text_head(loaded, images.classnames, [template]), 1.0, templates=(template,))]
    ids, text = prefix_ids(loaded.tokenizer, template)
    delta = Delta()
    delta.add_prompt(f"{PREFIX}{key_of(ids)}.context", torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), ids, text)
    spec = GuardSpec(strengths=[0.5, 1.0])
    reads, remade = [], []
    loaded.model.visual.register_forward_hook(lambda *_: reads.append(1))
    real = guard.with_heads

    def counted(model, suites):
        out = real(model, suites)
        remade.append(not torch.equal(out[0].head, suites[0].head))
        return out

    monkeypatch.setattr(guard, "with_heads", counted)
    fast = guard.search_strengths(loaded, delta, suites, spec, 4, "cpu", every=True)
    assert len(reads) == 3  # 12 images in batches of 4, read once for the baseline and both strengths
    assert remade == [True, True]  # each strength's heads made again, and changed
    plain = guard.search_strengths(loaded, delta, suites, spec, 4, "cpu", keep_bytes=0, every=True)
    assert fast[0] == plain[0]
    for k in plain[1]:
        assert np.array_equal(fast[1][k]["set"].preds, plain[1][k]["set"].preds)
    # at each strength, the predictions are those of the patched model reading the classes anew
    originals = apply_delta(loaded.model, delta, 1.0)
    expected = predict(loaded, text_head(loaded, images.classnames, [template]), images, 4, "cpu")
    restore(loaded.model, originals)
    assert np.array_equal(plain[1][1.0]["set"].preds, expected.preds)
