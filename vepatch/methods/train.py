"""The training loop: one flat loop over epochs and batches, read top to bottom."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..data import ImageSet
from ..evaluate import loader
from ..losses import ce_loss, contrastive_loss, distill_loss
from ..passes import autocast as autocast_for
from ..recipe import ApplySpec
from .trainable import Trainable


@dataclass(frozen=True)
class TrainStats:
    steps: int
    final_loss: float
    seconds: float
    peak_memory_mb: float  # CUDA peak allocated, or the process's peak RSS on CPU


def lr_at(step: int, total: int, base: float) -> float:
    """Cosine from `base` to base/10 over `total` steps, stepped per optimizer step."""
    progress = step / max(1, total - 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    trainable: Trainable, preprocess, shots: ImageSet, head: torch.Tensor, scale: torch.Tensor,
    spec: ApplySpec, seed: int, device: str, prompt_embeddings: Optional[torch.Tensor] = None,
    reference: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> TrainStats:
    """Train `trainable.params` on the shots. `reference` = (images, parent logits, head) for
    distillation to the parent; `prompt_embeddings` (classes, templates, dim) for the
    contrastive loss."""
    torch.manual_seed(seed)
    visual = trainable.visual.to(device).eval()  # eval: BatchNorm statistics never move
    head, scale = head.to(device), scale.to(device)
    optimizer = torch.optim.Adam(trainable.params, lr=spec.learning_rate)
    batches_per_epoch = math.ceil(len(shots) / spec.batch_size)
    total = spec.epochs * batches_per_epoch
    generator = torch.Generator().manual_seed(seed)
    autocast = autocast_for(device)  # bf16 on CUDA
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, step, loss = time.perf_counter(), 0, torch.zeros(())
    for epoch in range(spec.epochs):
        for images, labels in loader(shots, preprocess, spec.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, spec.learning_rate)
            images, labels = images.to(device), labels.to(device)
            with autocast:
                features = visual(images)
            if spec.loss == "contrastive":
                loss = contrastive_loss(features, prompt_embeddings.to(device), scale, labels, generator)
            else:
                loss = ce_loss(features, head, scale, labels)
            if spec.l2:
                loss = loss + spec.l2 * trainable.l2()
            if spec.distill and reference is not None:
                ref_images, ref_logits, ref_head = reference
                pick = torch.randint(len(ref_images), (min(spec.batch_size, len(ref_images)),), generator=generator)
                with autocast:
                    ref_features = visual(ref_images[pick].to(device))
                loss = loss + spec.distill * distill_loss(ref_features, ref_logits[pick].to(device), ref_head.to(device), scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trainable.after_step()
            step += 1
            if progress:
                progress(step, total)
    return TrainStats(step, float(loss.detach()), time.perf_counter() - start, peak_memory_mb(device))


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
