"""DCAR (arXiv 2508.04028): dual prompts with joint category-attribute reweighting.

vepatch's reading of it, with both towers' weights frozen:
  dual prompts   the text side learns each template's prefix vectors (as coop); the vision side
                 learns a visual prompt (visual_prompts.py): `apply.vision_prompts` tokens after
                 the class token on a ViT, a `apply.prompt_pad`-pixel learned image border on a CNN.
  attribute      each class's embedding is a weighted mix of its descriptions (the recipe's
                 templates filled with its name) instead of their plain average; the weights are
                 updated every epoch from how well each description matches the class's own
                 images (softmax over descriptions, at the model's logit scale, of the mean
                 image-text similarity over the epoch), and kept in the patch, so the deployed
                 head uses them. With one template there is nothing to weigh.
  category       negatives from two directions: image->text cross-entropy whose negative classes
                 weigh more the closer their name is to the true class's (1 + cos of the zero-shot
                 class embeddings, floored at 1), and text->image (each class in the batch against
                 the batch's images, its own images the positives). The loss is their mean.
The paper's code is not published (its repository holds data only); the parts above follow its
abstract and method description, and where those are silent the choices are vepatch's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .method import Method

if TYPE_CHECKING:  # torch is imported where it is used: the registry (and so the CLI) loads without it
    import torch


def prompt(tokens, width, spec, loaded):
    from .prompting import FreeChange

    return FreeChange(tokens, width)


def negative_weights(head: torch.Tensor) -> torch.Tensor:
    """(classes, classes) log-weights added to negative logits: log(1 + max(0, cos(c, c'))),
    0 on the diagonal (the true class is never re-weighted)."""
    import torch

    sim = (head @ head.T).clamp(min=0)
    return torch.log1p(sim).fill_diagonal_(0.0)


def dcar_loss(features: torch.Tensor, head: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
              log_weights: torch.Tensor) -> torch.Tensor:
    """Mean of the category-weighted image->text cross-entropy and the text->image one."""
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(features.float(), dim=-1) @ head.T
    i2t = F.cross_entropy(logits + log_weights[labels], labels)
    present = torch.unique(labels)
    t2i_logits = logits.T[present]  # (present classes, batch)
    positive = labels.unsqueeze(0) == present.unsqueeze(1)
    t2i = (torch.logsumexp(t2i_logits, 1) - torch.logsumexp(t2i_logits.masked_fill(~positive, float("-inf")), 1)).mean()
    return (i2t + t2i) / 2


class DescriptionMatch:
    """Running per class and template: the summed similarity of the class's images to that
    template's embedding of the class, over one epoch (the attribute-level signal)."""

    def __init__(self, classes: int, templates: int, device):
        import torch

        self.sums = torch.zeros(classes, templates, device=device)
        self.counts = torch.zeros(classes, 1, device=device)

    def add(self, features: torch.Tensor, per_template: torch.Tensor, labels: torch.Tensor) -> None:
        """features (batch, dim); per_template (templates, classes, dim), both normalized."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            sims = torch.einsum("bd,tbd->bt", F.normalize(features.float(), dim=-1), per_template.float()[:, labels])
            self.sums.index_add_(0, labels, sims)
            self.counts.index_add_(0, labels, torch.ones(len(labels), 1, device=labels.device))

    def weights(self, scale: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Softmax over templates of the mean similarity (classes with no image keep theirs)."""
        import torch

        seen = self.counts.squeeze(1) > 0
        out = previous.clone()
        out[seen] = torch.softmax(scale * self.sums[seen] / self.counts[seen], dim=1)
        return out


METHOD = Method("dcar", "dual prompts (text prefix + visual prompt), category-attribute reweighting (both towers frozen)",
                prompt=prompt, vision_prompt=True, reweight=True, lr=2e-3)  # not tuned
