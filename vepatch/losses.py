"""Training and scoring losses over the frozen text side (the text tower never changes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zero_shot_logits(features: torch.Tensor, head: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * normalized image features . class embeddings (head rows are normalized)."""
    return scale * F.normalize(features.float(), dim=-1) @ head.T


def ce_loss(features, head, scale, labels, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the frozen class-text head (PAINT/FLYP style)."""
    return F.cross_entropy(zero_shot_logits(features, head, scale), labels, reduction=reduction)


def batch_classes_ce_loss(features, head, scale, labels) -> torch.Tensor:
    """Cross-entropy over the classes present in the batch only: classes not in the batch are
    not pushed away (LoRSU's in-batch contrastive loss behaves this way)."""
    present, local = torch.unique(labels, return_inverse=True)
    return F.cross_entropy(zero_shot_logits(features, head[present], scale), local)


def contrastive_loss(features, prompt_embeddings, scale, labels, generator=None, reduction: str = "mean") -> torch.Tensor:
    """LoRSU's symmetric in-batch CLIP loss between images and their class caption, one random
    template per image. `prompt_embeddings` is (classes, templates, dim), normalized."""
    n_templates = prompt_embeddings.shape[1]
    pick = torch.randint(n_templates, (len(labels),), generator=generator).to(labels.device)
    texts = prompt_embeddings[labels, pick]  # (batch, dim)
    logits = scale * F.normalize(features.float(), dim=-1) @ texts.T
    target = torch.arange(len(labels), device=labels.device)
    loss = (F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")) / 2
    return loss / len(labels) if reduction == "mean" else loss


def distill_loss(features, parent_logits, head, scale) -> torch.Tensor:
    """KL(parent || candidate) between zero-shot distributions on reference images (ZSCL's idea)."""
    logits = zero_shot_logits(features, head, scale)
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(parent_logits, -1), log_target=True, reduction="batchmean")
