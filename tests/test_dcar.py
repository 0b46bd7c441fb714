"""DCAR dual prompts: a text prefix and a visual prompt (tokens on a ViT, a learned border on a
CNN), description weights; every weight of both towers stays bit-identical."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny
from vepatch.cli import app
from vepatch.recipe import ApplySpec, DataSpec, GuardSpec, GuardSuite

runner = CliRunner()
TEMPLATES = ["a photo of a {}.", "itap of a {}."]


def _ws(make_workspace, bundle, tmp_path, templates=TEMPLATES, **apply_fields):
    pool = tiny.make_folder(tmp_path / "pool", 12, seed=5)
    guard_set = tiny.make_folder(tmp_path / "guardset", 6, seed=9)
    spec = ApplySpec(**{"shots": 6, "epochs": 4, "batch_size": 6, "lr": 3e-2, "vision_prompts": 3, "prompt_pad": 4,
                        **apply_fields})
    return make_workspace(
        bundle, templates=list(templates), shot_pool=DataSpec(path=str(pool), name="pool"), apply=spec,
        guard=GuardSpec(allow_unguarded=True, suites=[GuardSuite(path=str(guard_set), name="colours", max_drop_pp=100.0)],
                        min_target_gain_pp=-100.0, max_mean_drop_pp=100.0, strengths=[0.5, 1.0]),
    )


def _run(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _features(loaded, images):
    with torch.no_grad():
        return loaded.model.encode_image(images, normalize=True)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_dcar_learns_a_visual_prompt_and_leaves_every_weight_bit_identical(make_workspace, vit_bundle, cnn_bundle,
                                                                           tmp_path, kind):
    from vepatch import store, visual_prompts
    from vepatch.context import open_context
    from vepatch.workspace import Workspace

    root = _ws(make_workspace, vit_bundle if kind == "vit" else cnn_bundle, tmp_path)
    manifest = _run("apply", "-C", str(root), "--method", "dcar", "--json")
    _, delta = store.read_candidate(Workspace(root), manifest["candidate_id"])
    vision = {k for k in delta.tensors if k.startswith(visual_prompts.PREFIX)}
    if kind == "vit":  # 3 tokens of width 64, and their gate
        assert {k.split("#")[1] for k in vision} == {"vprompt.tokens", "dense"}
        assert manifest["masks"][next(k.split("#")[0] for k in vision if "tokens" in k)] == 3 * 64
    else:  # a 4-pixel border of the 32-pixel image, 3 channels
        assert {k.split("#")[1] for k in vision} == {"sparse.bits", "sparse.value"}  # 30% of the pixels: a bit each
        assert manifest["masks"][f"{visual_prompts.PREFIX}pad.pixels"] == 3 * (32 * 32 - 24 * 24)
    assert any(k.endswith("#prompt.ids") for k in delta.tensors) and any(k.endswith("#weights.text") for k in delta.tensors)
    assert _run("guard", "-C", str(root), manifest["candidate_id"], "--json")["version"] == "v1"
    assert _run("verify", "-C", str(root), "--json")["problems"] == []

    ctx = open_context(root)
    base, v1 = ctx.model("base")[0], ctx.model("v1")[0]
    weights = {k: v for k, v in v1.model.state_dict().items() if "vepatch" not in k}
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in weights.items())  # both towers, every weight
    assert v1.fingerprint != base.fingerprint  # a visual prompt is part of what the version is
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(_features(base, images), _features(v1, images))  # the prompt changes what the tower sees

    # at rest (gate 0 / a zero border) the prompt changes nothing, bit for bit, and the fingerprint is the base's again
    found = visual_prompts.bank(v1.model.visual)
    with torch.no_grad():
        for s in found.sets.values():
            (s.gate if kind == "vit" else s.pixels).zero_()
    assert torch.equal(_features(v1, images), _features(base, images))
    from vepatch.models.load import fingerprint

    assert fingerprint(v1.model.visual) == fingerprint(base.model.visual)


def test_a_visual_prompt_s_strength_fades_it_out(vit_bundle, cnn_bundle):
    from vepatch.delta import Delta, apply_delta, restore
    from vepatch.models import load_model
    from vepatch.visual_prompts import PREFIX, key_of

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for bundle, delta in ((vit_bundle, Delta()), (cnn_bundle, Delta())):
        loaded = load_model(f"local-dir:{bundle}")
        if bundle == vit_bundle:
            tokens = torch.randn(2, 64, generator=g) * 3
            delta.add_visual_tokens(f"{PREFIX}{key_of(tokens)}", tokens)
        else:
            border = torch.zeros(3, 32, 32, dtype=torch.bool)
            border[:, :2] = True
            delta.add_sparse(f"{PREFIX}pad.pixels", torch.randn(3, 32, 32, generator=g), border)
        base = _features(loaded, images)
        gaps = []
        for strength in (0.25, 0.5, 1.0):
            originals = apply_delta(loaded.model, delta, strength)
            gaps.append(float((_features(loaded, images) - base).norm()))
            restore(loaded.model, originals)
        assert 0 < gaps[0] < gaps[1] < gaps[2]  # a smaller strength moves the features less
        assert torch.equal(_features(loaded, images), base)  # restored: the tower reads as before


def test_description_weights_make_the_head_a_weighted_mix_for_their_classes_only(vit_bundle):
    from vepatch.models import load_model
    from vepatch.models.heads import compute_text_head
    from vepatch.prompts import ensure_weights

    loaded = load_model(f"local-dir:{vit_bundle}")
    uniform = compute_text_head(loaded, tiny.CLASSES, TEMPLATES)
    other = compute_text_head(loaded, tiny.CLASSES[:2], TEMPLATES)
    _, entry = ensure_weights(loaded.model, list(tiny.CLASSES), TEMPLATES)
    assert torch.equal(compute_text_head(loaded, tiny.CLASSES, TEMPLATES), uniform)  # uniform: the zero-shot head
    with torch.no_grad():
        entry.w.copy_(torch.tensor([[1.0, 0.0]] * len(tiny.CLASSES)))
    first_only = compute_text_head(loaded, tiny.CLASSES, TEMPLATES[:1])
    assert torch.allclose(compute_text_head(loaded, tiny.CLASSES, TEMPLATES), first_only, atol=1e-6)
    assert torch.equal(compute_text_head(loaded, tiny.CLASSES[:2], TEMPLATES), other)  # other classes: untouched


def test_dcar_loss_weighs_close_negatives_and_reads_both_directions():
    from vepatch.methods.dcar import dcar_loss, negative_weights

    head = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.0, 1.0]]), dim=-1)
    log_w = negative_weights(head)
    assert torch.all(log_w.diagonal() == 0) and log_w[0, 1] > log_w[0, 2] >= 0  # class 1 is close to 0, class 2 is not
    scale = torch.tensor(10.0)
    features = torch.tensor([[1.0, 0.2]])
    labels = torch.tensor([0])
    # the same image costs more when the close class is weighted up than with no weights
    assert dcar_loss(features, head, scale, labels, log_w) > dcar_loss(features, head, scale, labels, torch.zeros(3, 3))
    # text->image: two images of class 0, one right on it and one on class 2; moving the second
    # away from class 0 lowers the loss although image->text alone would not see the batch
    near = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 2])
    assert dcar_loss(near, head, scale, labels, log_w) < dcar_loss(near.flip(0), head, scale, labels, log_w)


def test_a_dcar_version_exports_to_plain_open_clip_with_its_prompts_beside(make_workspace, vit_bundle, tmp_path):
    import open_clip

    from vepatch.context import open_context
    from vepatch.models.heads import compute_text_head
    from vepatch.prompts import EXPORT_FILE, install

    root = _ws(make_workspace, vit_bundle, tmp_path)
    _run("apply", "-C", str(root), "--method", "dcar", "--json")
    assert _run("guard", "-C", str(root), "--json")["version"] == "v1"
    out = tmp_path / "export"
    _run("export", "v1", "--out", str(out), "-C", str(root), "--json")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")  # strict load: no vepatch keys
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    v1 = open_context(root).model("v1")[0]
    plain = _features(type(v1)(model.eval(), v1.preprocess, v1.tokenizer, v1.ref, ""), images)
    assert not torch.allclose(plain, _features(v1, images))  # without its prompts the tower reads otherwise
    install(model, out / EXPORT_FILE)
    loaded = type(v1)(model, v1.preprocess, v1.tokenizer, v1.ref, "")
    assert torch.allclose(_features(loaded, images), _features(v1, images), atol=1e-6)
    assert torch.allclose(compute_text_head(loaded, tiny.CLASSES, TEMPLATES), compute_text_head(v1, tiny.CLASSES, TEMPLATES),
                          atol=1e-6)
    assert np.isfinite(plain.numpy()).all()


def test_show_says_what_each_part_of_a_dcar_patch_is(make_workspace, vit_bundle, tmp_path):
    root = _ws(make_workspace, vit_bundle, tmp_path)
    manifest = _run("apply", "-C", str(root), "--method", "dcar", "--json")
    shown = runner.invoke(app, ["show", manifest["candidate_id"], "-C", str(root)], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    for words in ('prompt "a photo of a" (learned vectors)', 'prompt "itap of a" (learned vectors)',
                  "visual prompt (3 tokens after the class token)", "description weights (3 classes x 2 templates)"):
        assert words in shown.output


def test_a_vision_patch_on_a_dcar_version_keeps_its_prompt_and_the_chain_verifies(make_workspace, vit_bundle, tmp_path):
    from vepatch import store, visual_prompts
    from vepatch.context import open_context
    from vepatch.workspace import Workspace

    root = _ws(make_workspace, vit_bundle, tmp_path)
    _run("apply", "-C", str(root), "--method", "dcar", "--json")
    assert _run("guard", "-C", str(root), "--json")["version"] == "v1"
    lorsu = _run("apply", "-C", str(root), "--diagnosis", "none", "--json")
    assert not any(k.startswith(visual_prompts.PREFIX) for k in lorsu["masks"])  # the prompt is v1's, not trained again
    assert _run("guard", "-C", str(root), "--json")["version"] == "v2"
    assert _run("verify", "-C", str(root), "--json")["problems"] == []
    ctx = open_context(root)
    v1, v2 = ctx.model("v1")[0], ctx.model("v2")[0]
    assert v2.fingerprint == store.read_manifest(Workspace(root), "v2").fingerprint
    prompt1 = {k: v for k, v in v1.model.visual.state_dict().items() if k.startswith(visual_prompts.BANK)}
    prompt2 = {k: v for k, v in v2.model.visual.state_dict().items() if k.startswith(visual_prompts.BANK)}
    assert prompt1 and prompt1.keys() == prompt2.keys() and all(torch.equal(prompt1[k], prompt2[k]) for k in prompt1)
