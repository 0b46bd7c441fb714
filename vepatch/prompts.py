"""Prompt patches: learned vectors for the words a prompt starts with (CoOp's context).

A prompt template such as "a photo of a {}." has a *prefix*, the words before the class name
("a photo of a"). A prompt patch gives that prefix learned token embeddings: wherever the text
tower reads a prompt whose first tokens are the prefix's (the recipe's prompts for any class
name, a guard suite or a caption that starts the same way), it reads the learned vectors
instead. Both towers stay frozen; the patch is one small tensor per prefix.

On the model, the learned vectors live in `model.vepatch_prompts` (a `PromptBank`): one slot
per prefix, parameter `vepatch_prompts.slots.<key>.context` (tokens x width), starting at the
prefix's own embeddings, so a slot at its start changes nothing, bit for bit. A forward hook on
the text tower's token-embedding table swaps the vectors in. A delta stores, per slot, the
change of the context (`#dense`, scaled by the strength like any change) and the prefix's token
ids and text (`#prompt.ids`, `#prompt.text`), so applying it needs nothing but the model.

Written by hand: open_clip has no prompt learning, and peft's prompt tuners prepend virtual
tokens to a Hugging Face model's input, which neither open_clip's own text transformer nor
open_clip's wrapper of the MiniLM tower (it calls the HF model with input ids) lets through.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from .errors import ModelError, UsageError

BANK = "vepatch_prompts"
PREFIX = f"{BANK}.slots."


class PromptSlot(nn.Module):
    """Learned vectors for one prefix: `context` (tokens x width) replaces the prefix's embeddings."""

    def __init__(self, ids: torch.Tensor, start: torch.Tensor, text: str):
        super().__init__()
        self.register_buffer("ids", ids.long().clone(), persistent=False)
        self.register_buffer("start", start.detach().clone(), persistent=False)
        self.context = nn.Parameter(start.detach().clone(), requires_grad=False)
        self.text = text
        self.change: Optional[nn.Module] = None  # while training: a module whose output is added

    def value(self) -> torch.Tensor:
        return self.context if self.change is None else self.context + self.change()

    def changed(self) -> bool:
        return self.change is not None or not torch.equal(self.context.detach(), self.start)


class DescriptionWeights(nn.Module):
    """DCAR's attribute-level weights: how much each template (a description of the class)
    counts in each class's embedding, instead of the plain average. `w` (classes x templates)
    starts uniform, so at its start the head is the zero-shot head, bit for bit."""

    def __init__(self, classes: list[str], templates: list[str]):
        super().__init__()
        self.classes, self.templates = list(classes), list(templates)
        self.w = nn.Parameter(torch.full((len(classes), len(templates)), 1.0 / len(templates)), requires_grad=False)

    def changed(self) -> bool:
        return not torch.equal(self.w.detach(), torch.full_like(self.w, 1.0 / self.w.shape[1]))

    def label(self) -> str:
        import json

        return json.dumps({"classes": self.classes, "templates": self.templates})


class PromptBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.slots = nn.ModuleDict()
        self.weights = nn.ModuleDict()


WEIGHTS = f"{BANK}.weights."


def weights_key(classes, templates) -> str:
    import json

    return hashlib.sha256(json.dumps([list(classes), list(templates)]).encode()).hexdigest()[:12]


def ensure_weights(model: nn.Module, classes: list[str], templates: list[str]) -> tuple[str, DescriptionWeights]:
    """The description weights for these classes and templates (made uniform if new)."""
    found = bank(model, create=True).weights
    key = weights_key(classes, templates)
    if key not in found:
        found[key] = DescriptionWeights(classes, templates).to(token_embedding(model).weight.device)
    return f"{WEIGHTS}{key}.w", found[key]


def description_weights(model: nn.Module, classes, templates) -> Optional[torch.Tensor]:
    """(classes, templates) weights a patch learned for exactly these classes and templates, or
    None (the plain average)."""
    found = bank(model)
    entry = found.weights[weights_key(classes, templates)] if found is not None and \
        weights_key(classes, templates) in found.weights else None
    return entry.w.detach() if entry is not None and entry.changed() else None


def key_of(ids: torch.Tensor) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The text tower's token-embedding table: open_clip's own text transformer, or the HF one."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(getattr(text, "transformer", None), "get_input_embeddings"):
        return text.transformer.get_input_embeddings()
    for owner in (text, model):
        table = getattr(owner, "token_embedding", None)
        if isinstance(table, nn.Embedding):
            return table
    raise ModelError(f"{type(model).__name__}: no token-embedding table vepatch knows",
                     "prompt patches work with open_clip's text transformer and its Hugging Face text towers")


def bank(model: nn.Module, create: bool = False) -> Optional[PromptBank]:
    found = getattr(model, BANK, None)
    if found is None and create:
        found = PromptBank()
        setattr(model, BANK, found)
        table = token_embedding(model)
        # a plain attribute, not a child module (it is the model's), read by the hook: a deep
        # copy of the model copies both together
        object.__setattr__(table, "_vepatch_bank", found)
        table.register_forward_hook(_swap_in)
        found.to(table.weight.device)
    return found


def _swap_in(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """The token-embedding table's forward hook: learned vectors in place of each matching prefix."""
    found = module.__dict__.get("_vepatch_bank")
    slots = [s for s in found.slots.values() if s.changed()] if found is not None else []
    if not slots:
        return output
    ids, out = args[0], output.clone()
    for slot in slots:
        n = len(slot.ids)
        if ids.shape[1] <= n:
            continue
        match = (ids[:, 1:1 + n] == slot.ids.to(ids.device)).all(1)
        if match.any():
            out[match, 1:1 + n] = slot.value().to(out.dtype)
    return out


def ensure_slot(model: nn.Module, ids: torch.Tensor, text: str) -> tuple[str, PromptSlot]:
    """The slot for prefix `ids` (made at the prefix's own embeddings if new): its parameter's
    full name and the slot."""
    slots = bank(model, create=True).slots
    key = key_of(ids)
    if key not in slots:
        table = token_embedding(model)
        slots[key] = PromptSlot(ids.to(table.weight.device), table.weight[ids.to(table.weight.device)].detach(), text)
    return f"{PREFIX}{key}.context", slots[key]


def prefix_ids(tokenizer, template: str) -> tuple[torch.Tensor, str]:
    """The token ids of a template's prefix (the words before '{}'), as they stand at positions
    1..n of every prompt made from it."""
    prefix = template.split("{}", 1)[0].strip()
    if not prefix:
        raise UsageError(f"template '{template}' has no words before the class name",
                         "prompt methods learn the words before '{}': use a template like 'a photo of a {}.'")
    empty, alone = tokenizer([""])[0], tokenizer([prefix])[0]
    n = int((alone != 0).sum() - (empty != 0).sum())
    ids = alone[1:1 + n].long()
    filled = tokenizer([template.replace("{}", "object", 1)])[0]
    if n < 1 or not torch.equal(filled[1:1 + n].long(), ids):
        raise UsageError(f"template '{template}': its prefix is not tokenized the same alone and in a prompt",
                         "end the prefix at a word boundary ('a photo of a {}.')")
    return ids, prefix


def attach(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make the slots a delta's `#prompt.ids` and `#weights.text` entries name (applying a delta
    calls this first)."""
    import json

    for name, t in tensors.items():
        if name.endswith("#weights.text"):
            label = json.loads(bytes(t.tolist()).decode("utf-8", "replace"))
            made, _ = ensure_weights(model, label["classes"], label["templates"])
            if made != name.split("#", 1)[0]:
                raise ModelError(f"delta entry {name}: its classes and templates do not give its key",
                                 "the patch is damaged; it is refused")
    for name, ids in tensors.items():
        if name.endswith("#prompt.ids"):
            text = bytes(tensors[name.replace("#prompt.ids", "#prompt.text")].tolist()).decode("utf-8", "replace")
            made, _ = ensure_slot(model, ids, text)
            if made != name.split("#", 1)[0]:
                raise ModelError(f"delta entry {name}: its ids do not give its slot", "the patch is damaged; it is refused")


def detach(model: nn.Module) -> None:
    """Every slot back to its start (nothing learned is read any more)."""
    found = bank(model)
    if found is not None:
        with torch.no_grad():
            for slot in found.slots.values():
                slot.context.copy_(slot.start)
            for entry in found.weights.values():
                entry.w.fill_(1.0 / entry.w.shape[1])


def changed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learned contexts that differ from their start, by parameter name (what the model's
    fingerprint and its text heads' cache key add)."""
    found = bank(model)
    if found is None:
        return {}
    return {**{f"{PREFIX}{k}.context": s.value().detach() for k, s in found.slots.items() if s.changed()},
            **{f"{WEIGHTS}{k}.w": e.w.detach() for k, e in found.weights.items() if e.changed()}}


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A prompt patch's parameters -> what each is, in words, from a delta's entries (`show`'s rows)."""
    import json

    from .visual_prompts import PAD
    from .visual_prompts import PREFIX as VISUAL

    out = {}
    for name, t in tensors.items():
        param = name.split("#", 1)[0]
        if name.endswith("#prompt.text"):
            out[param] = f'prompt "{bytes(t.tolist()).decode("utf-8", "replace")}" (learned vectors)'
        elif name.endswith("#weights.text"):
            label = json.loads(bytes(t.tolist()).decode("utf-8", "replace"))
            out[param] = f"description weights ({len(label['classes'])} classes x {len(label['templates'])} templates)"
        elif name.endswith("#vprompt.tokens"):
            out[param] = f"visual prompt ({len(t)} tokens after the class token)"
        elif param == f"{VISUAL}{PAD}.pixels":
            out[param] = "visual prompt (learned image border)"
    return out


def text_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


EXPORT_FILE = "vepatch_prompts.safetensors"  # beside an exported bundle's weights


def export_bytes(model: nn.Module) -> Optional[bytes]:
    """The learned prompt vectors of `model` (None when it has none): per slot its context and
    its prefix's token ids, the prefixes' text in the metadata; and the tower's active visual
    prompts (DCAR) as `visual.<set>.<tensor>`."""
    from safetensors.torch import save

    from . import visual_prompts

    found = bank(model)
    slots = {k: s for k, s in found.slots.items() if s.changed()} if found is not None else {}
    tensors = {f"visual.{k}": v for k, v in visual_prompts.export_state(model.visual).items()}
    weights = {k: e for k, e in found.weights.items() if e.changed()} if found is not None else {}
    if not slots and not tensors and not weights:
        return None
    for k, e in weights.items():
        tensors[f"weights.{k}.w"] = e.w.detach().float().cpu().contiguous()
    for k, s in slots.items():
        tensors[f"{k}.context"] = s.value().detach().float().cpu().contiguous()
        tensors[f"{k}.ids"] = s.ids.detach().cpu().long().contiguous()
    return save(tensors, metadata={"format": "vepatch-prompts/1", **{k: s.text for k, s in slots.items()},
                                   **{f"weights.{k}": e.label() for k, e in weights.items()}})


def install(model: nn.Module, path) -> None:
    """Give an open_clip model (loaded from an exported bundle) the learned prompt vectors saved
    beside it: `install(model, "DIR/vepatch_prompts.safetensors")`."""
    import json

    from safetensors import safe_open

    from . import visual_prompts

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        visual_prompts.install(model.visual, {n[len("visual."):]: f.get_tensor(n) for n in names if n.startswith("visual.")})
        for name in (n for n in names if n.startswith("weights.")):
            label = json.loads(meta[name.rsplit(".", 1)[0]])
            _, entry = ensure_weights(model, label["classes"], label["templates"])
            with torch.no_grad():
                entry.w.copy_(f.get_tensor(name).to(entry.w))
        for key in sorted({name.rsplit(".", 1)[0] for name in names if not name.startswith(("visual.", "weights."))}):
            _, slot = ensure_slot(model, f.get_tensor(f"{key}.ids"), meta.get(key, ""))
            with torch.no_grad():
                slot.context.copy_(f.get_tensor(f"{key}.context").to(slot.context))
