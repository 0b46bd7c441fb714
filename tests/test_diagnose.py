import numpy as np
import pytest
import torch

import tiny
from vepatch.data import open_image_set
from vepatch.diagnose import diagnose, mean_gradients
from vepatch.recipe import DiagnoseSpec
from vepatch.masks import build_masks, head_rows, score_heads, select_fc1
from vepatch.evaluate import predict
from vepatch.models.heads import text_head
from vepatch.models import load_model
from vepatch.models.towers import describe_tower


def _fitted(bundle):
    """The tiny ViT fitted to the tiny classes (conftest's fitted_bundle), and its head."""
    loaded = load_model(f"local-dir:{bundle}")
    return loaded, text_head(loaded, sorted(tiny.CLASSES), ["a photo of a {}."])  # folder order


@pytest.mark.parametrize("block,head_index", [(2, 1), (1, 3)])
def test_planted_fault_is_ranked_first(fitted_bundle, tmp_path, block, head_index):
    loaded, head = _fitted(fitted_bundle)
    assert predict(loaded, head, open_image_set(tiny.make_folder(tmp_path / "clean", 8, seed=2)), 32, "cpu").accuracy == 1.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        blk = loaded.model.visual.transformer.resblocks[block]
        fc1 = blk.mlp.c_fc.weight
        fc1[::4] += 10 * torch.randn(fc1[::4].shape, generator=g)  # corrupt a quarter of the rows
        qkv = blk.attn.in_proj_weight
        rows = head_rows(qkv.shape[0], [head_index], blk.attn.num_heads)
        qkv[rows] += 10 * torch.randn(int(rows.sum()), qkv.shape[1], generator=g)
    errors = open_image_set(tiny.make_folder(tmp_path / "errors", 8, seed=2))
    d, _ = diagnose(loaded, head, errors, "base", DiagnoseSpec(), 0, "cpu")
    assert d.n_errors > 0 and d.n_errors + len(d.already_right) == d.n_images
    assert d.blocks[0].block == f"transformer.resblocks.{block}"
    top_fc1 = next(l for l in d.loci if l.kind == "fc1")
    top_head = next(l for l in d.loci if l.kind == "head")
    assert top_fc1.block == top_head.block == f"transformer.resblocks.{block}"
    assert top_head.head == head_index
    assert d.concentration_top10 > 0.5  # one block of four holds most of the blame


def test_top_s_and_top_k_match_brute_force():
    torch.manual_seed(0)
    grad = torch.randn(12, 5)
    mask = select_fc1(grad, 0.25)
    k = 15  # ceil(0.25 * 60)
    order = sorted(range(60), key=lambda i: -abs(grad.reshape(-1)[i].item()))
    expected = torch.zeros(60, dtype=torch.bool)
    expected[order[:k]] = True
    assert torch.equal(mask.reshape(-1), expected)

    width, heads = 8, 4
    qkv = torch.randn(3 * width, width)
    scores = score_heads(qkv, heads)
    hd = width // heads
    brute = [sum(float(qkv[j * width + h * hd + r, c] ** 2) for j in range(3) for r in range(hd) for c in range(width)) for h in range(heads)]
    assert np.allclose(scores.numpy(), brute, rtol=1e-5)
    rows = head_rows(3 * width, [1, 3], heads)
    assert rows.sum() == 3 * 2 * hd
    assert all(rows[j * width + h * hd].item() == (h in (1, 3)) for j in range(3) for h in range(heads))


def test_random_control_spends_the_same_budget(vit_bundle, tmp_path):
    loaded = load_model(f"local-dir:{vit_bundle}")
    tower = describe_tower(loaded.model)
    errors = open_image_set(tiny.make_folder(tmp_path / "e", 4))
    head = text_head(loaded, errors.classnames, ["a photo of a {}."])
    grads = mean_gradients(loaded, head, errors, tower.fc1 + tower.qkv, 32, 1000, "cpu", 0)
    chosen = build_masks(grads, tower, 0.1, 2)
    random = build_masks(grads, tower, 0.1, 2, control="random", seed=3)
    for name in tower.fc1:
        assert chosen.fc1[name].sum() == random.fc1[name].sum()
    assert any(not torch.equal(chosen.fc1[n], random.fc1[n]) for n in tower.fc1)
    assert all(len(random.heads[n]) == len(chosen.heads[n]) == 2 for n in tower.qkv)


def test_cnn_tower_scores_expansion_convs(cnn_bundle, tmp_path):
    loaded = load_model(f"local-dir:{cnn_bundle}")
    tower = describe_tower(loaded.model)
    assert tower.kind == "timm-cnn" and not tower.qkv
    assert all(n.endswith("conv_pw.weight") for n in tower.fc1) and tower.proj.endswith("head.proj.weight")
    errors = open_image_set(tiny.make_folder(tmp_path / "e", 4))
    head = text_head(loaded, errors.classnames, ["a photo of a {}."])
    d, masks = diagnose(loaded, head, errors, "base", DiagnoseSpec(fc1_fraction=0.2), 0, "cpu")
    assert {l.kind for l in d.loci} == {"fc1"} and d.heads_per_layer == 0
    for name, mask in masks.fc1.items():
        assert mask.sum() == int(np.ceil(0.2 * mask.numel()))


def test_timm_vit_and_convnext_towers_are_described(tmp_path):
    import open_clip

    for kind, expect in (("timm-vit", "attn.qkv.weight"),):
        model = open_clip.model.CLIP(**tiny.CONFIGS[kind])
        tower = describe_tower(model)
        assert tower.kind == "timm-vit" and tower.num_heads == 2 and all(n.endswith(expect) for n in tower.qkv)
        assert tower.proj == "visual.head.proj.weight"
    cfg = dict(tiny.CONFIGS["cnn"], vision_cfg={"image_size": 32, "timm_model_name": "test_convnext", "timm_pool": "avg", "timm_proj": "linear"})
    tower = describe_tower(open_clip.model.CLIP(**cfg))
    assert tower.kind == "timm-cnn" and all(n.endswith("mlp.fc1.weight") for n in tower.fc1) and len(tower.fc1) > 2
