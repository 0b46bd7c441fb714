"""The embedded default base (METHODS.md §7), built from the two PyPI packages."""

import pytest

from conftest import SHARED_DATA
from vepatch.data import open_image_set, resolve_path
from vepatch.evaluate import predict
from vepatch.models.heads import text_head
from vepatch.models import load_model

TEXTILE = "pkg:conformal_clip_data/data/textile_images/simulated"


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_default_base_is_a_fingerprinted_local_dir_bundle(default_model, vepatch_home):
    bundle = vepatch_home / "cache" / "default-base-v1"
    assert (bundle / "open_clip_config.json").is_file() and (bundle / "open_clip_model.safetensors").is_file()
    assert len(default_model.fingerprint) == 64
    assert load_model("default").fingerprint == default_model.fingerprint  # second load: same tensors


def test_default_base_on_known_textile_images(default_model, tmp_path):
    """~15% zero-shot on textile: it calls the defect images defects and never says 'nominal'."""
    root = resolve_path(TEXTILE)
    s = open_image_set(root, ["nominal", "local defect", "global defect"],
                       {"local": "local defect", "global": "global defect"}, max_per_class=10)
    head = text_head(default_model, s.classnames, ["a photo of {} fabric."])
    p = predict(default_model, head, s, 30, "cpu")
    assert (p.preds != 0).all()  # never 'nominal'
    assert 0.05 <= p.accuracy <= 0.4


@pytest.mark.skipif(not (SHARED_DATA / "imagenette-guard").is_dir(), reason="../shared/data is absent")
def test_default_base_on_imagenette_sample(default_model):
    s = open_image_set(SHARED_DATA / "imagenette-guard", max_per_class=10)
    head = text_head(default_model, s.classnames, ["a photo of a {}."])
    assert predict(default_model, head, s, 32, "cpu").accuracy >= 0.65  # ~78% on all 600
