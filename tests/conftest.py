import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def vepatch_home(tmp_path_factory):
    """Every run keeps user state (model cache, text heads) in a temp folder."""
    home = tmp_path_factory.mktemp("vepatch-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("VEPATCH_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory):
    return tiny.build_bundle(tmp_path_factory.mktemp("vit"), "vit", seed=0)


@pytest.fixture(scope="session")
def cnn_bundle(tmp_path_factory):
    return tiny.build_bundle(tmp_path_factory.mktemp("cnn"), "cnn", seed=0)


@pytest.fixture
def make_workspace(tmp_path):
    """A workspace on a tiny model with the tiny classes; returns its folder."""
    from vepatch.recipe import ModelSpec, Recipe
    from vepatch.workspace import init_workspace

    def make(bundle: Path, **fields) -> Path:
        recipe = Recipe(model=ModelSpec(ref=f"local-dir:{bundle}"), classes=list(tiny.CLASSES), **fields)
        root = tmp_path / "ws"
        init_workspace(root, recipe)
        return root

    return make
