"""LoRSU (METHODS.md §2): a sparse update of the selected fc1 entries (the *update* is
masked: every other entry stays bit-identical), LoRA masked to the selected heads' Q/K/V
rows, and plain LoRA on the projection into the joint space. On CNN towers: the 1x1
expansion convs and the projection (there are no heads). The ablations reuse `build_parts`."""

from __future__ import annotations

from .method import Method


def build_parts(visual, tower, masks, spec, fc1: bool = True, heads: bool = True, proj: bool = True):
    from ..masks import head_rows
    from .trainable import Trainable

    t = Trainable.frozen(visual)
    if fc1:
        for name, mask in masks.fc1.items():
            t.add_masked(name, mask)
    if heads:
        for name, chosen in masks.heads.items():
            rows = head_rows(t.parameter(name).shape[0], chosen, tower.num_heads)
            t.add_lowrank(name, spec.rank, spec.lora_alpha, rows)
    if proj and tower.proj:
        t.add_lowrank(tower.proj, spec.rank, spec.lora_alpha)
    if spec.train_biases:  # LoRSU's official code trains these unmasked
        for name in (tower.fc1_bias if fc1 else []) + (tower.qkv_bias if heads else []):
            if name:
                t.add_masked(name, None)
    return t


def build(visual, tower, masks, spec):
    return build_parts(visual, tower, masks, spec)


METHOD = Method("lorsu", "fc1 entries + blamed heads' Q/K/V (LoRA) + projection (LoRA)", build, masks="diagnosis")
