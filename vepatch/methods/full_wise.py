"""`full`, then WiSE-FT weight averaging with the parent (Wortsman et al., 2022): the stored
delta is apply.wise_alpha * (fine-tuned - parent)."""

from . import full
from .method import Method


def build(visual, tower, masks, spec):
    t = full.build(visual, tower, masks, spec)
    t.keep = spec.wise_alpha
    return t


METHOD = Method("full+wise", "full fine-tune, then WiSE-FT averaging with the parent", build, lr=full.METHOD.lr)
