"""Which tensors each method trains (see methods/__init__.py for the list)."""

from __future__ import annotations

from torch import nn

from ..diagnose import Masks, head_rows
from ..errors import UsageError
from ..recipe import ApplySpec
from ..towers import Tower
from . import MASKED_METHODS, METHODS, WISE_ALPHA
from .trainable import Trainable


def build_trainable(method: str, visual: nn.Module, tower: Tower, masks: Masks | None, spec: ApplySpec) -> Trainable:
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}'", f"use one of: {', '.join(METHODS)}")
    if method in MASKED_METHODS and masks is None:
        raise UsageError(f"method '{method}' needs masks", "run `vepatch diagnose` first, or let apply compute them")
    for p in visual.parameters():
        p.requires_grad_(False)
    t = Trainable(visual)
    if method in ("full", "full+wise"):
        for name, _ in visual.named_parameters():
            t.add_masked(f"visual.{name}", None)
        if method == "full+wise":
            t.keep = WISE_ALPHA
    elif method == "ln":
        for name in tower.norms:
            t.add_masked(name, None)
    elif method == "lora":
        from .lora import add_peft_lora

        add_peft_lora(t, visual, spec.rank, spec.lora_alpha)
    else:
        with_fc1 = method in ("lorsu", "lorsu-random", "lorsu-fc1", "spu")
        with_heads = method in ("lorsu", "lorsu-random", "lorsu-heads")
        with_proj = method != "spu" and method != "lorsu-fc1"
        if with_fc1:
            for name, mask in masks.fc1.items():
                t.add_masked(name, mask)
        if with_heads:
            for name, heads in masks.heads.items():
                rows = head_rows(dict(visual.named_parameters())[name.removeprefix("visual.")].shape[0], heads, tower.num_heads)
                t.add_lowrank(name, spec.rank, spec.lora_alpha, rows)
        if with_proj and tower.proj:
            t.add_lowrank(tower.proj, spec.rank, spec.lora_alpha)
        if spec.train_biases and method != "spu":
            biases = (tower.fc1_bias if with_fc1 else []) + (tower.qkv_bias if with_heads else [])
            for name in biases:
                if name:
                    t.add_masked(name, None)
    return t
