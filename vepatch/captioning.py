"""Captioning models (open_clip's CoCa): CAFe's captioning loss and captioning guard suites.

A CoCa's vision tower (attentional pooling, `output_tokens`) returns (pooled, image tokens):
the pooled features are what the class heads read, as any tower's; the tokens are what the
text decoder cross-attends to. Both uses read open_clip's own pieces, the same teacher forcing
as `CoCa.forward` and its captioning loss (`open_clip.loss.CoCaLoss`): the text tower's token
embeddings of a caption but the last as the decoder's input, the caption's tokens but the
first as its targets, padding ignored. The text tower and the decoder never change: vepatch
only ever patches `model.visual`.

  apply.loss: cafe   (CAFe, arXiv 2503.19900) the classification loss + apply.caption_weight *
                     the decoder's next-token cross-entropy on the shot's caption (its class
                     name in a random template of the recipe), given the *patched* tower's tokens
  kind: captioning   a guard suite of images with captions (retrieval.py's reader); per image
                     the geometric-mean token probability exp(-mean token NLL) of its caption,
                     in (0, 1], higher = better; the suite's value is their mean, judged as a
                     guard row ('<suite> caption lik.') with a paired one-sided Wilcoxon test
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .runtime.passes import Scores, SuiteInputs, autocast

ROW = "caption lik."  # a captioning suite's row in reports: '<suite> caption lik.'


def row_name(suite: str) -> str:
    return f"{suite} {ROW}"


def is_coca(model: nn.Module) -> bool:
    from open_clip import CoCa

    return isinstance(model, CoCa)


def require_coca(loaded, what: str, fix: str) -> None:
    """UsageError unless `loaded` is an open_clip CoCa (a text decoder to caption with)."""
    if not is_coca(loaded.model):
        raise UsageError(f"{what} needs an open_clip CoCa (a text decoder to caption with); "
                         f"{loaded.ref} is a {type(loaded.model).__name__}", fix)


def require_suite_model(loaded, suite: str) -> None:
    """Only a CoCa can have a captioning suite judged or measured."""
    require_coca(loaded, f"guard suite '{suite}' (kind: captioning)",
                 "make it `kind: retrieval` (the same folder), or use an open_clip CoCa as model.ref")


def split_output(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled features, image tokens) of what a vision tower returned: a CoCa's tower returns
    both (output_tokens), any other the pooled features alone (tokens: None)."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


@contextlib.contextmanager
def frozen(module: nn.Module):
    """`module`'s parameters take no gradient while inside (gradients still flow through it to
    its inputs): the decoder stays out of the graph's leaves instead of piling up .grad."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def tokens_of(loaded, texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), context) token ids, as the model's own tokenizer makes them."""
    return loaded.tokenizer(list(texts))


def teacher_forcing(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's input and targets for captions `tokens` (B, L), as `CoCa.forward` makes
    them: the text tower's token embeddings but the last, and the tokens but the first."""
    _, embeddings = model.text(tokens)
    return embeddings[:, :-1], tokens[:, 1:]


def token_losses(model: nn.Module, image_tokens: torch.Tensor, inputs: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (B, L-1) of the decoder's next-token logits, and the mask of the
    tokens that count (padding does not: CoCaLoss's ignore_index)."""
    logits = model.text_decoder(image_tokens, inputs)
    losses = F.cross_entropy(logits.float().permute(0, 2, 1), targets, ignore_index=model.pad_id, reduction="none")
    return losses, targets != model.pad_id


@dataclass(frozen=True)
class CaptionTarget:
    """What CAFe's captioning loss is computed against: the CoCa's frozen text tower and decoder
    (its vision tower is not used: the training copy's tokens come in) and every class's
    caption in every template."""

    model: nn.Module  # the CoCa (on the training device already: the context moved it)
    tokens: torch.Tensor  # (classes, templates, context) caption token ids

    def to(self, device: str) -> "CaptionTarget":
        return CaptionTarget(self.model, self.tokens.to(device))

    def loss(self, image_tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens of the batch (CoCaLoss's caption
        loss) of each image's class caption in a random template (the step's generator draws
        it, as contrastive_loss draws its templates)."""
        pick = torch.randint(self.tokens.shape[1], (len(labels),), generator=generator).to(labels.device)
        captions = self.tokens[labels, pick]
        with torch.no_grad():  # the text tower is frozen: its embeddings are constants here
            inputs, targets = teacher_forcing(self.model, captions)
        with frozen(self.model.text_decoder):
            losses, real = token_losses(self.model, image_tokens, inputs, targets)
        return (losses * real).sum() / real.sum().clamp(min=1)


def caption_target(loaded, classes: Sequence[str], templates: Sequence[str]) -> CaptionTarget:
    """Every class name in every template, tokenized: the shots' captions."""
    from .models.heads import normalize_templates

    templates = normalize_templates(templates)
    tokens = tokens_of(loaded, [t.format(c) for c in classes for t in templates])
    device = next(loaded.model.parameters()).device
    return CaptionTarget(loaded.model, tokens.reshape(len(classes), len(templates), -1).to(device))


def likelihoods(model: nn.Module, inputs: SuiteInputs, captions: torch.Tensor, device: str) -> Scores:
    """Each image's reference-caption likelihood under `model`'s current weights: the
    geometric-mean probability exp(-mean token NLL) of its caption (`captions`: the token ids
    of every distinct caption, row = an image's label), given its image tokens."""
    captions = captions.to(device)

    def one(b: int) -> np.ndarray:
        _, image_tokens = split_output(inputs.tower_output(model, b, device))
        start, stop = inputs.bounds[b]
        tokens = captions[torch.as_tensor(inputs.labels[start:stop], device=device)]
        with autocast(device):
            losses, real = token_losses(model, image_tokens, *teacher_forcing(model, tokens))
        nll = (losses * real).sum(1) / real.sum(1).clamp(min=1)
        return torch.exp(-nll.double()).cpu().numpy()  # float64: no underflow to 0 on a poor decoder

    parts = inputs.per_batch(model, device, one)
    return Scores(inputs.labels, np.concatenate(parts) if parts else np.zeros(0))


def scores(loaded, inputs: SuiteInputs, device: str) -> Scores:
    """A captioning suite's per-image likelihoods of its own captions (its "classes")."""
    return likelihoods(loaded.model, inputs, tokens_of(loaded, inputs.images.classnames), device)


def mean_likelihood(loaded, images, batch_size: int, device: str) -> float:
    """A captioning suite's value, one plain pass (`vepatch eval`, the stream's measurements)."""
    return scores(loaded, SuiteInputs(images, loaded.preprocess, batch_size), device).accuracy


def paired_p(before: Scores, after: Scores) -> float:
    """Two-sided Wilcoxon signed-rank test on the paired per-image values (the bench reports
    whether a suite changed, either way; the guard bounds the change: bounds.values_drop_bounds)."""
    from scipy.stats import wilcoxon

    diff = after.values - before.values
    return float(wilcoxon(diff, zero_method="wilcox").pvalue) if diff.any() else 1.0


