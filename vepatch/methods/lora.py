"""The `lora` baseline: LoRA on the tower's linear layers and 1x1 convs (peft), and on the fused
Q/K/V weight of every nn.MultiheadAttention (open_clip ViTs), so that it adapts attention too.

The attention part is vepatch's own low-rank parametrization, not peft's MultiheadAttention
LoRA: that one always adapts out_proj as well and, in peft 0.21, applies the out_proj change
twice in its forward pass (huggingface/peft PR #3774), so what it trains is not what a merged
patch holds. An in_proj-only LoRA still exports to peft exactly (a zero out_proj factor).
open_clip's bare `visual.proj` parameter stays as it is."""

from __future__ import annotations

from .method import Method


def lora_targets(visual) -> list[str]:
    """Linear layers and pointwise convs; not nn.MultiheadAttention's out_proj, whose weight
    the attention kernel reads directly (a wrapper there would be silently ignored)."""
    from torch import nn

    mha_out = {f"{n}.out_proj" for n in attention_modules(visual)}
    out = []
    for name, module in visual.named_modules():
        if name in mha_out:
            continue
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        ):
            out.append(name)
    return out


def attention_modules(visual, fused: bool = False) -> list[str]:
    """Every nn.MultiheadAttention of the tower (`fused`: those with one fused Q/K/V weight).
    A CoCa's attentional pooler has separate q/k/v weights (its keys come from the wider
    tower): neither this parametrization of `in_proj_weight` nor peft's attention LoRA covers
    those, so `lora` leaves the pooler's attention as it is."""
    from torch import nn

    return [n for n, m in visual.named_modules()
            if isinstance(m, nn.MultiheadAttention) and (m._qkv_same_embed_dim or not fused)]


def build(visual, tower, masks, spec):
    from peft import LoraConfig, inject_adapter_in_model

    from ..delta import Delta
    from .trainable import Trainable

    t = Trainable.frozen(visual)
    targets = lora_targets(visual)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, visual)
    t.params += [p for n, p in visual.named_parameters() if "lora_" in n]
    for p in t.params:
        p.requires_grad_(True)
    wrapped = {name: visual.get_submodule(name) for name in targets}
    for name, module in wrapped.items():
        t.summary[f"visual.{name}.weight"] = module.lora_A["default"].weight.numel() + module.lora_B["default"].weight.numel()
    for name in attention_modules(visual, fused=True):
        t.add_lowrank(f"visual.{name}.in_proj_weight", spec.rank, spec.lora_alpha)

    def extract() -> Delta:
        out = Delta()
        for name, module in wrapped.items():
            a = module.lora_A["default"].weight.detach().float().cpu()
            b = module.lora_B["default"].weight.detach().float().cpu()
            scale = module.scaling["default"]
            out.add_lowrank(f"visual.{name}.weight", scale * b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
        return out

    t.extract_extra = extract
    return t


METHOD = Method("lora", "LoRA on every linear layer and attention Q/K/V of the tower", build)
