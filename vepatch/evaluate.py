"""Run a model over a labelled set: per-example predictions, accuracy, recall, confusion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import ImageSet, TorchImages
from .models import LoadedModel
from .records import EvalReport


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (n,) true class indices
    preds: np.ndarray  # (n,) predicted class indices

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.preds

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.labels) else 0.0


def loader(image_set: ImageSet, preprocess, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    workers = 0
    return DataLoader(
        TorchImages(image_set, preprocess), batch_size=batch_size, shuffle=shuffle,
        num_workers=workers, generator=generator, persistent_workers=False,
    )


def predict(loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, batch_size: int = 64, device: str = "cpu") -> Predictions:
    """Per-example predictions; on CUDA out of memory, retried with half the batch."""
    from .oom import retry_on_oom

    return retry_on_oom(lambda bs: _predict(loaded, head, image_set, bs, device), batch_size, f"evaluating {image_set.name}")


def _predict(loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, batch_size: int, device: str) -> Predictions:
    model = loaded.model.to(device).eval()
    labels, preds = [], []
    for images, y in loader(image_set, loaded.preprocess, batch_size):
        with torch.no_grad():
            features = model.encode_image(images.to(device), normalize=True).float()
            logits = features @ head.to(device).T
        preds.append(logits.argmax(1).cpu())
        labels.append(y)
    if not labels:
        return Predictions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return Predictions(torch.cat(labels).numpy(), torch.cat(preds).numpy())


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
