"""What a diagnosis selects, and the geometry of selecting it (METHODS.md §1):
fc1 entries by |mean grad| (per-layer top-s share), attention heads by the sum of squared
mean gradients over their Q, K and V rows (per-layer top-k), or the same budget at random
places (the localization control). Stored beside a diagnosis as safetensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models.towers import Tower


@dataclass
class Masks:
    """What a diagnosis selects: entry masks for fc1 weights, head indices for Q/K/V weights."""

    fc1: dict[str, torch.Tensor]  # param name -> bool mask, same shape as the weight
    heads: dict[str, list[int]]  # Q/K/V param name -> selected head indices

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fc1/{k}": v.to(torch.uint8).contiguous() for k, v in self.fc1.items()}
        out.update({f"heads/{k}": torch.tensor(v, dtype=torch.int64) for k, v in self.heads.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Masks":
        fc1 = {k[4:]: v.bool() for k, v in tensors.items() if k.startswith("fc1/")}
        heads = {k[6:]: [int(h) for h in v.tolist()] for k, v in tensors.items() if k.startswith("heads/")}
        return cls(fc1, heads)

    @property
    def selected_entries(self) -> int:
        return int(sum(int(m.sum()) for m in self.fc1.values()))


def select_fc1(grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the top `fraction` entries of |grad| in this layer."""
    k = max(1, math.ceil(fraction * grad.numel()))
    flat = grad.abs().reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(grad.shape)


def score_heads(grad: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head sum of squared mean gradients over its Q, K and V rows: (num_heads,)."""
    width = grad.shape[1]
    return grad.reshape(3, num_heads, width // num_heads, width).pow(2).sum(dim=(0, 2, 3))


def head_rows(num_rows: int, heads: list[int], num_heads: int) -> torch.Tensor:
    """Boolean (3W,) mask of the Q, K and V rows of the given heads."""
    width = num_rows // 3
    head_dim = width // num_heads
    mask = torch.zeros(3, num_heads, head_dim, dtype=torch.bool)
    mask[:, heads] = True
    return mask.reshape(-1)


def build_masks(grads, tower: Tower, fraction: float, k: int, control: str = "none", seed: int = 0) -> Masks:
    generator = torch.Generator().manual_seed(seed)
    fc1, heads = {}, {}
    for name in tower.fc1:
        if control == "random":
            n = grads[name].numel()
            chosen = torch.randperm(n, generator=generator)[: max(1, math.ceil(fraction * n))]
            mask = torch.zeros(n, dtype=torch.bool)
            mask[chosen] = True
            fc1[name] = mask.reshape(grads[name].shape)
        else:
            fc1[name] = select_fc1(grads[name], fraction)
    for name in tower.qkv:
        top = min(k, tower.num_heads)
        if control == "random":
            heads[name] = sorted(torch.randperm(tower.num_heads, generator=generator)[:top].tolist())
        else:
            heads[name] = sorted(torch.topk(score_heads(grads[name], tower.num_heads), top).indices.tolist())
    return Masks(fc1, heads)
