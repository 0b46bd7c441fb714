"""A delta: what a patch changes, relative to its parent, keyed by full parameter name.

Three kinds of entries, all linear in the delta, so theta + lambda * delta keeps the same
sparsity and rank for any strength lambda:
  sparse   '<param>#sparse.value' at '<param>#sparse.index' (flat indices, the narrowest integer
           type that holds them) or '<param>#sparse.bits' (the mask, one bit per entry), whichever
           is smaller: at LoRSU's 10% the bits take a third of the bytes of int32 indices
  lowrank  '<param>#lowrank.up' (rows x r) @ '<param>#lowrank.down' (r x cols), reshaped to the param;
           with '<param>#lowrank.rows', `up` holds only those rows (a head-masked factor: the
           other heads' rows are zero and are not stored)
  dense    '<param>#dense' (same shape as the param)
  prompt   '<slot>#dense' + '<slot>#prompt.ids' + '<slot>#prompt.text': a prompt patch's change
           to the learned vectors of one prefix, with the prefix's token ids and text (prompts.py)
  weights  '<entry>#dense' + '<entry>#weights.text': DCAR's description weights (classes x
           templates, a change from the uniform average) and, as JSON, their classes and templates
  vprompt  '<set>.tokens#vprompt.tokens' (stored, never scaled) + '<set>.gate#dense' (0 -> 1,
           scaled): visual prompt tokens and the gate that weights them (visual_prompts.py)
Stored as safetensors only; never pickle. Values, factors and dense entries are float32, or
16-bit where the recipe says so (`apply.patch_dtype`: half the bytes; `stored_as`); every
change is computed in float32 whatever the stored type, so a float32 patch and a 16-bit one
load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import torch
from torch import nn

from .errors import StoreError
from .fsio import sha256_bytes, sha256_file  # noqa: F401  (where callers have always found them)

KINDS = ("sparse.index", "sparse.bits", "sparse.value", "lowrank.up", "lowrank.down", "lowrank.rows", "dense",
         "prompt.ids", "prompt.text", "vprompt.tokens", "weights.text")
VALUE_KINDS = ("sparse.value", "lowrank.up", "lowrank.down", "dense")  # floating numbers a 16-bit patch rounds
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INDEX_KINDS = ("sparse.index", "sparse.bits", "lowrank.rows", "prompt.ids", "prompt.text", "weights.text")  # integers: never scaled, not counted as trained numbers


@dataclass
class Delta:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        return sorted({k.split("#", 1)[0] for k in self.tensors})

    def add_sparse(self, name: str, change: torch.Tensor, mask: torch.Tensor) -> None:
        """The entries of `change` that `mask` allows (all of them, zeros included), at indices
        or at the mask's bits, whichever takes fewer bytes."""
        flat = mask.reshape(-1).bool()
        index = torch.nonzero(flat).reshape(-1)
        self.tensors[f"{name}#sparse.value"] = change.reshape(-1)[index].contiguous()
        narrow = narrowest(flat.numel())
        if len(index) * torch.iinfo(narrow).bits <= flat.numel():
            self.tensors[f"{name}#sparse.index"] = index.to(narrow).contiguous()
        else:
            self.tensors[f"{name}#sparse.bits"] = pack_bits(flat)

    def add_lowrank(self, name: str, up: torch.Tensor, down: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """up @ down; with `rows` (a mask over up's rows), only those rows of `up` are stored."""
        if rows is not None and not bool(rows.all()):
            keep = torch.nonzero(rows.reshape(-1).bool()).reshape(-1)
            self.tensors[f"{name}#lowrank.rows"] = keep.to(narrowest(len(rows.reshape(-1)))).contiguous()
            up = up[keep]
        self.tensors[f"{name}#lowrank.up"] = up.contiguous()
        self.tensors[f"{name}#lowrank.down"] = down.contiguous()

    def add_dense(self, name: str, change: torch.Tensor) -> None:
        self.tensors[f"{name}#dense"] = change.contiguous()

    def add_prompt(self, name: str, change: torch.Tensor, ids: torch.Tensor, text: str) -> None:
        from .prompts import text_bytes

        self.add_dense(name, change)
        self.tensors[f"{name}#prompt.ids"] = ids.to(torch.int64).contiguous()
        self.tensors[f"{name}#prompt.text"] = text_bytes(text)

    def add_weights(self, name: str, change: torch.Tensor, label: str) -> None:
        from .prompts import text_bytes

        self.add_dense(name, change)
        self.tensors[f"{name}#weights.text"] = text_bytes(label)

    def add_visual_tokens(self, name: str, tokens: torch.Tensor) -> None:
        """Visual prompt tokens (kept as they are at every strength) and their gate's change 0 -> 1."""
        self.tensors[f"{name}.tokens#vprompt.tokens"] = tokens.float().contiguous()
        self.add_dense(f"{name}.gate", torch.ones(()))

    def stored_as(self, dtype: str) -> "Delta":
        """This delta with its values, factors and dense entries rounded to `dtype` (a key of
        STORED_DTYPES). A low-rank pair is balanced first (up * c, down / c, exact in float32, with
        c making their largest entries equal), so that small trained `up` entries do not fall below
        float16's normal range while `down` keeps its random-init scale."""
        target = STORED_DTYPES[dtype]
        if target == torch.float32:
            return self
        out = dict(self.tensors)
        for key in [k for k in out if k.endswith("#lowrank.up")]:
            down_key = key.replace("#lowrank.up", "#lowrank.down")
            up, down = out[key].float(), out[down_key].float()
            a, b = float(up.abs().max()), float(down.abs().max())
            if a > 0 and b > 0:
                c = (b / a) ** 0.5
                out[key], out[down_key] = up * c, down / c
        for k, v in out.items():
            if k.endswith(VALUE_KINDS) and v.is_floating_point():
                out[k] = v.to(target).contiguous()
        return Delta(out)

    @property
    def touches_text(self) -> bool:
        """A prompt patch (or a chain step holding one): the text heads change with it."""
        return any(k.endswith(("#prompt.ids", "#weights.text")) for k in self.tensors)

    def change_for(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The dense change this delta makes to parameter `name` (shape and dtype of `like`)."""
        out = torch.zeros(like.numel(), dtype=torch.float32)
        t = self.tensors
        if f"{name}#sparse.value" in t:
            index = t[f"{name}#sparse.index"].long() if f"{name}#sparse.index" in t else \
                torch.nonzero(unpack_bits(t[f"{name}#sparse.bits"], like.numel())).reshape(-1)
            out.index_add_(0, index, t[f"{name}#sparse.value"].float())
        out = out.reshape(like.shape)
        if f"{name}#lowrank.up" in t:
            up = t[f"{name}#lowrank.up"].float()
            if f"{name}#lowrank.rows" in t:  # only some rows were stored: the others are zero
                full = torch.zeros(like.shape[0], up.shape[1])
                full[t[f"{name}#lowrank.rows"].long()] = up
                up = full
            out += (up @ t[f"{name}#lowrank.down"].float()).reshape(like.shape)
        if f"{name}#dense" in t:
            out += t[f"{name}#dense"].float()
        return out

    def scaled(self, strength: float) -> "Delta":
        """lambda * delta: values, one low-rank factor and dense entries scale; indices stay."""
        out = {}
        for k, v in self.tensors.items():
            scale = k.endswith(("sparse.value", "lowrank.up", "#dense"))
            out[k] = (v.float() * strength).to(v.dtype).contiguous() if scale and strength != 1.0 else v
        return Delta(out)

    def trainable_count(self) -> int:
        """Numbers the patch holds (indices, bits and row numbers not counted)."""
        return int(sum(v.numel() for k, v in self.tensors.items() if not k.endswith(INDEX_KINDS)))

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        # one metadata key: safetensors keeps metadata in a hash map whose order varies per
        # process, and the same seed must give the same patch bytes
        return save(self.tensors, metadata={"format": "vepatch-delta/1"})

    @classmethod
    def from_file(cls, path: Path) -> "Delta":
        from safetensors.torch import load

        try:
            tensors = load(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{path}: missing", "run `vepatch verify`; roll back to a version that verifies") from None
        except Exception:
            raise StoreError(
                f"{path}: not a valid safetensors delta (corrupt, truncated or not safetensors)",
                "it is refused, never loaded; roll back to a version that verifies",
            ) from None
        bad = [k for k in tensors if "#" not in k or k.split("#", 1)[1] not in KINDS]
        if bad:
            raise StoreError(f"{path}: unexpected entry '{bad[0]}'", "it is refused; this is not a vepatch delta")
        floating = [k for k, v in tensors.items() if k.endswith(INDEX_KINDS) and v.is_floating_point()]
        if floating:
            raise StoreError(f"{path}: '{floating[0]}' holds no integer indices", "it is refused; this is not a vepatch delta")
        odd = [k for k, v in tensors.items() if k.endswith(VALUE_KINDS) and v.dtype not in STORED_DTYPES.values()]
        if odd:
            raise StoreError(f"{path}: '{odd[0]}' holds {tensors[odd[0]].dtype}, not float32, float16 or bfloat16",
                             "it is refused; this is not a vepatch delta")
        return cls(tensors)


def narrowest(count: int) -> torch.dtype:
    """The narrowest integer type that holds every index below `count`."""
    return next(t for t in (torch.int16, torch.int32, torch.int64) if count <= torch.iinfo(t).max + 1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat boolean mask as uint8, eight entries a byte (numpy's packbits, big-endian bit order)."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(bool)))


def unpack_bits(bits: torch.Tensor, count: int) -> torch.Tensor:
    import numpy as np

    if bits.dtype != torch.uint8 or len(bits) != (count + 7) // 8:
        raise StoreError(f"a sparse mask of {len(bits)} bytes does not fit a parameter of {count} entries",
                         "the patch is damaged or for another architecture; it is refused")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool))


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Delta, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """theta += strength * delta, in place, in float32 on the CPU copy of each change (so the
    result is bit-for-bit the same wherever it is loaded). Returns the originals, for `restore`.
    A prompt patch's slots are made first (at their start: nothing changes until the delta is added)."""
    from . import prompts, visual_prompts

    prompts.attach(model, delta.tensors)
    visual_prompts.attach(model, delta.tensors)
    params = dict(model.named_parameters())
    originals = {}
    for name in delta.params:
        if name not in params:
            raise StoreError(f"delta names '{name}', which this model does not have", "the patch is for another architecture")
        p = params[name]
        originals[name] = p.detach().clone()
        change = delta.change_for(name, p)
        p.copy_((p.detach().to("cpu", torch.float32) + strength * change).to(p.device, p.dtype))
    return originals


@torch.no_grad()
def restore(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in originals.items():
        params[name].copy_(value)


def patched_fingerprint(model: nn.Module, delta: Delta, strength: float = 1.0) -> str:
    """The model's fingerprint with `delta` applied at `strength`; `model` is left as it was."""
    from .models.load import model_fingerprint

    originals = apply_delta(model, delta, strength)
    try:
        return model_fingerprint(model)
    finally:
        restore(model, originals)
