"""The pieces every method is made of (methods/<name>.py combine them): a masked dense update (only the mask's entries ever
change: the *update* is masked, so optimizer state cannot drift the rest) and a row-masked
low-rank change (LoRA whose `up` factor is zero outside the allowed rows).

Written by hand because LoRSU needs LoRA restricted to some heads' rows of a fused Q/K/V
weight (and of open_clip's bare `proj` parameter), which peft does not offer; the `lora`
baseline uses peft itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..delta import Delta


class LowRankChange(nn.Module):
    """Parametrization W -> W + scale * (up * row_mask) @ down, reshaped to W."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, row_mask: Optional[torch.Tensor] = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, cols))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(rows, rank))
        self.scale = alpha / rank
        mask = torch.ones(rows, 1) if row_mask is None else row_mask.float().reshape(rows, 1)
        self.register_buffer("row_mask", mask)

    def change(self) -> torch.Tensor:
        return self.scale * (self.up * self.row_mask) @ self.down

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.change().reshape(weight.shape).to(weight.dtype)


@dataclass
class Trainable:
    """What one method trains on `visual` (a private copy of the tower)."""

    visual: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)
    masked: dict[str, tuple[nn.Parameter, torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)
    lowrank: dict[str, LowRankChange] = field(default_factory=dict)
    extract_extra: Optional[Callable[[], Delta]] = None  # methods with their own delta (peft)
    summary: dict[str, int] = field(default_factory=dict)  # param -> entries allowed to change
    keep: float = 1.0  # share of the trained change the delta keeps (apply.wise_alpha for full+wise)
    start: dict[str, torch.Tensor] = field(default_factory=dict)  # tower name -> initial value of every other trained tensor (LoRA factors)

    @classmethod
    def frozen(cls, visual: nn.Module) -> "Trainable":
        """Start from `visual` with every parameter frozen; methods then add what they train."""
        for p in visual.parameters():
            p.requires_grad_(False)
        return cls(visual)

    def to(self, device: str | torch.device) -> "Trainable":
        """Move the tower and what is kept beside it (the parent's values, the masks) to
        `device`. Parameters are looked up again by name: a move may replace them."""
        names = {id(p): n for n, p in self.visual.named_parameters()}
        self.visual.to(device)
        now = dict(self.visual.named_parameters())
        self.params = [now[names[id(p)]] for p in self.params]
        self.masked = {name: (now[names[id(p)]], original.to(device), None if mask is None else mask.to(device))
                       for name, (p, original, mask) in self.masked.items()}
        return self

    def parameter(self, full_name: str) -> nn.Parameter:
        return _param(self.visual, full_name)

    def add_masked(self, full_name: str, mask: Optional[torch.Tensor]) -> None:
        """Train parameter `full_name` ('visual.…'), changing only `mask`'s entries (None: all)."""
        p = _param(self.visual, full_name)
        p.requires_grad_(True)
        self.masked[full_name] = (p, p.detach().clone(), None if mask is None else mask.to(p.device))
        self.params.append(p)
        self.summary[full_name] = p.numel() if mask is None else int(mask.sum())

    def add_lowrank(self, full_name: str, rank: int, alpha: float, row_mask: Optional[torch.Tensor] = None) -> None:
        module, attr = _owner(self.visual, full_name)
        weight = getattr(module, attr)
        rows, cols = weight.shape[0], weight[0].numel()
        change = LowRankChange(rows, cols, rank, alpha, row_mask).to(weight.device)
        parametrize.register_parametrization(module, attr, change)
        self.lowrank[full_name] = change
        self.params += [change.up, change.down]
        allowed = rows if row_mask is None else int(row_mask.sum())
        self.summary[full_name] = rank * (allowed + cols)

    @torch.no_grad()
    def snapshot(self) -> "Trainable":
        """Record where training starts: every trained tensor that is not a masked parent
        weight (those keep their parent's value beside them), i.e. the low-rank factors with
        their random `down` / `lora_A` initializations. Method.make calls it after building."""
        masked = {id(p) for p, _, _ in self.masked.values()}
        names = {id(p): n for n, p in self.visual.named_parameters()}
        self.start = {names[id(p)]: p.detach().clone() for p in self.params if id(p) not in masked}
        return self

    @torch.no_grad()
    def reset(self) -> None:
        """Back to where training started: masked params restored to the parent, every other
        trained tensor (both LoRA factors, vepatch's and peft's) to its snapshot, so a retry
        with the same seed trains the same patch."""
        for p, original, _ in self.masked.values():
            p.copy_(original)
        now = dict(self.visual.named_parameters())
        for name, value in self.start.items():
            now[name].copy_(value)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, original, mask in self.masked.values():
            if mask is not None:
                p.copy_(torch.where(mask, p, original))

    def l2(self) -> torch.Tensor:
        """Squared norm of the change so far (the L2 regularizer)."""
        total = torch.zeros((), device=self.params[0].device) if self.params else torch.zeros(())
        for p, original, mask in self.masked.values():
            diff = p - original
            total = total + (diff if mask is None else diff * mask).pow(2).sum()
        for change in self.lowrank.values():
            total = total + change.change().pow(2).sum()
        return total

    @torch.no_grad()
    def delta(self) -> Delta:
        out = Delta()
        for name, (p, original, mask) in self.masked.items():
            change = (p.detach() - original).float().cpu()
            if mask is None:
                out.add_dense(name, change)
            else:
                out.add_sparse(name, change, mask.cpu())
        for name, change in self.lowrank.items():
            up = (change.scale * change.up * change.row_mask).detach().float().cpu()
            out.add_lowrank(name, up, change.down.detach().float().cpu(), change.row_mask.reshape(-1).bool().cpu())
        if self.extract_extra is not None:
            out.tensors.update(self.extract_extra().tensors)
        return out.scaled(self.keep)


def _param(visual: nn.Module, full_name: str) -> nn.Parameter:
    return dict(visual.named_parameters())[full_name.removeprefix("visual.")]


def _owner(visual: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    path, _, attr = full_name.removeprefix("visual.").rpartition(".")
    return (visual.get_submodule(path) if path else visual), attr
