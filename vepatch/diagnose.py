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

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import clock
from .context import Context, open_target_set
from .data import ImageSet
from .errors import NothingToDo, UsageError
from .evaluate import loader, predict
from .losses import ce_loss, zero_shot_logits
from .masks import Masks, build_masks, score_heads
from .models import LoadedModel
from .models.heads import text_head
from .models.towers import describe_tower
from .recipe import DiagnoseSpec, with_overrides
from .records import BlockScore, Confusion, Diagnosis, Locus, Misclassified


def mean_gradients(
    loaded: LoadedModel, head: torch.Tensor, image_set: ImageSet, params: list[str],
    batch_size: int, max_samples: int, device: str, seed: int, objective: str = "ce",
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


def diagnose(
    loaded: LoadedModel, head: torch.Tensor, errors: ImageSet, version: str, spec: DiagnoseSpec, seed: int, device: str,
) -> tuple[Diagnosis, Masks]:
    """Find the loci responsible for the misclassified images in `errors`."""
    if spec.control not in ("none", "random"):  # a flag bypasses the recipe's type check
        raise UsageError(f"unknown control '{spec.control}'", "use --control none or --control random")
    tower = describe_tower(loaded.model)
    predictions = predict(loaded, head, errors, spec.batch_size, device)
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
    grads = mean_gradients(loaded, head, error_set, tower.fc1 + tower.qkv, spec.batch_size, spec.max_samples, device, seed)
    masks = build_masks(grads, tower, spec.fc1_fraction, spec.heads_per_layer, spec.control, seed)

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
        created=clock.stamp(),
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
        fc1_fraction=spec.fc1_fraction,
        heads_per_layer=spec.heads_per_layer if tower.qkv else 0,
        control=spec.control,
        seed=seed,
        masks_file="",  # named when written (run_diagnose)
        # each head owns 1/num_heads of its block's Q/K/V weight
        selected_params=masks.selected_entries + sum(
            len(h) * grads[n].numel() // tower.num_heads for n, h in masks.heads.items()
        ),
        skipped=list(errors.skipped),
        misclassified=[Misclassified(errors.samples[i].source, errors.classnames[predictions.labels[i]],
                                     errors.classnames[predictions.preds[i]]) for i in wrong],
    )
    return diagnosis, masks


def _short(block: str) -> str:
    return block.removeprefix("visual.")


def run_diagnose(ctx: Context, errors_dir: Path, overrides: dict[str, Any]) -> tuple[Diagnosis, Path]:
    """`vepatch diagnose`: score the current version on the misclassified images and write
    .vepatch/diagnoses/<utc>.json with its masks beside it."""
    from safetensors.torch import save

    from .fsio import write_bytes_atomic, write_text_atomic
    from .records import to_json

    ws = ctx.workspace
    recipe = with_overrides(ctx.recipe, overrides)
    if not recipe.classes:
        raise UsageError(f"{ws.recipe_path}: the recipe names no classes", "list the target classes under `classes:`")
    with ws.lock():
        errors = open_target_set(ctx, ctx.resolve(errors_dir), "errors")
        loaded, version = ctx.model()
        head = text_head(loaded, recipe.classes, recipe.templates)
        diagnosis, masks = diagnose(loaded, head, errors, version, recipe.diagnose, recipe.seed, ctx.device)
        diagnosis = dataclasses.replace(diagnosis, masks_file=ws.diagnosis_masks(diagnosis.created).name)
        write_bytes_atomic(ws.diagnosis_masks(diagnosis.created), save(masks.to_tensors()))
        path = ws.diagnosis_file(diagnosis.created)
        write_text_atomic(path, to_json(diagnosis))
        ws.log("diagnose", file=path.name, errors=diagnosis.n_errors, images=diagnosis.n_images,
               concentration_top10=diagnosis.concentration_top10, control=diagnosis.control)
    return diagnosis, path
