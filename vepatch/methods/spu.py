"""SPU (Zhang et al., github.com/wx-zhang/spu): the top-s fc1 entries by a label-free score
(the gradient of ||image logits||^2), nothing else; vision tower only."""

from .method import Method


def build(visual, tower, masks, spec):
    from .trainable import Trainable

    t = Trainable.frozen(visual)
    for name, mask in masks.fc1.items():
        t.add_masked(name, mask)
    return t


METHOD = Method("spu", "fc1 top-s entries by SPU's label-free score", build, masks="logit-norm")
