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
    from open_clip import build_zero_shot_classifier

    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        weights = build_zero_shot_classifier(
            loaded.model, loaded.tokenizer, list(classnames), normalize_templates(templates), device=device
        )
    return weights.T.contiguous().float().cpu()


def _head_key(*parts) -> str:
    return hashlib.sha256(json.dumps([list(p) if not isinstance(p, str) else p for p in parts]).encode()).hexdigest()[:32]
