"""LoRSU ablation: only the heads' LoRA and the projection (no fc1 entries); on a CNN tower,
which has no heads, this is the projection alone."""

from . import lorsu
from .method import Method


def build(visual, tower, masks, spec):
    return lorsu.build_parts(visual, tower, masks, spec, fc1=False)


METHOD = Method("lorsu-heads", "LoRSU's heads part + projection only", build, masks="diagnosis")
