"""Patch methods, one file each (as peft's tuners), all of the same shape (`method.Method`):

  lorsu.py         sparse fc1 entries + LoRA on the blamed heads' Q/K/V rows + LoRA projection
  lorsu_random.py  the same budget at random places (the localization control)
  lorsu_fc1.py     LoRSU's fc1 part only;   lorsu_heads.py  its heads part + projection only
  spu.py           fc1 top-s by SPU's label-free score
  lora.py          peft LoRA on the tower's linear layers
  full.py          every tower parameter;   full_wise.py  `full`, then WiSE-FT averaging
  ln.py            norm layers only
  coop.py          prompt vectors before the class name (text side; both towers frozen)
  ck_coop.py       the same, as mixes of the token table's K-means centres + a Kronecker term
  dcar.py          dual prompts (text prefix + a visual prompt), category-attribute reweighting

Shared parts: trainable.py (masked dense update, row-masked low-rank change), train.py (the
flat loop and its one step), prompting.py (the prompt methods' loop and changes). This table is the one list of methods: the CLI help, the recipe
check and the bench read it. Adding a method = one file plus one line below."""

from __future__ import annotations

from ..errors import UsageError
from . import ck_coop, coop, dcar, full, full_wise, ln, lora, lorsu, lorsu_fc1, lorsu_heads, lorsu_random, spu
from .method import Method

REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (
    lorsu, lorsu_random, lorsu_fc1, lorsu_heads, spu, lora, full, full_wise, ln, coop, ck_coop, dcar,
)}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise UsageError(f"unknown method '{name}'", f"use one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "get", "names"]
