"""Run a model over a labelled set: per-example predictions, accuracy, recall, confusion
(`vepatch eval`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pathlib import Path
from typing import Optional, Sequence

from . import progress
from .context import Context, set_and_templates
from .data import ImageSet, TorchImages
from .models import LoadedModel
from .models.heads import text_head
from .records import CaptioningReport, EvalReport, RetrievalReport
from .runtime.passes import Predictions, SuiteInputs


def loader(image_set: ImageSet, preprocess, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    workers = 0
    return DataLoader(
        TorchImages(image_set, preprocess), batch_size=batch_size, shuffle=shuffle,
        num_workers=workers, generator=generator, persistent_workers=False,
    )


def predict(loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, batch_size: int, device: str) -> Predictions:
    """Per-example predictions, one plain pass (nothing kept)."""
    return SuiteInputs(image_set, loaded.preprocess, batch_size).predict(loaded.model, head, device)


def report(predictions: Predictions, image_set: ImageSet, version: str) -> EvalReport:
    k = len(image_set.classnames)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (predictions.labels, predictions.preds), 1)
    per_n = confusion.sum(1)
    recall = np.divide(np.diag(confusion), per_n, out=np.zeros(k), where=per_n > 0)
    return EvalReport(
        set_name=image_set.name,
        version=version,
        classnames=list(image_set.classnames),
        n=int(len(predictions.labels)),
        accuracy=predictions.accuracy,
        per_class_recall=[float(r) for r in recall],
        per_class_n=[int(n) for n in per_n],
        confusion=confusion.tolist(),
        skipped=list(image_set.skipped),
    )


def evaluate_set(ctx: Context, data: Path, version: Optional[str] = None, templates: Optional[Sequence[str]] = None,
                 batch_size: Optional[int] = None) -> EvalReport:
    """`vepatch eval`: a version's accuracy, recall and confusions on a labelled set."""
    image_set, templates = set_and_templates(ctx, data, templates)
    loaded, name = ctx.model(version)
    head = text_head(loaded, image_set.classnames, templates)
    progress.begin("eval", len(image_set))
    predictions = predict(loaded, head, image_set, batch_size or ctx.recipe.batch_size, ctx.device)
    # outside a workspace there are no versions: name the model by its reference (an exported bundle is not "base")
    result = report(predictions, image_set, name if ctx.workspace else ctx.recipe.model.ref)
    if ctx.workspace:
        ctx.workspace.log("eval", data=str(data), version=name, accuracy=result.accuracy, n=result.n)
    return result


def retrieval_set(ctx: Context, data: Path) -> Optional[ImageSet]:
    """`data` opened as a retrieval set (a recipe suite of kind retrieval, or a folder of
    images with same-named .txt captions); None when it is a labelled set."""
    from .context import open_guard_suite
    from .retrieval import is_caption_folder, open_caption_set

    resolved = data.resolve()
    for suite in ctx.recipe.guard.suites:
        if suite.kind == "retrieval" and ctx.resolve(suite.path).resolve() == resolved:
            return open_guard_suite(ctx, suite)
    return open_caption_set(resolved, data.name) if is_caption_folder(resolved) else None


def captioning_set(ctx: Context, data: Path) -> Optional[ImageSet]:
    """`data` opened as a captioning suite of the recipe (kind: captioning); None otherwise (a
    caption folder outside the recipe is read as a retrieval set)."""
    from .context import open_guard_suite

    resolved = data.resolve()
    for suite in ctx.recipe.guard.suites:
        if suite.kind == "captioning" and ctx.resolve(suite.path).resolve() == resolved:
            return open_guard_suite(ctx, suite)
    return None


def evaluate_captioning(ctx: Context, images: ImageSet, version: Optional[str] = None,
                        batch_size: Optional[int] = None) -> CaptioningReport:
    """`vepatch eval` on a captioning suite: the mean likelihood of its captions (a CoCa's)."""
    from .captioning import mean_likelihood, require_suite_model

    loaded, name = ctx.model(version)
    require_suite_model(loaded, images.name)
    progress.begin("eval", len(images))
    value = mean_likelihood(loaded, images, batch_size or ctx.recipe.batch_size, ctx.device)
    result = CaptioningReport(images.name, name if ctx.workspace else ctx.recipe.model.ref, len(images),
                              len(images.classnames), value, list(images.skipped))
    if ctx.workspace:
        ctx.workspace.log("eval", data=images.root, version=name, caption_likelihood=value, n=result.images)
    return result


def evaluate_retrieval(ctx: Context, images: ImageSet, version: Optional[str] = None,
                       batch_size: Optional[int] = None) -> RetrievalReport:
    """`vepatch eval` on a retrieval set: image->text and text->image Recall@1/5."""
    from .retrieval import recalls

    loaded, name = ctx.model(version)
    progress.begin("eval", len(images))
    rows = recalls(loaded, images, batch_size or ctx.recipe.batch_size, ctx.device)
    result = RetrievalReport(images.name, name if ctx.workspace else ctx.recipe.model.ref, len(images),
                             len(images.classnames), {k.removeprefix(images.name).strip(): v for k, v in rows.items()},
                             list(images.skipped))
    if ctx.workspace:
        ctx.workspace.log("eval", data=images.root, version=name, recall=result.recall, n=result.images)
    return result
