"""Fit default-vit's alignment head (vepatch/models/default_vit_head.safetensors), LIFT-style.

The DINOv2 ViT-S/14 tower stays frozen, and so does its final norm (`ln_post`); only a 384x384
projection into MiniLM's text space is fitted, by ridge regression (closed form, lambda = 10)
from the normed class token onto the image embeddings of the embedded `default` base, which
already live in MiniLM space (DeViSE-style, METHODS.md §7), so the ViT inherits its zero-shot
head over any class names. Images: ../shared/data/unlabelled-cifar10-train (4,000 CIFAR-10
training images; the labels in the file names are never used for fitting). Every fifth image
is held out to report how often the student's ImageNet top-1 agrees with the teacher's and
CIFAR-10 zero-shot accuracy; on those, ridge did as well as Adam on KL + cosine losses
(agreement 0.26 against 0.20-0.26, CIFAR-10 0.30 against 0.26-0.30) and is exact to rerun.
Never fit on imagenette-guard: that is how the
base is measured.

    python examples/fit_default_vit_head.py [--data DIR] [--out FILE] [--ridge 10] [--cache FILE]

Prints the data hash, the held-out figures and writes the head with them in its metadata.
Reruns on the same data and package versions give the same head up to float rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vepatch.models import load_model
from vepatch.models.default_vit import HEAD_FILE, IMAGE_SIZE, backbone_model, class_token, vit_config

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def data_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\n" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


@torch.no_grad()
def features(files: list[Path], teacher, student_visual, teacher_tf, student_tf, batch: int = 64):
    """Teacher embeddings (normalized) and student class tokens, one row per image."""
    t_out, s_out = [], []
    for i in range(0, len(files), batch):
        images = [Image.open(f).convert("RGB") for f in files[i : i + batch]]
        t_out.append(teacher.encode_image(torch.stack([teacher_tf(im) for im in images]), normalize=True))
        s_out.append(class_token(student_visual, torch.stack([student_tf(im) for im in images])))
        print(f"  {min(i + batch, len(files))}/{len(files)} images", flush=True)
    return torch.cat(t_out), torch.cat(s_out)


def student_embed(x, weight, bias, proj):
    return F.normalize(F.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-6) @ proj, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/unlabelled-cifar10-train")
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    parser.add_argument("--ridge", type=float, default=10.0, help="ridge penalty lambda")
    parser.add_argument("--cache", type=Path, default=None, help="keep the extracted features here between runs")
    args = parser.parse_args()
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{args.data}: no images (it should hold unlabelled-cifar10-train)")
    digest = data_hash(files)
    print(f"{len(files)} images, sha256 {digest}")
    teacher = load_model("default")
    vit = backbone_model(head=False)
    pre = vit_config("")["preprocess_cfg"]
    student_tf = open_clip.image_transform(IMAGE_SIZE, is_train=False, mean=pre["mean"], std=pre["std"],
                                           interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
    if args.cache and args.cache.is_file():
        t_emb, s_tok = torch.load(args.cache)
    else:
        t_emb, s_tok = features(files, teacher.model, vit.visual, teacher.preprocess, student_tf)
        if args.cache:
            torch.save((t_emb, s_tok), args.cache)
    with torch.no_grad():
        prompts = teacher.tokenizer([f"a photo of a {c}." for c in IMAGENET_CLASSNAMES])
        imagenet = torch.cat([teacher.model.encode_text(prompts[i : i + 200], normalize=True) for i in range(0, 1000, 200)])
        cifar = teacher.model.encode_text(teacher.tokenizer([f"a photo of a {c}." for c in CIFAR10]), normalize=True)

    n = len(files)
    held = torch.arange(n) % 5 == 0  # every fifth image
    fit_t, fit_s, val_t, val_s = t_emb[~held], s_tok[~held], t_emb[held], s_tok[held]

    weight, bias = vit.visual.ln_post.weight.detach(), vit.visual.ln_post.bias.detach()
    normed = F.layer_norm(fit_s, (fit_s.shape[-1],), weight, bias, eps=1e-6)
    proj = torch.linalg.solve(normed.T @ normed + args.ridge * torch.eye(normed.shape[1]), normed.T @ fit_t)
    with torch.no_grad():
        emb = student_embed(val_s, weight, bias, proj)
        agree = (emb @ imagenet.T).argmax(-1).eq((val_t @ imagenet.T).argmax(-1)).float().mean().item()
        labels = torch.tensor([CIFAR10.index(files[int(i)].name.rsplit("_", 1)[0]) for i in torch.nonzero(held).reshape(-1)])
        student_acc = (emb @ cifar.T).argmax(-1).eq(labels).float().mean().item()
        teacher_acc = (val_t @ cifar.T).argmax(-1).eq(labels).float().mean().item()
    figures = {"imagenet_top1_agreement": round(agree, 4), "cifar10_zero_shot": round(student_acc, 4),
               "teacher_cifar10_zero_shot": round(teacher_acc, 4), "held_out_images": int(held.sum())}
    print(json.dumps(figures))
    from safetensors.torch import save_file

    metadata = {"script": "examples/fit_default_vit_head.py", "data": args.data.name, "data_files": str(n),
                "data_sha256": digest, "teacher": "vepatch default base (" + teacher.fingerprint[:16] + ")",
                "ridge": str(args.ridge), **{k: str(v) for k, v in figures.items()}}
    save_file({"visual.proj": proj.contiguous()}, str(args.out), metadata=metadata)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
