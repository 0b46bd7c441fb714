"""Tiny CLIP-style models and image folders built on the spot: no downloads, CPU seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["red square", "green circle", "blue stripes"]
NEW_CLASSES = ["yellow cross", "purple dots"]  # drawn too, never fitted: what a site meets later
PREPROCESS = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "shortest"}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

CONFIGS = {
    "vit": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16}, "text_cfg": TEXT},
    "cnn": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "test_efficientnet", "timm_pool": "avg", "timm_proj": "linear"}, "text_cfg": TEXT},
    "timm-vit": {"embed_dim": 32, "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "token", "timm_proj": "linear"}, "text_cfg": TEXT},
}


def build_bundle(folder: Path, kind: str = "vit", seed: int = 0, state: dict | None = None) -> Path:
    """Write an open_clip local-dir bundle (config + safetensors) for a tiny random model."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": CONFIGS[kind], "preprocess_cfg": PREPROCESS}
    if kind == "timm-vit":
        cfg["preprocess_cfg"] = {**PREPROCESS, "size": 160}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    if state is None:
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**CONFIGS[kind])
        state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def draw(cls: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Images a tiny model can tell apart: colour and shape per class, with noise."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if cls == 0:
        m = (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4)
        img[m] = [220, 30, 30]
    elif cls == 1:
        m = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        img[m] = [30, 220, 30]
    elif cls == 2:
        m = (xx // 4) % 2 == 0
        img[m] = [30, 30, 220]
    elif cls == 3:  # the classes past CLASSES: new kinds of object for class-incremental tests
        m = (abs(yy - size / 2) < size / 10) | (abs(xx - size / 2) < size / 10)
        img[m] = [220, 220, 30]
    else:
        m = ((yy // 6) % 2 == 0) & ((xx // 6) % 2 == 0)
        img[m] = [200, 30, 200]
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def make_folder(root: Path, per_class: int = 8, seed: int = 0, classes=CLASSES, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            kinds = CLASSES + NEW_CLASSES  # a known name is drawn as itself, wherever it stands in `classes`
            draw(kinds.index(name) if name in kinds else c % 3, rng, size).save(d / f"{i:03d}.png")
    return root


def caption_folder(src, out, template="a photo of a {}."):
    """A labelled folder's images, flat, each with its class caption beside it."""
    out.mkdir(parents=True)
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            shutil.copy(f, out / f"{d.name}-{f.name}")
            (out / f"{d.name}-{f.stem}.txt").write_text(template.format(d.name.replace("_", " ")) + "\n")
    return out
