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
    from vepatch.recipe import GuardSpec, ModelSpec, Recipe
    from vepatch.workspace import init_workspace

    def make(bundle: Path, **fields) -> Path:
        # a recipe without guard suites promotes only when it says so (guard.allow_unguarded)
        fields.setdefault("guard", GuardSpec(allow_unguarded=True))
        recipe = Recipe(model=ModelSpec(ref=f"local-dir:{bundle}"), classes=list(tiny.CLASSES), **fields)
        root = tmp_path / "ws"
        init_workspace(root, recipe)
        return root

    return make


@pytest.fixture(scope="session")
def fitted_bundle(tmp_path_factory):
    """The tiny ViT fitted to the tiny classes (so that harm can be seen), as a bundle."""
    import torch

    from vepatch.data import open_image_set
    from vepatch.evaluate import loader
    from vepatch.models.heads import compute_text_head
    from vepatch.losses import ce_loss
    from vepatch.models import load_model

    folder = tmp_path_factory.mktemp("fitted")
    loaded = load_model(f"local-dir:{tiny.build_bundle(folder / 'start', 'vit', seed=0)}")
    train = open_image_set(tiny.make_folder(folder / "train", 16, seed=1))
    head = compute_text_head(loaded, train.classnames, ["a photo of a {}."])
    scale = loaded.model.logit_scale.exp().detach()
    torch.manual_seed(0)
    opt = torch.optim.Adam(loaded.model.visual.parameters(), 1e-3)
    for epoch in range(30):
        for x, y in loader(train, loaded.preprocess, 16, shuffle=True, seed=epoch):
            loss = ce_loss(loaded.model.encode_image(x), head, scale, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tiny.build_bundle(folder / "bundle", "vit", state=loaded.model.state_dict())
