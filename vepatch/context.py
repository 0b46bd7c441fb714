"""What every command starts from: the workspace, its recipe (flags applied), the device, and
the model at any version (base, vN, a candidate), loaded once per command and verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .data import ImageSet, open_image_set
from .errors import DataError, UsageError
from .runtime import distributed
from .models import LoadedModel, load_model, resolve_device
from .recipe import DEFAULT_TEMPLATES, GuardSuite, Recipe, with_overrides
from .workspace import Workspace, find_workspace


@dataclass
class Context:
    workspace: Optional[Workspace]
    recipe: Recipe
    device: str
    _models: dict[str, LoadedModel] = field(default_factory=dict)

    def base(self) -> LoadedModel:
        if "base" not in self._models:
            spec = self.recipe.model
            self._models["base"] = self._on_device(load_model(spec.ref, self._pretrained(), online=spec.online))
        return self._models["base"]

    def _on_device(self, loaded: LoadedModel) -> LoadedModel:
        """Every model a command uses lives on the context's device, moved once, here."""
        loaded.model.to(self.device)
        return loaded

    def base_fingerprint(self) -> str:
        return self.base().fingerprint

    def model(self, version: Optional[str] = None) -> tuple[LoadedModel, str]:
        """The model at `version`: 'base', 'vN', a candidate id, or (default) the current HEAD."""
        from . import store

        name = version or (store.head(self.workspace) if self.workspace else "base")
        if name in self._models:
            return self._models[name], name
        if name == "base":
            return self.base(), name
        if self.workspace is None:
            raise UsageError(f"'{name}' needs a workspace", "run inside a workspace or pass -C DIR")
        fresh = load_model(self.recipe.model.ref, self._pretrained(), online=self.recipe.model.online)
        if store.VERSION_RE.match(name):
            loaded = store.apply_version(self.workspace, fresh, name)
        else:
            from .delta import apply_delta
            from .models.load import model_fingerprint

            manifest, delta = store.read_candidate(self.workspace, name)
            loaded = store.apply_version(self.workspace, fresh, manifest.parent)
            apply_delta(loaded.model, delta)
            loaded.fingerprint = model_fingerprint(loaded.model)
        self._models[name] = self._on_device(loaded)
        return loaded, name

    def prediction_cache(self):
        """Per-example predictions kept across runs (predcache.py); None outside a workspace."""
        from .runtime.predcache import PredictionCache

        return PredictionCache(self.workspace.prediction_cache) if self.workspace else None

    def _pretrained(self) -> str:
        spec = self.recipe.model
        return str(self.workspace.resolve(spec.pretrained)) if spec.pretrained and self.workspace else spec.pretrained

    def resolve(self, path: str | Path) -> Path:
        """A recipe path: relative to the workspace, `pkg:` inside a package, `builtin:` a suite
        written into the workspace on first use."""
        if str(path).startswith("builtin:"):
            from .suites import materialize

            if self.workspace is None:
                raise UsageError(f"{path}: built-in suites live in a workspace", "run inside a workspace or pass -C DIR")
            name = str(path).removeprefix("builtin:")
            return materialize(name, self.workspace.builtin_suite(name))
        return self.workspace.resolve(str(path)) if self.workspace else Path(path)


def open_context(
    workspace: Optional[Path] = None, model: Optional[str] = None, device: Optional[str] = None,
    online: bool = False, required: bool = True,
) -> Context:
    """Find the workspace (or, with required=False, run on recipe defaults outside one)."""
    try:
        ws = find_workspace(workspace)
        recipe = ws.recipe()
    except UsageError:
        if required or workspace is not None:
            raise
        ws, recipe = None, Recipe()
    recipe = with_overrides(recipe, {"model.ref": model, "model.online": online or None, "apply.device": device})
    return Context(ws, recipe, distributed.init_from_env(resolve_device(recipe.apply.device)))


def absolute_paths(ctx: Context, recipe: Recipe) -> Recipe:
    """`recipe` with every data path resolved against `ctx`'s workspace, for a workspace of
    its own elsewhere (bench --stream, bench --base-new); its inbox is that workspace's."""
    import dataclasses

    def fix(spec):
        return None if spec is None else dataclasses.replace(spec, path=str(ctx.resolve(spec.path).resolve()))

    guard = dataclasses.replace(recipe.guard, suites=[fix(s) for s in recipe.guard.suites])
    model = recipe.model
    if model.pretrained:
        model = dataclasses.replace(model, pretrained=str(ctx.resolve(model.pretrained).resolve()))
    return dataclasses.replace(recipe, guard=guard, shot_pool=fix(recipe.shot_pool), reference=fix(recipe.reference),
                               model=model, inbox="inbox")


def open_target_set(ctx: Context, path: Path, name: str = "") -> ImageSet:
    """A set labelled with the recipe's target classes (errors/, inbox/, shot pool)."""
    classes = ctx.recipe.classes or None
    return open_image_set(path, classes, name=name or path.name, seed=ctx.recipe.seed)


def open_guard_suite(ctx: Context, spec: GuardSuite) -> ImageSet:
    """A guard suite of the recipe, with its own classes (or its folder names)."""
    path = ctx.resolve(spec.path)
    if not path.exists():
        name = spec.label
        fix = ("apt-get install dataset-fashion-mnist (Debian), or mark the suite `optional: true`"
               if spec.path == "builtin:fashion-mnist" else
               f"put a labelled folder there (e.g. python examples/prepare_guards.py {ctx.workspace.root if ctx.workspace else 'WS'}), "
               "use a built-in suite (path: builtin:digits), or mark it `optional: true`")
        raise DataError(f"guard suite '{name}': {path} is not there", fix)
    if spec.kind in ("retrieval", "captioning"):  # images with captions, read one way (retrieval.py)
        from .retrieval import open_caption_set

        return open_caption_set(path, spec.label, spec.kind)
    return open_image_set(path, spec.classes or None, spec.folders, spec.label, spec.max_per_class, ctx.recipe.seed)


def set_and_templates(ctx: Context, data: Path, templates: Optional[Sequence[str]] = None) -> tuple[ImageSet, list[str]]:
    """Open a labelled set with the classes and templates that fit it: a guard suite of the
    recipe uses its own; a folder whose classes are the recipe's uses the recipe's; anything
    else uses its own folder names."""
    recipe = ctx.recipe
    resolved = data.resolve()
    for suite in recipe.guard.suites:
        if ctx.resolve(suite.path).resolve() == resolved:
            return open_guard_suite(ctx, suite), list(templates or suite.templates)
    own = open_image_set(resolved, None, name=data.name, seed=recipe.seed)
    keys = {c.lower() for c in recipe.classes}
    if recipe.classes and all(c.lower() in keys for c in own.classnames):
        return open_target_set(ctx, resolved, data.name), list(templates or recipe.templates)
    if len(own.classnames) == 1:  # one foreign class would score 100% whatever the model does
        raise DataError(f"{resolved}: its only class folder '{own.classnames[0]}' is not one of the recipe's classes",
                        f"rename it to one of: {', '.join(recipe.classes)}" if recipe.classes else
                        "a set to evaluate needs at least two class folders")
    return own, list(templates or DEFAULT_TEMPLATES)  # the recipe's prompts are for its own classes
