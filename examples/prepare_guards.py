"""Write the demo's guard suites into WORKSPACE/guards/ as image folders, from data a fresh
machine can have without a network beyond the package registries:

  digits         scikit-learn's load_digits (always: scikit-learn is a demo dependency)
  fashion-mnist  Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), if installed
  imagenette     a folder of class subfolders given with --imagenette (e.g. ../shared/data/imagenette-guard)

    python examples/prepare_guards.py WORKSPACE [--per-class 30] [--imagenette DIR]
"""

import argparse
import gzip
import random
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def write_folder(root: Path, images, labels, names, per_class: int, seed: int) -> int:
    rng = random.Random(seed)
    count = 0
    for c, name in enumerate(names):
        idx = [i for i, y in enumerate(labels) if y == c]
        d = root / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in sorted(rng.sample(idx, min(per_class, len(idx)))):
            Image.fromarray(images[i]).save(d / f"{i:05d}.png")
            count += 1
    return count


def digits(out: Path, per_class: int, seed: int) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [(255 - im * 255 / 16).astype(np.uint8) for im in d.images]  # dark digit on white
    n = write_folder(out, images, d.target.tolist(), [str(i) for i in range(10)], per_class, seed)
    print(f"{out}: {n} digit images")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def fashion(out: Path, per_class: int, seed: int) -> None:
    images_file = next(iter(sorted(FASHION.glob("t10k-images*"))), None)
    labels_file = next(iter(sorted(FASHION.glob("t10k-labels*"))), None)
    if images_file is None or labels_file is None:
        print(f"{FASHION}: not installed (apt-get install dataset-fashion-mnist); fashion-mnist guard skipped")
        return
    images, labels = read_idx(images_file), read_idx(labels_file)
    n = write_folder(out, list(images), labels.tolist(), FASHION_CLASSES, per_class, seed)
    print(f"{out}: {n} Fashion-MNIST images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagenette", type=Path, default=None)
    args = parser.parse_args()
    guards = args.workspace / "guards"
    digits(guards / "digits", args.per_class, args.seed)
    fashion(guards / "fashion-mnist", args.per_class, args.seed)
    if args.imagenette and args.imagenette.is_dir():
        shutil.copytree(args.imagenette, guards / "imagenette", dirs_exist_ok=True)
        print(f"{guards / 'imagenette'}: copied from {args.imagenette}")


if __name__ == "__main__":
    main()
