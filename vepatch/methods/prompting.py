"""Training a prompt patch (coop, ck-coop, dcar): both towers' weights frozen, only the change to
each recipe template's prefix vectors learns (prompts.py says how the model reads them), and for
dcar a visual prompt (visual_prompts.py) and the description weights (methods/dcar.py).

The loop is the vision methods' loop with the other tower moving: per batch, image features
from the frozen vision tower, the class head from the text tower reading the learned vectors
(with gradients), cross-entropy over the recipe's classes (or over the classes in the batch,
`apply.retain: batch-classes`), plus `apply.l2` on the change. Distillation is a vision-side
regularizer and is not used here."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..data import ImageSet
from ..delta import Delta
from ..evaluate import loader
from ..losses import batch_classes_ce_loss, ce_loss
from ..models import LoadedModel
from ..models.heads import normalize_templates
from ..prompts import ensure_slot, prefix_ids
from ..records import ApplyStats
from ..recipe import ApplySpec
from .method import Method
from .train import lr_at, peak_memory_mb


class FreeChange(nn.Module):
    """CoOp: every number of the prefix's vectors learns (from the prefix's own words)."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(tokens, width))

    def forward(self) -> torch.Tensor:
        return self.delta


class CodebookChange(nn.Module):
    """CK-CoOp (arXiv 2403.11631): each token's change is a learned mix of K fixed centres of
    the token-embedding table (K-means) plus a Kronecker-product term a (x) b, so a prefix of n
    tokens learns n*K + n*p + w/p numbers instead of n*w (p: a divisor of the width w near its root)."""

    def __init__(self, tokens: int, width: int, centres: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", centres.float())
        self.mix = nn.Parameter(torch.zeros(tokens, len(centres)))
        p = max(d for d in range(1, int(math.isqrt(width)) + 1) if width % d == 0)
        self.a = nn.Parameter(torch.randn(tokens, p) * 0.02)
        self.b = nn.Parameter(torch.zeros(1, width // p))

    def forward(self) -> torch.Tensor:
        return self.mix @ self.centres + torch.kron(self.a, self.b)


def per_template_heads(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(templates, classes, dim) normalized class embeddings, one set per template, from
    (templates, classes, length) token ids."""
    return torch.stack([model.encode_text(t, normalize=True).float() for t in tokens])


def class_head(per_template: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(classes, dim): the templates averaged, as the zero-shot head is (open_clip's
    build_zero_shot_classifier), or mixed by DCAR's (classes, templates) weights."""
    mixed = per_template.mean(0) if weights is None else (weights.T.unsqueeze(-1) * per_template).sum(0)
    return nn.functional.normalize(mixed, dim=-1)


def train_prompts(method: Method, loaded: LoadedModel, preprocess, shots: ImageSet, classes: Sequence[str],
                  templates: Sequence[str], spec: ApplySpec, seed: int, device: str,
                  progress: Optional[Callable[[int, int], None]] = None) -> tuple[Delta, dict[str, int], ApplyStats]:
    """Learn the change to every template's prefix on `shots` (and, for dcar, a visual prompt
    and the description weights); returns the delta, the numbers each part learns, and the run's stats."""
    from . import dcar

    torch.manual_seed(seed)
    model = copy.deepcopy(loaded.model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    templates = normalize_templates(templates)
    slots = {}
    for template in templates:
        ids, text = prefix_ids(loaded.tokenizer, template)
        name, slot = ensure_slot(model, ids.to(device), text)
        if name not in slots:
            slot.change = method.prompt(len(ids), slot.context.shape[1], spec, loaded).to(device)
            slots[name] = slot
    params = [p for s in slots.values() for p in s.change.parameters()]
    vision = VisionPrompt(model.visual, spec) if method.vision_prompt else None
    params += vision.params if vision else []
    tokens = torch.stack([loaded.tokenizer([t.format(c) for c in classes]) for t in templates]).to(device)
    scale = model.logit_scale.exp().detach()
    reweight = method.reweight and len(templates) > 1  # one description: nothing to weigh
    weights = torch.full((len(classes), len(templates)), 1.0 / len(templates), device=device) if reweight else None
    log_weights = None
    if method.reweight:
        with torch.no_grad():
            log_weights = dcar.negative_weights(class_head(per_template_heads(model, tokens)))
    optimizer = torch.optim.Adam(params, lr=spec.learning_rate)
    total = spec.epochs * math.ceil(len(shots) / spec.batch_size)
    start, step, loss = time.perf_counter(), 0, torch.zeros(())
    for epoch in range(spec.epochs):
        match = dcar.DescriptionMatch(len(classes), len(templates), device) if reweight else None
        for images, labels in loader(shots, preprocess, spec.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, spec.learning_rate)
            labels = labels.to(device)
            with torch.set_grad_enabled(vision is not None):  # a visual prompt learns through the tower
                features = model.encode_image(images.to(device), normalize=True)
            per_template = per_template_heads(model, tokens)
            head = class_head(per_template, weights)
            if method.reweight:
                loss = dcar.dcar_loss(features, head, scale, labels, log_weights)
            elif spec.retain == "batch-classes":
                loss = batch_classes_ce_loss(features, head, scale, labels)
            else:
                loss = ce_loss(features, head, scale, labels)
            if spec.l2:
                loss = loss + spec.l2 * sum(s.change().pow(2).sum() for s in slots.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
            if match is not None:
                match.add(features.detach(), per_template.detach(), labels)
            step += 1
            if progress:
                progress(step, total)
        if match is not None:  # DCAR's attribute level: next epoch's weights from this one's images
            weights = match.weights(scale, weights)
    delta, learned = Delta(), {}
    with torch.no_grad():
        for name, slot in slots.items():
            delta.add_prompt(name, slot.change().float().cpu(), slot.ids.cpu(), slot.text)
            learned[name] = sum(p.numel() for p in slot.change.parameters())
        if vision is not None:
            learned.update(vision.to_delta(delta))
        if weights is not None:
            from ..prompts import DescriptionWeights, weights_key, WEIGHTS

            uniform = DescriptionWeights(list(classes), templates)
            name = f"{WEIGHTS}{weights_key(list(classes), templates)}.w"
            delta.add_weights(name, (weights.float().cpu() - uniform.w), uniform.label())
            learned[name] = weights.numel()
    stats = ApplyStats(step, float(loss), time.perf_counter() - start, peak_memory_mb(device), len(shots))
    return delta.scaled(1.0), learned, stats


class VisionPrompt:
    """DCAR's vision-side prompt on the training copy of the tower: prompt tokens on a ViT
    (VPT's uniform init, gate open), a learned image border elsewhere (visual_prompts.py)."""

    def __init__(self, visual: nn.Module, spec: ApplySpec):
        from .. import visual_prompts as vp

        self.visual = visual
        if vp.is_vit(visual):
            width = visual.class_embedding.shape[-1]
            limit = math.sqrt(6.0 / (width + spec.vision_prompts))  # xavier-uniform, as VPT's prompts
            _, self.set = vp.add_tokens(visual, torch.empty(spec.vision_prompts, width).uniform_(-limit, limit))
            with torch.no_grad():
                self.set.gate.fill_(1.0)
            self.set.tokens.requires_grad_(True)
            self.params = [self.set.tokens]
        else:
            _, self.set = vp.pad_prompt(visual, spec.prompt_pad)
            self.set.pixels.requires_grad_(True)
            self.params = [self.set.pixels]

    def to_delta(self, delta: Delta) -> dict[str, int]:
        """Write the learned prompt into `delta`; returns the numbers it learned, by parameter."""
        from .. import visual_prompts as vp

        if isinstance(self.set, vp.PromptTokens):
            tokens = self.set.tokens.detach().float().cpu()
            name = f"{vp.PREFIX}{vp.key_of(tokens)}"
            delta.add_visual_tokens(name, tokens)
            return {f"{name}.tokens": tokens.numel()}
        name = f"{vp.PREFIX}{vp.PAD}.pixels"
        border = self.set.border.cpu()
        delta.add_sparse(name, self.set.value().detach().float().cpu(), border)
        return {name: int(border.sum())}


# --- ck-coop's codebook -------------------------------------------------------------------


def codebook(loaded: LoadedModel, k: int) -> torch.Tensor:
    """K-means centres (k x width) of the text tower's token-embedding table, computed once per
    table and kept in the user cache (scikit-learn's KMeans, seeded)."""
    from ..models.load import _hash_tensors
    from ..paths import cached_tensor
    from ..prompts import token_embedding

    table = token_embedding(loaded.model).weight.detach().float().cpu()

    def fit() -> torch.Tensor:
        from sklearn.cluster import KMeans

        fitted = KMeans(n_clusters=min(k, len(table)), n_init=1, max_iter=100, random_state=0).fit(table.numpy())
        return torch.from_numpy(fitted.cluster_centers_).float()

    return cached_tensor("codebooks", f"{_hash_tensors({'table': table})[:32]}-k{k}", fit)
