"""CoOp (prompt learning): the words before the class name in each recipe template become
learned vectors, starting from those words; both towers stay frozen (prompting.py)."""

from .method import Method


def prompt(tokens, width, spec, loaded):
    from .prompting import FreeChange

    return FreeChange(tokens, width)


METHOD = Method("coop", "prompt vectors before the class name (both towers frozen)", prompt=prompt, lr=2e-3)  # not tuned
