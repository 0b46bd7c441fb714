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


def test_the_quickstart_candidate_trains_on_the_diagnosis_it_made(default_model, tmp_path):
    """README quickstart on the embedded default (a CNN: no attention heads): `diagnose
    errors/` then `apply` uses that diagnosis, not masks scored on the shots."""
    import json
    import shutil

    from typer.testing import CliRunner

    from vepatch.cli import app
    from vepatch.recipe import ApplySpec, DataSpec, Recipe
    from vepatch.workspace import init_workspace

    root = resolve_path(TEXTILE)
    folders = {"local": "local defect", "global": "global defect"}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):  # errors/<class>/, as prepare_textile_errors.py lays them out
        errors = tmp_path / "errors" / folders.get(d.name, d.name).replace(" ", "_")
        errors.mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:3]:
            shutil.copy(f, errors / f.name)
    recipe = Recipe(classes=["nominal", "local defect", "global defect"], templates=["a photo of {} fabric."],
                    shot_pool=DataSpec(path=TEXTILE, folders=folders, max_per_class=6),
                    apply=ApplySpec(shots=3, epochs=1, augment_scale=1.0))
    ws = tmp_path / "ws"
    init_workspace(ws, recipe)
    runner = CliRunner()
    made = runner.invoke(app, ["diagnose", str(tmp_path / "errors"), "-C", str(ws), "--json"])
    assert made.exit_code == 0, made.output
    diagnosis = json.loads(made.stdout)
    applied = runner.invoke(app, ["apply", "-C", str(ws), "--json"])
    assert applied.exit_code == 0, applied.output
    manifest = json.loads(applied.stdout)
    assert manifest["diagnosis"] == diagnosis["file"].rsplit("/", 1)[-1] and not manifest["diagnosis_note"]
