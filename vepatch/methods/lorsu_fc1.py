"""LoRSU ablation: only the sparse fc1 update (no heads, no projection)."""

from . import lorsu
from .method import Method


def build(visual, tower, masks, spec):
    return lorsu.build_parts(visual, tower, masks, spec, heads=False, proj=False)


METHOD = Method("lorsu-fc1", "LoRSU's fc1 part only", build, masks="diagnosis")
