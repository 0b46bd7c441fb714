"""Patch methods. Each builds a `Trainable` on a copy of the vision tower: the tensors to
optimize, what to enforce after each step, and how to read the result out as a Delta.

  lorsu         sparse update of the selected fc1 entries + LoRA on the selected heads' Q/K/V
                rows + LoRA on the output projection (CNN towers: expansion convs + projection)
  lorsu-random  the same budget at random places (the localization control)
  lorsu-fc1     only the fc1 part;   lorsu-heads  only the heads part (+ projection)
  spu           fc1 top-s by SPU's label-free score (grad of ||logits||^2), nothing else
  lora          peft LoRA on the tower's linear layers
  full          every tower parameter;   ln  norm layers only
  full+wise     `full`, then WiSE-FT weight averaging with the parent: the stored delta is
                WISE_ALPHA * (fine-tuned - parent) (Wortsman et al., 2022, mixing 0.5)
"""

from .trainable import Trainable

METHODS = ("lorsu", "lorsu-random", "lorsu-fc1", "lorsu-heads", "spu", "lora", "full", "full+wise", "ln")
MASKED_METHODS = ("lorsu", "lorsu-random", "lorsu-fc1", "lorsu-heads", "spu")
WISE_ALPHA = 0.5  # weight of the fine-tuned model in `full+wise`

__all__ = ["METHODS", "MASKED_METHODS", "WISE_ALPHA", "Trainable"]
