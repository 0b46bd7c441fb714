"""Forward passes over a labelled image set, batch by batch, with what does not change between
passes computed once.

A `SuiteInputs` fixes a set's batches (order and size) once. Each batch's input at an *entry*
module is kept in memory after the first pass computes it, within a byte budget:
  entry ''         the preprocessed images (decoded once instead of once per pass)
  entry a module   the activations entering that block (`Tower.entry_for`): when a patch
                   leaves every earlier module untouched, each later pass runs only the rest
                   of the tower, for the baseline and for every strength alike.
  entry FEATURES   the normalized image features themselves: a patch that leaves the whole
                   vision tower untouched (a prompt patch) reads every image once.
The rest of the tower is run by the model's own forward: a pre-hook on the entry module swaps
in the kept activations, and what comes before it runs on a one-image stand-in. Predictions are
bit-identical to a plain pass (tests/test_passes.py).

Under torch.distributed (see distributed.py) each rank runs every world-th batch and the
per-example predictions are gathered, so every rank holds the single-process result.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import default_collate

from .. import progress
from ..data import ImageSet, TorchImages
from . import distributed

DEFAULT_BUDGET_BYTES = 2 << 30  # activations kept per guard run, across suites
FEATURES = "#features"  # the entry past the whole tower: its output is what is kept


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


@dataclass(frozen=True)
class Scores:
    """Per-example numbers in (0, 1], higher = better, where a suite measures more than right
    or wrong (a captioning suite: each image's caption likelihood, captioning.py). `accuracy` is
    their mean, so a guard row, its change in pp and the mean guard change read it as they read
    an accuracy; the paired test is another (captioning.drop_p)."""

    labels: np.ndarray  # (n,) what each example is about (a captioning suite: its caption's index)
    values: np.ndarray  # (n,) float64

    @property
    def accuracy(self) -> float:
        return float(self.values.mean()) if len(self.values) else 0.0


Measured = Union[Predictions, Scores]  # what a guard pass gives per suite


def outputs(measured: Measured) -> np.ndarray:
    """What each example came out as: its predicted class, or its score."""
    return measured.values if isinstance(measured, Scores) else measured.preds


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


class Budget:
    """Bytes that SuiteInputs may still keep (shared by the suites of one run)."""

    def __init__(self, nbytes: int):
        self.left = nbytes

    def take(self, t: torch.Tensor) -> bool:
        size = t.numel() * t.element_size()
        if size > self.left:
            return False
        self.left -= size
        return True

    def give(self, t: torch.Tensor) -> None:
        self.left += t.numel() * t.element_size()


class SuiteInputs:
    """One labelled set cut into fixed batches, with each batch's input at `entry` kept once
    computed (while `budget` allows)."""

    def __init__(self, images: ImageSet, preprocess, batch_size: int, entry: str = "", budget: Optional[Budget] = None):
        self.images, self.preprocess, self.entry = images, preprocess, entry
        self.budget = budget or Budget(0)
        self.labels = np.array(images.labels, dtype=np.int64)
        self.stand_in: Optional[torch.Tensor] = None  # one image, for what runs before the entry
        self.kept: dict[int, torch.Tensor] = {}  # batch index -> its input at the entry
        self._batch(batch_size)

    def _batch(self, batch_size: int) -> None:
        """(Re)cut the set into batches; anything kept for the old cut is let go."""
        self.batch_size, n = max(1, batch_size), len(self.images)
        self.bounds = [(i, min(n, i + self.batch_size)) for i in range(0, n, self.batch_size)]
        for t in self.kept.values():
            self.budget.give(t)
        self.kept = {}

    def _decode(self, b: int) -> torch.Tensor:
        data = TorchImages(self.images, self.preprocess)
        start, stop = self.bounds[b]
        return default_collate([data[i] for i in range(start, stop)])[0]

    def _entry_input(self, model, b: int, device: str) -> torch.Tensor:
        if b in self.kept:
            return self.kept[b].to(device)
        x = self._decode(b).to(device)
        if self.stand_in is None:
            self.stand_in = x[:1].cpu()
        if self.entry:
            with autocast(device):
                x = capture(model, self.entry, x)
        if self.budget.take(x):
            self.kept[b] = x.cpu()  # the same tensor when already on the CPU
        return x

    def features(self, model, b: int, device: str) -> torch.Tensor:
        """Normalized image features of batch b under the model's current weights."""
        x = self._entry_input(model, b, device)
        with autocast(device):
            return run_from(model, self.entry, x, self.stand_in.to(device))

    def tower_output(self, model, b: int, device: str):
        """What the vision tower itself returns for batch b (a CoCa's: pooled features and the
        image tokens its decoder reads), under the model's current weights."""
        if self.entry == FEATURES:
            raise ValueError("kept features hold no tower output: read the suite from another entry")
        x = self._entry_input(model, b, device)
        with autocast(device):
            return run_from(model, self.entry, x, self.stand_in.to(device), tower=True)

    def predict(self, model, head: torch.Tensor, device: str) -> Predictions:
        """Predicted class per example (argmax of normalized features @ head.T)."""
        head = head.to(device)
        parts = self.per_batch(model, device, lambda b: (self.features(model, b, device).float() @ head.T).argmax(1).cpu().numpy())
        preds = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return Predictions(self.labels, preds.astype(np.int64))

    def embed(self, model, device: str) -> torch.Tensor:
        """(n, dim) normalized image features, float32 on the CPU (what retrieval ranks)."""
        parts = self.per_batch(model, device, lambda b: self.features(model, b, device).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def per_batch(self, model, device: str, one: Callable[[int], Any]) -> list:
        """`one(b)` of every batch b in order (in inference mode), gathered from every rank; on
        CUDA out of memory, the batches are halved and the pass starts again."""
        from .oom import retry_on_oom

        def attempt(batch_size: int) -> list:
            if batch_size != self.batch_size:
                self._batch(batch_size)
            return self._run(model, device, one)

        return retry_on_oom(attempt, self.batch_size, f"evaluating {self.images.name}")

    @torch.inference_mode()
    def _run(self, model, device: str, one: Callable[[int], Any]) -> list:
        model = model.to(device).eval()
        local = {}
        for b in distributed.my_share(len(self.bounds)):
            local[b] = one(b)
            progress.advance((self.bounds[b][1] - self.bounds[b][0]) * distributed.world_size())  # every rank does the same share
        gathered = distributed.gather_dict(local)
        return [gathered[b] for b in range(len(self.bounds))]


def autocast(device: str):
    """bf16 on CUDA (tensor cores; baseline and candidate alike), full precision on the CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def capture(model, entry: str, x: torch.Tensor) -> torch.Tensor:
    """The input of module `entry` for images `x` (only what comes before it runs)."""
    if entry == FEATURES:
        return model.encode_image(x, normalize=True)
    seen = []

    def hook(_module, args, kwargs):
        seen.append(args[0] if args else next(iter(kwargs.values())))
        raise _Stop

    handle = model.get_submodule(entry).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):  # the hook stops the pass once it has the input
            model.encode_image(x, normalize=True)
    finally:
        handle.remove()
    return seen[0]


def run_from(model, entry: str, x: torch.Tensor, stand_in: torch.Tensor, tower: bool = False):
    """Normalized image features (`tower`: what the vision tower returns), given `x` = the
    input of `entry` ('' = the images)."""
    forward = model.visual if tower else (lambda images: model.encode_image(images, normalize=True))
    if not entry:
        return forward(x)
    if entry == FEATURES:
        return x

    def hook(_module, args, kwargs):
        if args:
            return (x, *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: x}

    handle = model.get_submodule(entry).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return forward(stand_in)
    finally:
        handle.remove()
