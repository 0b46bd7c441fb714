"""Per-architecture knowledge: where a vision tower's fc1-like weights, fused Q/K/V heads,
output projection and norms live. This is the only module that knows module names.

Supported: open_clip's own ViT, timm ViT trunks, timm CNN trunks (EfficientNet/MobileNet
inverted residuals: the 1x1 expansion `conv_pw`; ConvNeXt: `mlp.fc1`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError

PREFIX = "visual."  # every name below is a full parameter name of the CLIP model


@dataclass(frozen=True)
class Tower:
    kind: str  # 'openclip-vit' | 'timm-vit' | 'timm-cnn'
    blocks: list[str]  # block module paths in depth order (full names, 'visual....')
    fc1: list[str]  # per block: the MLP first layer's weight (CNN: expansion conv), same order as blocks
    qkv: list[str]  # per block: the fused Q/K/V weight (3W x W); empty for CNNs
    num_heads: int  # attention heads per block (0 for CNNs)
    proj: str  # the projection into the joint space ('' if the tower has none)
    fc1_bias: list[str]  # biases of the fc1 layers ('' where there is none)
    qkv_bias: list[str]  # biases of the Q/K/V layers
    norms: list[str]  # affine parameters of every norm layer (LayerNorm, BatchNorm, GroupNorm)
    tail: str = ""  # the module after the last block whose input is the only thing flowing on ('' if none)

    def block_of(self, param: str) -> str:
        """The block a parameter belongs to ('' if none)."""
        best = ""
        for b in self.blocks:
            if param.startswith(b + ".") and len(b) > len(best):
                best = b
        return best

    def entry_for(self, params: list[str]) -> str:
        """The earliest module whose input a change to `params` leaves untouched, so that input
        can be computed once and reused: the first block any of them lies in, the tail when they
        only touch what follows the blocks, '' (the image itself) when one lies before the blocks."""
        points = self.blocks + ([self.tail] if self.tail else [])
        first = len(points)
        for p in params:
            owners = [i for i, e in enumerate(points) if p.startswith(e + ".")]
            if owners:
                first = min(first, owners[-1])
            elif p == self.proj and self.tail:
                first = min(first, len(points) - 1)
            else:
                return ""
        return points[first] if first < len(points) else ""


def describe_tower(model: nn.Module) -> Tower:
    """Find where things live in `model.visual`; ModelError for towers vepatch does not know."""
    visual = model.visual
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return _openclip_vit(visual)
    if isinstance(visual, TimmModel):
        return _timm_tower(visual)
    raise ModelError(
        f"vision tower {type(visual).__name__} is not supported",
        "vepatch knows open_clip ViTs and timm ViT/EfficientNet/MobileNet/ConvNeXt trunks",
    )


def _norm_params(visual: nn.Module) -> list[str]:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    out = []
    for name, module in visual.named_modules():
        if isinstance(module, norm_types):
            out += [f"{PREFIX}{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return out


def _openclip_vit(visual) -> Tower:
    blocks, fc1, qkv, fc1_bias, qkv_bias = [], [], [], [], []
    heads = 0
    for i, block in enumerate(visual.transformer.resblocks):
        path = f"{PREFIX}transformer.resblocks.{i}"
        blocks.append(path)
        fc1.append(f"{path}.mlp.c_fc.weight")
        fc1_bias.append(f"{path}.mlp.c_fc.bias")
        qkv.append(f"{path}.attn.in_proj_weight")
        qkv_bias.append(f"{path}.attn.in_proj_bias" if block.attn.in_proj_bias is not None else "")
        heads = block.attn.num_heads
    proj = f"{PREFIX}proj" if getattr(visual, "proj", None) is not None else ""
    # without attention pooling, ln_post's input (tokens, or the pooled token) is all that flows on
    tail = f"{PREFIX}ln_post" if getattr(visual, "attn_pool", None) is None else ""
    return Tower("openclip-vit", blocks, fc1, qkv, heads, proj, fc1_bias, qkv_bias, _norm_params(visual), tail)


def _timm_tower(visual) -> Tower:
    from timm.models._efficientnet_blocks import InvertedResidual

    trunk = visual.trunk
    blocks, fc1, qkv, fc1_bias, qkv_bias = [], [], [], [], []
    heads = 0
    for name, module in trunk.named_modules():
        path = f"{PREFIX}trunk.{name}"
        attn = getattr(module, "attn", None)
        mlp = getattr(module, "mlp", None)
        if attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear) and mlp is not None:
            blocks.append(path)
            fc1.append(f"{path}.mlp.fc1.weight")
            fc1_bias.append(f"{path}.mlp.fc1.bias" if mlp.fc1.bias is not None else "")
            qkv.append(f"{path}.attn.qkv.weight")
            qkv_bias.append(f"{path}.attn.qkv.bias" if attn.qkv.bias is not None else "")
            heads = attn.num_heads
        elif isinstance(module, InvertedResidual):
            blocks.append(path)
            fc1.append(f"{path}.conv_pw.weight")
            fc1_bias.append(f"{path}.conv_pw.bias" if module.conv_pw.bias is not None else "")
        elif attn is None and mlp is not None and hasattr(mlp, "fc1") and type(module).__name__.startswith("ConvNeXt"):
            blocks.append(path)
            fc1.append(f"{path}.mlp.fc1.weight")
            fc1_bias.append(f"{path}.mlp.fc1.bias" if mlp.fc1.bias is not None else "")
    if not blocks:
        raise ModelError(
            f"timm trunk {type(trunk).__name__} has no block vepatch knows",
            "supported: ViT blocks (attn.qkv + mlp.fc1), inverted residuals (conv_pw), ConvNeXt blocks",
        )
    kind = "timm-vit" if qkv else "timm-cnn"
    proj, tail = "", ""
    if isinstance(getattr(visual.head, "proj", None), nn.Linear):
        proj, tail = f"{PREFIX}head.proj.weight", f"{PREFIX}head"  # open_clip's TimmModel: head(trunk(x))
    else:
        classifier = trunk.get_classifier() if hasattr(trunk, "get_classifier") else None
        if isinstance(classifier, nn.Linear):
            name = next(n for n, m in trunk.named_modules() if m is classifier)
            proj, tail = f"{PREFIX}trunk.{name}.weight", f"{PREFIX}trunk.{name}"  # its input: the pooled features
    return Tower(kind, blocks, fc1, qkv, heads, proj, fc1_bias, qkv_bias, _norm_params(visual), tail)
