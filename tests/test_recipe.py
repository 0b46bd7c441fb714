from pathlib import Path

import pytest

from vepatch.errors import UsageError
from vepatch.recipe import Recipe, check_recipe, dump_recipe, load_recipe, with_overrides


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("apply:\n  shots: 4\n  lr: 0.01\ndiagnose:\n  heads_per_layer: 3\n")
    recipe = load_recipe(path)
    assert recipe.apply.shots == 4 and recipe.apply.lr == 0.01
    assert recipe.apply.epochs == Recipe().apply.epochs  # untouched keys keep defaults
    flagged = with_overrides(recipe, {"apply.shots": 16, "apply.lr": None, "diagnose.heads_per_layer": None})
    assert flagged.apply.shots == 16  # a flag wins
    assert flagged.apply.lr == 0.01  # an unset flag (None) never overrides
    assert flagged.diagnose.heads_per_layer == 3


def test_unknown_key_is_an_error_with_did_you_mean(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("apply:\n  shtos: 4\n")
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert "unknown key 'shtos'" in str(info.value) and "did you mean 'shots'" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text,where", [
    ("apply:\n  shots: many\n", "apply.shots"),
    ("apply:\n  lr: [1]\n", "apply.lr"),
    ("classes: nominal\n", "classes"),
    ("guard:\n  suites:\n    - name: x\n", "guard.suites[0]"),
    # numbers out of range, checked with the types
    ("apply:\n  shots: 0\n", "apply.shots: 0 is out of range"),
    ("apply:\n  shots: -3\n", "apply.shots: -3 is out of range"),
    ("apply:\n  epochs: 0\n", "apply.epochs: 0 is out of range"),
    ("guard:\n  strengths: []\n", "guard.strengths: is empty"),
    ("guard:\n  strengths: [0.5, 2]\n", "guard.strengths: 2.0 is out of range"),
    ("cycle:\n  holdout_share: 1.0\n", "cycle.holdout_share: 1.0 is out of range"),
    ("guard:\n  suites:\n    - {path: x, max_drop_pp: -1}\n", "guard.suites[0].max_drop_pp"),
    # guard suite names: unique, and not a holdout's
    ("guard:\n  suites:\n    - {path: a/val}\n    - {path: b/val}\n", "a/val and b/val are both named 'val'"),
    ("guard:\n  suites:\n    - {path: builtin:digits}\n    - {path: x, name: digits}\n", "both named 'digits'"),
    ("guard:\n  suites:\n    - {path: x, name: v2-holdout}\n", "reserved for holdouts"),
    # per-method learning rates: registered methods, rates above 0
    ("apply:\n  method_lr: {lorsa: 0.001}\n", "apply.method_lr: lorsa: 0.001 is not a method"),
    ("apply:\n  method_lr: {lora: 0}\n", "apply.method_lr: lora: 0"),
])
def test_a_bad_recipe_is_refused_naming_the_file_and_the_place(tmp_path, text, where):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert where in str(info.value) and str(path) in str(info.value)


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = with_overrides(Recipe(classes=["a", "b"]), {"apply.rank": 4})
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_a_learning_rate_comes_from_apply_lr_then_method_lr_then_the_method():
    from vepatch.methods import get
    from vepatch.recipe import ApplySpec

    tuned = {"lora": 3e-4}
    assert ApplySpec(method="lora", method_lr=tuned).learning_rate == 3e-4
    assert ApplySpec(method="lorsu", method_lr=tuned).learning_rate == get("lorsu").lr
    assert ApplySpec(method="lora", lr=1e-2, method_lr=tuned).learning_rate == 1e-2  # --lr wins


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("apply: [\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(UsageError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,where,hint", [
    ("apply:\n  method: lorsa\n", "apply.method 'lorsa'", "did you mean 'lora'"),
    ("apply:\n  loss: contrastiv\n", "apply.loss", "did you mean 'contrastive'"),
    ("diagnose:\n  control: randm\n", "diagnose.control", "did you mean 'random'"),
])
def test_choices_are_checked_against_their_one_list(tmp_path, text, where, hint):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    assert where in str(info.value) and hint in str(info.value) and str(path) in str(info.value)


def test_every_registered_method_is_offered_by_the_cli_and_has_its_own_file():
    from pathlib import Path

    from typer.testing import CliRunner

    import vepatch.methods as methods
    from vepatch.cli import app

    files = {p.stem for p in Path(methods.__file__).parent.glob("*.py")} - {"__init__", "method", "trainable", "train", "prompting"}
    assert {m.replace("-", "_").replace("+", "_") for m in methods.names()} == files
    help_text = " ".join(CliRunner().invoke(app, ["apply", "--help"], env={"COLUMNS": "400"}).output.split())
    for name in methods.names():
        assert name in help_text


def test_out_of_range_flags_are_refused_before_anything_runs():
    with pytest.raises(UsageError, match="apply.shots: 0 is out of range"):
        with_overrides(Recipe(), {"apply.shots": 0})


def test_every_shipped_recipe_loads_and_checks():
    shipped = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert shipped, "recipes/ has no recipe"
    for path in shipped:
        check_recipe(load_recipe(path), where=f"{path}:")
