"""The training loop: one flat loop over epochs and batches, read top to bottom, and the one
step it takes (the speed tool times the same `train_step`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..captioning import CaptionTarget, split_output
from ..data import ImageSet
from ..evaluate import loader
from ..losses import batch_classes_ce_loss, ce_loss, contrastive_loss, distill_loss
from ..records import ApplyStats
from ..recipe import ApplySpec
from ..runtime.passes import autocast as autocast_for
from .trainable import Trainable


@dataclass(frozen=True)
class Objective:
    """What a step's loss is computed against (all frozen)."""

    head: torch.Tensor  # (classes, dim) class-text embeddings
    scale: torch.Tensor  # the model's logit scale
    prompts: Optional[torch.Tensor] = None  # (classes, templates, dim), for the contrastive loss
    reference: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (images, parent logits, head): distillation
    captions: Optional[CaptionTarget] = None  # the class captions and the CoCa's frozen decoder: apply.loss cafe

    def to(self, device: str) -> "Objective":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        ref = None if self.reference is None else (self.reference[0], self.reference[1].to(device), self.reference[2].to(device))
        return Objective(self.head.to(device), self.scale.to(device), move(self.prompts), ref, move(self.captions))


def lr_at(step: int, total: int, base: float) -> float:
    """Cosine from `base` to base/10 over `total` steps, stepped per optimizer step."""
    progress = step / max(1, total - 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(trainable: Trainable, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               objective: Objective, spec: ApplySpec, autocast, generator: torch.Generator) -> torch.Tensor:
    """One optimizer step on one batch: loss (+ the captioning loss, + L2 on the delta, +
    distillation), backward, step, then the masks are enforced. Returns the loss."""
    device = images.device
    with autocast:  # a CoCa's tower also returns its image tokens: what its decoder reads
        features, tokens = split_output(trainable.visual(images))
    if spec.loss == "contrastive":
        loss = contrastive_loss(features, objective.prompts, objective.scale, labels, generator)
    elif spec.retain == "batch-classes":
        loss = batch_classes_ce_loss(features, objective.head, objective.scale, labels)
    else:
        loss = ce_loss(features, objective.head, objective.scale, labels)
    if spec.loss == "cafe":  # CAFe: the decoder must still caption from the patched tower's tokens
        with autocast:
            loss = loss + spec.caption_weight * objective.captions.loss(tokens, labels, generator)
    if spec.l2:
        loss = loss + spec.l2 * trainable.l2()
    if objective.reference is not None:  # apply.retain: distill
        ref_images, ref_logits, ref_head = objective.reference
        pick = torch.randint(len(ref_images), (min(spec.batch_size, len(ref_images)),), generator=generator)
        with autocast:
            ref_features, _ = split_output(trainable.visual(ref_images[pick].to(device)))
        loss = loss + spec.distill * distill_loss(ref_features, ref_logits[pick.to(ref_logits.device)], ref_head, objective.scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    trainable.after_step()
    return loss.detach()


def train(
    trainable: Trainable, preprocess, shots: ImageSet, objective: Objective, spec: ApplySpec, seed: int, device: str,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ApplyStats:
    """Train `trainable.params` on the shots."""
    torch.manual_seed(seed)
    trainable.to(device).visual.eval()  # eval: BatchNorm statistics never move
    objective = objective.to(device)
    optimizer = torch.optim.Adam(trainable.params, lr=spec.learning_rate)
    total = spec.epochs * math.ceil(len(shots) / spec.batch_size)
    generator = torch.Generator().manual_seed(seed)
    autocast = autocast_for(device)  # bf16 on CUDA
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, step, loss = time.perf_counter(), 0, torch.zeros(())
    for epoch in range(spec.epochs):
        for images, labels in loader(shots, preprocess, spec.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, spec.learning_rate)
            loss = train_step(trainable, optimizer, images.to(device), labels.to(device), objective, spec, autocast, generator)
            step += 1
            if progress:
                progress(step, total)
    return ApplyStats(step, float(loss), time.perf_counter() - start, peak_memory_mb(device), len(shots))


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
