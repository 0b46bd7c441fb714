"""Run a model over a labelled set: per-example predictions, accuracy, recall, confusion."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import ImageSet, TorchImages
from .models import LoadedModel
from .passes import Predictions, SuiteInputs
from .records import EvalReport


def loader(image_set: ImageSet, preprocess, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    workers = 0
    return DataLoader(
        TorchImages(image_set, preprocess), batch_size=batch_size, shuffle=shuffle,
        num_workers=workers, generator=generator, persistent_workers=False,
    )


def predict(loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, batch_size: int = 64, device: str = "cpu") -> Predictions:
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
