"""Gradient attribution over the vision tower (LoRSU's scoring, METHODS.md §1).

One pass over the misclassified images accumulates the *mean* gradient of the training loss
for every fc1-like weight and every fused Q/K/V weight; then
  fc1 entries: score |mean grad|, per-layer top-s fraction selected;
  heads: Q/K/V reshaped (3, H, head_dim, W), score = sum of squared mean grads per head,
         per-layer top-k selected.
A random control picks the same number of entries and heads per layer at random.

Blame (the ranking of loci and blocks, and how concentrated it is) uses the first-order
Taylor score (mean grad * weight)^2 summed over a locus: the share of the loss a locus
accounts for. Raw gradient energy is dominated by the earliest blocks whatever is wrong
(measured on tiny ViTs with planted faults: raw energy ranked block 0 first in 4 of 5
plants, the Taylor score ranked the planted block and head first in 5 of 5). Selection
stays LoRSU's: per-layer, where that depth bias cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch

from .data import ImageSet
from .errors import NothingToDo, UsageError
from .evaluate import loader, predict
from .losses import ce_loss, zero_shot_logits
from .models import LoadedModel
from .records import BlockScore, Confusion, Diagnosis, Locus
from .towers import Tower, describe_tower


@dataclass
class Masks:
    """What a diagnosis selects: entry masks for fc1 weights, head indices for Q/K/V weights."""

    fc1: dict[str, torch.Tensor]  # param name -> bool mask, same shape as the weight
    heads: dict[str, list[int]]  # Q/K/V param name -> selected head indices

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fc1/{k}": v.to(torch.uint8).contiguous() for k, v in self.fc1.items()}
        out.update({f"heads/{k}": torch.tensor(v, dtype=torch.int64) for k, v in self.heads.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Masks":
        fc1 = {k[4:]: v.bool() for k, v in tensors.items() if k.startswith("fc1/")}
        heads = {k[6:]: [int(h) for h in v.tolist()] for k, v in tensors.items() if k.startswith("heads/")}
        return cls(fc1, heads)

    @property
    def selected_entries(self) -> int:
        return int(sum(int(m.sum()) for m in self.fc1.values()))


def mean_gradients(
    loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, params: list[str],
    batch_size: int = 32, max_samples: int = 1000, device: str = "cpu", seed: int = 0, objective: str = "ce",
) -> dict[str, torch.Tensor]:
    """Mean over examples of d(objective)/d(param) for the named parameters (one pass, signed).
    objective 'ce': the training loss (LoRSU); 'logit-norm': ||logits||^2, label-free (SPU)."""
    model = loaded.model.to(device).eval()
    wanted = set(params)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
        p.grad = None
    if len(image_set) > max_samples:
        rng = np.random.default_rng(seed)
        image_set = image_set.subset(sorted(rng.choice(len(image_set), max_samples, replace=False).tolist()))
    head = head.to(device)
    scale = model.logit_scale.exp().detach()
    try:
        for images, labels in loader(image_set, loaded.preprocess, batch_size):
            features = model.encode_image(images.to(device))
            if objective == "logit-norm":
                zero_shot_logits(features, head, scale).pow(2).sum().backward()
            else:
                ce_loss(features, head, scale, labels.to(device), reduction="sum").backward()
        named = dict(model.named_parameters())
        return {n: named[n].grad.detach().cpu() / len(image_set) for n in params}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])


def taylor(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-entry first-order blame: (mean grad * weight)^2."""
    return (grad * weight.detach().cpu()).pow(2)


def select_fc1(grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the top `fraction` entries of |grad| in this layer."""
    k = max(1, math.ceil(fraction * grad.numel()))
    flat = grad.abs().reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(grad.shape)


def score_heads(grad: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head sum of squared mean gradients over its Q, K and V rows: (num_heads,)."""
    width = grad.shape[1]
    return grad.reshape(3, num_heads, width // num_heads, width).pow(2).sum(dim=(0, 2, 3))


def head_rows(num_rows: int, heads: list[int], num_heads: int) -> torch.Tensor:
    """Boolean (3W,) mask of the Q, K and V rows of the given heads."""
    width = num_rows // 3
    head_dim = width // num_heads
    mask = torch.zeros(3, num_heads, head_dim, dtype=torch.bool)
    mask[:, heads] = True
    return mask.reshape(-1)


def build_masks(grads, tower: Tower, fraction: float, k: int, control: str = "none", seed: int = 0) -> Masks:
    generator = torch.Generator().manual_seed(seed)
    fc1, heads = {}, {}
    for name in tower.fc1:
        if control == "random":
            n = grads[name].numel()
            chosen = torch.randperm(n, generator=generator)[: max(1, math.ceil(fraction * n))]
            mask = torch.zeros(n, dtype=torch.bool)
            mask[chosen] = True
            fc1[name] = mask.reshape(grads[name].shape)
        else:
            fc1[name] = select_fc1(grads[name], fraction)
    for name in tower.qkv:
        top = min(k, tower.num_heads)
        if control == "random":
            heads[name] = sorted(torch.randperm(tower.num_heads, generator=generator)[:top].tolist())
        else:
            heads[name] = sorted(torch.topk(score_heads(grads[name], tower.num_heads), top).indices.tolist())
    return Masks(fc1, heads)


def diagnose(
    loaded: LoadedModel, head: torch.Tensor, errors: ImageSet, version: str = "base",
    fc1_fraction: float = 0.1, heads_per_layer: int = 2, max_samples: int = 1000, batch_size: int = 32,
    control: str = "none", seed: int = 0, device: str = "cpu", masks_file: str = "",
) -> tuple[Diagnosis, Masks]:
    """Find the loci responsible for the misclassified images in `errors`."""
    if control not in ("none", "random"):
        raise UsageError(f"unknown control '{control}'", "use --control none or --control random")
    tower = describe_tower(loaded.model)
    predictions = predict(loaded, head, errors, batch_size=batch_size, device=device)
    wrong = np.flatnonzero(~predictions.correct)
    right = np.flatnonzero(predictions.correct)
    if len(wrong) == 0:
        raise NothingToDo(
            f"{errors.root}: the model already classifies all {len(errors)} images right",
            "nothing to diagnose; add images it gets wrong",
        )
    pairs: dict[tuple[int, int], int] = {}
    for i in wrong:
        key = (int(predictions.labels[i]), int(predictions.preds[i]))
        pairs[key] = pairs.get(key, 0) + 1
    confusions = [
        Confusion(errors.classnames[t], errors.classnames[p], c)
        for (t, p), c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    ]

    error_set = errors.subset(wrong.tolist())
    grads = mean_gradients(loaded, head, error_set, tower.fc1 + tower.qkv, batch_size, max_samples, device, seed)
    masks = build_masks(grads, tower, fc1_fraction, heads_per_layer, control, seed)

    weights = dict(loaded.model.named_parameters())
    loci, block_totals = [], {b: 0.0 for b in tower.blocks}
    for name in tower.fc1:
        blame = float(taylor(grads[name], weights[name]).sum())
        block = tower.block_of(name)
        block_totals[block] += blame
        loci.append(Locus("fc1", _short(block), name, -1, blame, float(grads[name].pow(2).sum()), int(masks.fc1[name].sum())))
    for name in tower.qkv:
        block = tower.block_of(name)
        per_head = score_heads(grads[name] * weights[name].detach().cpu(), tower.num_heads)
        per_head_grad = score_heads(grads[name], tower.num_heads)
        block_totals[block] += float(per_head.sum())
        rows = grads[name].shape[0] // tower.num_heads  # Q, K and V rows of one head
        for h, s in enumerate(per_head.tolist()):
            loci.append(Locus("head", _short(block), name, h, s, float(per_head_grad[h]), rows if h in masks.heads[name] else 0))
    loci.sort(key=lambda locus: -locus.score)
    total = sum(block_totals.values()) or 1.0
    blocks = sorted(
        (BlockScore(_short(b), s, s / total) for b, s in block_totals.items()), key=lambda b: -b.score
    )
    top = max(1, math.ceil(0.1 * len(blocks)))
    diagnosis = Diagnosis(
        created=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ"),
        version=version,
        fingerprint=loaded.fingerprint,
        errors_dir=errors.root,
        n_images=len(errors),
        n_errors=len(wrong),
        already_right=[errors.samples[i].source for i in right],
        confusions=confusions,
        loci=loci,
        blocks=blocks,
        concentration_top10=sum(b.share for b in blocks[:top]),
        fc1_fraction=fc1_fraction,
        heads_per_layer=heads_per_layer if tower.qkv else 0,
        control=control,
        seed=seed,
        masks_file=masks_file,
        # each head owns 1/num_heads of its block's Q/K/V weight
        selected_params=masks.selected_entries + sum(
            len(h) * grads[n].numel() // tower.num_heads for n, h in masks.heads.items()
        ),
        skipped=list(errors.skipped),
    )
    return diagnosis, masks


def _short(block: str) -> str:
    return block.removeprefix("visual.")
