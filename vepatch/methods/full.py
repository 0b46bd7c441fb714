"""Full fine-tuning of every vision-tower parameter (the upper bound on change)."""

from .method import Method


def build(visual, tower, masks, spec):
    from ..visual_prompts import BANK
    from .trainable import Trainable

    t = Trainable.frozen(visual)
    for name, _ in visual.named_parameters():
        if not name.startswith(BANK + "."):  # a parent's visual prompt is a patch of its own, not a weight
            t.add_masked(f"visual.{name}", None)
    return t


METHOD = Method("full", "every vision-tower parameter", build, lr=1e-4)  # a dense step wants a smaller lr (not tuned)
