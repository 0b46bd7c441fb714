"""`vepatch bench --base-new`: the CoOp family's base-to-new protocol for any patch method.

The recipe's classes are split as CoOp splits them: the first half of the list (rounded up) is
*base*, the rest *new*. Each method trains on shots of the base classes only, with only their
names in its head, in a workspace of its own; then base accuracy (the base holdout, over the
base classes) and new accuracy (every shot-pool image of the new classes, over the new classes)
are measured before and after, with their harmonic mean H. A patch that learns its trained
classes by overwriting what the tower knew of others shows it as a lower new accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import clock, store
from ._typed import to_plain
from .context import Context, absolute_paths
from .data import ImageSet, Sample, open_holdout, open_image_set
from .delta import apply_delta, restore
from .errors import UsageError
from .evaluate import predict
from .fsio import write_text_atomic
from .models.heads import text_head
from .recipe import DataSpec, GuardSpec


@dataclass(frozen=True)
class BaseNewRun:
    method: str
    seed: int
    candidate_id: str
    base_before: float  # accuracy on the base holdout, over the base classes
    base_after: float
    new_before: float  # accuracy on the new classes' images, over the new classes
    new_after: float

    @property
    def h_before(self) -> float:
        return harmonic_mean(self.base_before, self.new_before)

    @property
    def h_after(self) -> float:
        return harmonic_mean(self.base_after, self.new_after)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def split_classes(classes: list[str], where: str) -> tuple[list[str], list[str]]:
    """CoOp's split: the first half of the class list (rounded up) is base, the rest new."""
    if len(classes) < 4:
        raise UsageError(f"{where}: base-to-new needs at least 4 classes (2 base, 2 new); the recipe has {len(classes)}",
                         "use a target with more classes, e.g. a 10-class one")
    k = (len(classes) + 1) // 2
    return classes[:k], classes[k:]


def bench_base_new(ctx: Context, methods: list[str], seeds: list[int], shots: int, extra: list[str],
                   progress: Optional[Callable[[int, int], None]] = None) -> tuple[Path, dict, str]:
    """Every method x seed trained on the base classes; results in .vepatch/bench/<utc>-base-new/.
    Returns the folder, the result (as base-new.json holds it) and its markdown table."""
    from .bench import apply_in_subprocess
    from .workspace import Workspace, init_workspace

    recipe = ctx.recipe
    base, new = split_classes(list(recipe.classes), str(ctx.workspace.recipe_path))
    if recipe.shot_pool is None:
        raise UsageError(f"{ctx.workspace.recipe_path}: base-to-new needs a shot_pool", "set shot_pool.path to a labelled folder")
    spec = recipe.shot_pool
    pool = open_image_set(ctx.resolve(spec.path), recipe.classes, spec.folders, spec.name or "pool", spec.max_per_class, recipe.seed)
    if pool.dataset is not None:
        raise UsageError(f"{spec.path}: base-to-new reads an image-folder shot pool", "save the pool as <class>/*.png folders")
    folder = ctx.workspace.bench / f"{clock.stamp()}-base-new"
    base_pool = _base_pool(pool, base, folder / "base-pool")
    sub_recipe = dataclasses.replace(absolute_paths(ctx, recipe), classes=base, shot_pool=DataSpec(path=str(base_pool), name="base"),
                                     guard=GuardSpec())  # no guard suites: base and new are what is measured
    root = folder / "workspace"
    init_workspace(root, sub_recipe)
    sub = Context(Workspace(root.resolve()), sub_recipe, ctx.device)
    parent, _ = sub.model()
    new_set = ImageSet("new", pool.root, new, [Sample(s.source, new.index(pool.classnames[s.label]))
                                               for s in pool.samples if pool.classnames[s.label] in new])
    def halves() -> dict[str, torch.Tensor]:
        """Each half's head as the model's text side makes it now (a prompt patch changes it)."""
        return {"base": text_head(parent, base, recipe.templates), "new": text_head(parent, new, recipe.templates)}

    heads = halves()
    bs, device = recipe.batch_size, ctx.device
    new_before = predict(parent, heads["new"], new_set, bs, device).accuracy
    runs, total = [], len(methods) * len(seeds)
    for seed in seeds:
        for method in methods:
            manifest = apply_in_subprocess(sub.workspace.root, method, seed, shots, extra)
            _, delta = store.read_candidate(sub.workspace, manifest.candidate_id)
            base_holdout = open_holdout(manifest.holdout, sub.workspace.root)
            base_before = predict(parent, heads["base"], base_holdout, bs, device).accuracy
            originals = apply_delta(parent.model, delta)
            try:  # a prompt patch changes what the text side makes of both halves' names
                after = halves() if delta.touches_text else heads
                base_after = predict(parent, after["base"], base_holdout, bs, device).accuracy
                new_after = predict(parent, after["new"], new_set, bs, device).accuracy
            finally:
                restore(parent.model, originals)
            runs.append(BaseNewRun(method, seed, manifest.candidate_id, base_before, base_after, new_before, new_after))
            result, table = write_base_new(folder, base, new, runs)  # after every run: a bench stopped midway keeps what it finished
            if progress:
                progress(len(runs), total)
    ctx.workspace.log("bench-base-new", folder=str(folder), methods=methods, seeds=len(seeds))
    return folder, result, table


def _base_pool(pool: ImageSet, base: list[str], out: Path) -> Path:
    """The base classes' images as a folder of their own: hard links where the file system
    allows (no copy, and no symbolic link the reader would refuse), copies elsewhere."""
    for s in pool.samples:
        name = pool.classnames[s.label]
        if name not in base:
            continue
        src = Path(s.source)
        dst = out / name.replace(" ", "_") / f"{src.parent.name}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return out


def write_base_new(folder: Path, base: list[str], new: list[str], runs: list[BaseNewRun]) -> tuple[dict, str]:
    result = {"base": base, "new": new, "runs": [{**to_plain(r), "h_before": r.h_before, "h_after": r.h_after} for r in runs]}
    table = base_new_markdown(base, new, runs)
    write_text_atomic(folder / "base-new.json", json.dumps(result, indent=2))
    write_text_atomic(folder / "base-new.md", table)
    return result, table


def base_new_markdown(base: list[str], new: list[str], runs: list[BaseNewRun]) -> str:
    """Per method, the mean over seeds of base, new and H, before -> after."""
    lines = [f"base: {', '.join(base)}; new: {', '.join(new)}", "",
             "| method | seeds | base % | new % | H % |", "|---|---|---|---|---|"]

    def mean(xs: list[float]) -> float:
        return 100 * sum(xs) / len(xs)

    for method in dict.fromkeys(r.method for r in runs):
        rs = [r for r in runs if r.method == method]
        cells = [f"{mean([getattr(r, f + '_before') for r in rs]):.1f} → {mean([getattr(r, f + '_after') for r in rs]):.1f}"
                 for f in ("base", "new", "h")]
        lines.append(f"| {method} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
