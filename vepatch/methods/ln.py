"""Norm-only tuning: the affine parameters of every LayerNorm / BatchNorm / GroupNorm."""

from .method import Method


def build(visual, tower, masks, spec):
    from .trainable import Trainable

    t = Trainable.frozen(visual)
    for name in tower.norms:
        t.add_masked(name, None)
    return t


METHOD = Method("ln", "norm layers' affine parameters only", build)
