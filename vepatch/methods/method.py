"""The shape every patch method has (as peft's tuners: one file per method, one record each).

A method says what it needs and builds a `Trainable` on a private copy of the vision tower;
apply, the bench, the speed tool, the CLI help and the recipe check read the records from the
registry in `methods/__init__.py`. Adding a method = one file here plus one line there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Optional

if TYPE_CHECKING:
    from torch import nn

    from ..masks import Masks
    from ..models import LoadedModel
    from ..models.towers import Tower
    from ..recipe import ApplySpec
    from .trainable import Trainable

MaskSource = Literal["none", "diagnosis", "random", "logit-norm"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: what it trains
    # a vision method: build(tower copy, tower map, masks, spec) -> what it trains on the tower
    build: Optional[Callable[["nn.Module", "Tower", Optional["Masks"], "ApplySpec"], "Trainable"]] = None
    # where its masks come from: 'diagnosis' = LoRSU's gradient scores (a matching diagnosis of
    # the current version is reused, else they are scored on the shots); 'random' = LoRSU's
    # budget at random places; 'logit-norm' = SPU's label-free fc1 score; 'none' = no masks
    masks: MaskSource = "none"
    lr: float = 1e-3  # default Adam learning rate (apply.lr = 0 picks it); README "Defaults"
    # a prompt method (both towers frozen): prompt(tokens, width, spec, loaded) -> the module
    # whose output is the change to one prefix's learned vectors (prompting.py trains it)
    prompt: Optional[Callable[[int, int, "ApplySpec", "LoadedModel"], "nn.Module"]] = None
    vision_prompt: bool = False  # a prompt method that also learns a visual prompt (DCAR's dual prompts)
    reweight: bool = False  # DCAR's category-attribute reweighting (methods/dcar.py)

    def make(self, visual: "nn.Module", tower: "Tower", masks: Optional["Masks"], spec: "ApplySpec") -> "Trainable":
        """`build`, with the starting point recorded so that `Trainable.reset` returns to it."""
        return self.build(visual, tower, masks, spec).snapshot()

    @property
    def needs_masks(self) -> bool:
        return self.masks != "none"

    @property
    def side(self) -> str:
        """'vision': it changes the vision tower; 'text': it learns prompt vectors (prompts.py)."""
        return "text" if self.prompt is not None else "vision"
