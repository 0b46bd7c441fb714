"""Visual prompts: the vision side of DCAR's dual prompts (methods/dcar.py).

Two forms, by tower:
  ViT (open_clip's VisionTransformer)  `tokens`: n learned tokens inserted after the class
        token where the sequence enters the blocks (VPT-shallow), taken out again after the
        last block, so pooling and everything after it see the sequence they always saw.
        Strength: a `gate` g in [0, 1] weights the prompt tokens in every attention softmax
        (a logit bias of log g on their keys): g = 1 is plain VPT, g -> 0 fades them out, and
        at g = 0 they are not inserted at all. The gate is the delta's linear part (a dense
        change from 0 to 1, scaled by lambda like any change); the tokens themselves are
        stored unscaled (`#vprompt.tokens`).
  CNN (timm trunks) and any other tower  `pad`: a learned additive image border (the padding
        prompt of Bahng et al. 2022, "Exploring Visual Prompts for Adapting Large-Scale
        Models": the CNN analogue of prompt tokens, a change to what the tower reads, not to
        its weights), `prompt_pad` pixels wide, added to the normalized input. Linear in lambda:
        stored as sparse entries of a zero image.
A set at rest (gate 0, or an all-zero border) changes nothing, bit for bit, and is left out of
the tower's fingerprint, so a model that carried a prompt once is the model it was.

The sets live in `visual.vepatch_visual_prompts` (so their parameters are vision-tower
parameters: `visual.vepatch_visual_prompts.<key>.tokens|gate|pixels`), hooks on the tower read
them. Written by hand: open_clip has no visual prompts and peft's prompt tuners work on a
Hugging Face model's input ids, not on an image tower.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from .errors import ModelError

BANK = "vepatch_visual_prompts"
PREFIX = f"visual.{BANK}.sets."  # full parameter names of the sets: PREFIX + key + ".tokens"
PAD = "pad"  # the key of the one padding prompt of a tower (later patches add to it)


class PromptTokens(nn.Module):
    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().clone().float(), requires_grad=False)
        self.gate = nn.Parameter(torch.zeros(()), requires_grad=False)

    def active(self) -> bool:
        return bool(self.gate.detach() > 0)


class PadPrompt(nn.Module):
    def __init__(self, size: tuple[int, int], width: int):
        super().__init__()
        self.pixels = nn.Parameter(torch.zeros(3, *size), requires_grad=False)
        self.register_buffer("border", border_mask(size, width), persistent=False)

    def active(self) -> bool:
        return bool(self.pixels.detach().any())

    def value(self) -> torch.Tensor:
        return self.pixels * self.border


def border_mask(size: tuple[int, int], width: int) -> torch.Tensor:
    h, w = size
    mask = torch.ones(3, h, w, dtype=torch.bool)
    if 0 < width and 2 * width < min(h, w):  # width 0: every pixel (a stored patch's indices say which)
        mask[:, width:h - width, width:w - width] = False
    return mask


class VisualPromptBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.sets = nn.ModuleDict()


def is_vit(visual: nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(visual, VisionTransformer)


def bank(visual: nn.Module, create: bool = False) -> Optional[VisualPromptBank]:
    """The tower's prompt sets (made, with the hooks that read them, when `create`)."""
    found = getattr(visual, BANK, None)
    if found is None and create:
        found = VisualPromptBank()
        setattr(visual, BANK, found)
        # the hooked modules read the bank through a plain attribute (a deep copy of the tower
        # copies both together, as prompts.py does for the text side)
        if is_vit(visual):
            for module in (visual.ln_pre, visual.transformer):
                object.__setattr__(module, "_vepatch_vbank", found)
            visual.ln_pre.register_forward_pre_hook(_insert_tokens)
            visual.transformer.register_forward_pre_hook(_gate_mask, with_kwargs=True)
            visual.transformer.register_forward_hook(_remove_tokens)
        else:
            object.__setattr__(visual, "_vepatch_vbank", found)
            visual.register_forward_pre_hook(_add_border)
        found.to(next(visual.parameters()).device)
    return found


def _active_tokens(module: nn.Module) -> list[PromptTokens]:
    found = module.__dict__.get("_vepatch_vbank")
    if found is None:
        return []
    return [s for s in found.sets.values() if isinstance(s, PromptTokens) and s.active()]


def _insert_tokens(module, args):
    sets = _active_tokens(module)
    if not sets:
        return None
    x = args[0]
    prompts = torch.cat([s.tokens for s in sets]).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return (torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1), *args[1:])


def _gate_mask(module, args, kwargs):
    sets = _active_tokens(module)
    if not sets or all(float(s.gate) == 1.0 for s in sets):
        return None  # plain VPT: no bias needed (and none is the bit-identical path)
    x = args[0] if args else kwargs["x"]
    length = x.shape[1] if module.batch_first else x.shape[0]
    bias = torch.zeros(length, device=x.device, dtype=torch.float32)
    at = 1
    for s in sets:
        bias[at:at + len(s.tokens)] = torch.log(s.gate.detach().float().clamp(max=1.0))
        at += len(s.tokens)
    return args, {**kwargs, "attn_mask": bias.unsqueeze(0).expand(length, -1)}


def _remove_tokens(module, args, output):
    sets = _active_tokens(module)
    if not sets:
        return None
    n = sum(len(s.tokens) for s in sets)
    return torch.cat([output[:, :1], output[:, 1 + n:]], dim=1) if module.batch_first else \
        torch.cat([output[:1], output[1 + n:]], dim=0)


def _add_border(module, args):
    found = module.__dict__.get("_vepatch_vbank")
    pad = found.sets[PAD] if found is not None and PAD in found.sets else None
    if pad is None or not (pad.active() or pad.pixels.requires_grad):
        return None
    x = args[0]
    return (x + pad.value().to(x.dtype), *args[1:])


def key_of(tokens: torch.Tensor) -> str:
    t = tokens.detach().float().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def image_size(visual: nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", None)
    if size is None:
        raise ModelError(f"vision tower {type(visual).__name__}: its image size is unknown",
                         "a padding prompt needs the tower's input size (open_clip towers have `image_size`)")
    return (size, size) if isinstance(size, int) else tuple(size)


def add_tokens(visual: nn.Module, tokens: torch.Tensor) -> tuple[str, PromptTokens]:
    """A token set (at rest: gate 0) made for `tokens`, keyed by their content."""
    sets = bank(visual, create=True).sets
    key = key_of(tokens)
    if key not in sets:
        sets[key] = PromptTokens(tokens.to(next(visual.parameters()).device))
    return f"{PREFIX}{key}", sets[key]


def pad_prompt(visual: nn.Module, width: int) -> tuple[str, PadPrompt]:
    """The tower's padding prompt (made at zero if new)."""
    sets = bank(visual, create=True).sets
    if PAD not in sets:
        sets[PAD] = PadPrompt(image_size(visual), width).to(next(visual.parameters()).device)
    return f"{PREFIX}{PAD}", sets[PAD]


def attach(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make the sets a delta names (at rest) before its changes are added (apply_delta)."""
    for name, t in tensors.items():
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX):].split(".", 1)[0]
        if name.endswith("#vprompt.tokens"):
            made, _ = add_tokens(model.visual, t)
            if made != f"{PREFIX}{key}":
                raise ModelError(f"delta entry {name}: its tokens do not give its key", "the patch is damaged; it is refused")
        elif key == PAD and name.endswith(("#sparse.index", "#sparse.bits", "#sparse.value")):
            pad_prompt(model.visual, 0)  # the border is in the stored indices
        elif not name.endswith(".gate#dense"):
            raise ModelError(f"delta entry {name}: not a visual prompt vepatch knows", "the patch is damaged; it is refused")


def resting_names(visual: nn.Module) -> set[str]:
    """State-dict names (relative to the tower) of the sets at rest: left out of fingerprints."""
    found = bank(visual)
    if found is None:
        return set()
    out = set()
    for key, s in found.sets.items():
        if not s.active():
            out |= {f"{BANK}.sets.{key}.{n}" for n, _ in s.named_parameters()}
    return out


def export_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The active sets' tensors (relative names under the bank), for the export file."""
    found = bank(visual)
    if found is None:
        return {}
    return {f"{key}.{n}": p.detach().float().cpu().contiguous()
            for key, s in found.sets.items() if s.active() for n, p in s.named_parameters()}


def install(visual: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a tower the sets `export_state` wrote."""
    for name in sorted(k for k in tensors if k.endswith(".tokens")):
        key = name.rsplit(".", 1)[0]
        _, s = add_tokens(visual, tensors[name])
        with torch.no_grad():
            s.gate.copy_(tensors[f"{key}.gate"])
    if f"{PAD}.pixels" in tensors:
        _, pad = pad_prompt(visual, 0)
        with torch.no_grad():
            pad.pixels.copy_(tensors[f"{PAD}.pixels"])


def load_pristine(visual: nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """`visual.load_state_dict(pristine)` where `pristine` was taken before any prompt set was
    made: the sets that were made since are put at rest (they change nothing)."""
    missing, unexpected = visual.load_state_dict(pristine, strict=False)
    found = bank(visual)
    if unexpected or any(not k.startswith(BANK + ".") for k in missing):
        raise ModelError(f"vision tower state does not match: {sorted(unexpected or missing)[:3]}",
                         "this is a bug in vepatch; please report it")
    if found is not None:
        with torch.no_grad():
            for s in found.sets.values():
                for p in s.parameters():
                    if not (isinstance(s, PromptTokens) and p is s.tokens):
                        p.zero_()
