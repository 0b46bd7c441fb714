"""Guard suites a recipe can name without bringing data of its own (`path: builtin:NAME`),
written once into the workspace as image folders (.vepatch/suites/<name>/) on first use:

  builtin:digits         scikit-learn's load_digits: 8x8 digits, dark on white, 100 per class
  builtin:fashion-mnist  Fashion-MNIST's test split, 100 per class, from Debian's
                         dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) when installed
  builtin:photos         the four photos scikit-learn and matplotlib ship (a pagoda, a flower,
                         an officer in uniform, a gift box), 20 seeded crops of each: small and
                         correlated, but photos every install has (README "The embedded ViT base")

Digits and Fashion-MNIST hold 1,000 images each: a guard bound needs them (with no image changing, 268 images are the fewest
that can certify a 1 pp bar at 0.05; README "Guard statistics"); `max_per_class` takes fewer.
"""

from __future__ import annotations

import gzip
import random
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import DataError

PREFIX = "builtin:"
PER_CLASS = {"digits": 100, "fashion-mnist": 100, "photos": 20}  # images a class (photos: crops of one photo)
SEED = 0
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped: images (n, rows, cols) or labels (n,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)


def write_folder(root: Path, images: Sequence[np.ndarray], labels: Sequence[int], names: Sequence[str],
                 per_class: int, seed: int) -> int:
    """A seeded `per_class` sample of every class, as root/<class>/<index>.png."""
    from PIL import Image

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


def _digits(out: Path, per_class: int, seed: int) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [(255 - im * 255 / 16).astype(np.uint8) for im in d.images]  # dark digit on white
    write_folder(out, images, d.target.tolist(), [str(i) for i in range(10)], per_class, seed)


def _fashion(out: Path, per_class: int, seed: int) -> None:
    images_file = next(iter(sorted(FASHION.glob("t10k-images*"))), None)
    labels_file = next(iter(sorted(FASHION.glob("t10k-labels*"))), None)
    if images_file is None or labels_file is None:
        raise DataError(f"{FASHION}: Fashion-MNIST is not installed",
                        "apt-get install dataset-fashion-mnist, or mark the suite `optional: true`")
    write_folder(out, list(read_idx(images_file)), read_idx(labels_file).tolist(), FASHION_CLASSES, per_class, seed)


def photo_files() -> dict[str, Path]:
    """Class name -> the photo that scikit-learn or matplotlib installs for it."""
    import matplotlib
    import sklearn.datasets

    sk = Path(sklearn.datasets.__file__).parent / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return {"pagoda": sk / "china.jpg", "flower": sk / "flower.jpg", "military uniform": mpl / "grace_hopper.jpg",
            "gift box": mpl / "Minduka_Present_Blue_Pack.png"}


def _photos(out: Path, per_class: int, seed: int) -> None:
    """Seeded crops (a third of the area or more, aspect 3:4 to 4:3), at most 224 px a side."""
    from PIL import Image

    rng = random.Random(seed)
    for name, path in photo_files().items():
        with Image.open(path) as im:
            photo = im.convert("RGB")
        w, h = photo.size
        d = out / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            area, aspect = rng.uniform(0.35, 1.0) * w * h, rng.uniform(0.75, 4 / 3)
            cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            crop = photo.crop((x, y, x + cw, y + ch))
            crop.thumbnail((224, 224))
            crop.save(d / f"{i:05d}.png")


BUILDERS: dict[str, Callable[[Path, int, int], None]] = {"digits": _digits, "fashion-mnist": _fashion, "photos": _photos}


def available(name: str) -> bool:
    if name == "photos":
        return all(p.is_file() for p in photo_files().values())
    return name == "digits" or (name == "fashion-mnist" and any(FASHION.glob("t10k-images*")))


def materialize(name: str, folder: Path) -> Path:
    """Write builtin suite `name` into `folder` once (a temp folder renamed into place), or say
    why it cannot be; an unavailable optional suite is left absent (the guard skips it)."""
    if name not in BUILDERS:
        raise DataError(f"{PREFIX}{name}: no such built-in suite", f"use one of: {', '.join(PREFIX + n for n in BUILDERS)}")
    if folder.is_dir() or not available(name):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        BUILDERS[name](staging, PER_CLASS[name], SEED)
        try:
            staging.rename(folder)
        except OSError:  # another process wrote it first: theirs is the same
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
