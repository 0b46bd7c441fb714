"""Zero-shot heads: class names x templates -> normalized text embeddings, cached on disk.

The text tower never changes, so a head is computed once per (model fingerprint, names,
templates) and kept as safetensors under the user cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch

from .load import LoadedModel, text_fingerprint
from ..paths import cached_tensor


def normalize_templates(templates: Sequence[str]) -> list[str]:
    """Accept open_clip's '{}' and CLIP_benchmark's '{c}' placeholders."""
    out = [t.replace("{c}", "{}") for t in templates]
    return [t if "{}" in t else t + " {}" for t in out]


def text_head(loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(num_classes, dim) normalized class embeddings, averaged over templates."""
    templates = normalize_templates(templates)
    key = _head_key(text_fingerprint(loaded.model), classnames, templates)
    return cached_tensor("heads", key, lambda: compute_text_head(loaded, classnames, templates))


def compute_text_head(loaded: LoadedModel, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """open_clip's zero-shot classifier (templates averaged), or, where a DCAR patch learned
    description weights for exactly these classes and templates, their weighted mix."""
    from open_clip import build_zero_shot_classifier

    from ..prompts import description_weights

    device = next(loaded.model.parameters()).device
    templates = normalize_templates(templates)
    weights = description_weights(loaded.model, list(classnames), templates)
    with torch.no_grad():
        if weights is None:
            head = build_zero_shot_classifier(loaded.model, loaded.tokenizer, list(classnames), templates, device=device).T
        else:
            per_template = torch.stack([build_zero_shot_classifier(loaded.model, loaded.tokenizer, list(classnames), [t],
                                                                   device=device).T for t in templates], dim=1)
            head = torch.nn.functional.normalize((weights.to(per_template).unsqueeze(-1) * per_template).sum(1), dim=-1)
    return head.contiguous().float().cpu()


def _head_key(*parts) -> str:
    return hashlib.sha256(json.dumps([list(p) if not isinstance(p, str) else p for p in parts]).encode()).hexdigest()[:32]
