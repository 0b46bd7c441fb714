"""Retrieval suites: images with captions, judged by image->text and text->image Recall@K.

A retrieval suite is a folder of images, each with a same-named caption file (`a.jpg` +
`a.txt`, first non-empty line), or a saved `datasets` dataset with an Image column and a text
column. It opens as an `ImageSet` whose "classes" are the distinct captions (labels: each
image's caption), so loading, batching, sharding and the per-example evidence are the
classification path's own. What differs is only how the image features are read:

  image->text  each image ranks every distinct caption; a hit at K when its own is in the top K
  text->image  each distinct caption ranks every image; a hit at K when one of the top K
               images has that caption (with class captions: an image of that class)

A row's `Predictions` keep one entry per query (labels: the query's caption; preds: that
caption on a hit, else the caption of the best-ranked result), so `correct` is the hit
vector and the guard's paired test and bar apply to each direction and K as to any suite
(DCAR's lesson: prompt methods gained image->text and lost text->image).

Captioning suites (captioning.py) read the same two formats with the same reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .data import DATASET_MARKERS, ImageSet, Sample, unusable
from .errors import DataError
from .images import IMAGE_SUFFIXES
from .records import SkippedFile
from .runtime.passes import Predictions

Direction = Literal["i→t", "t→i"]
TEXT_COLUMNS = ("caption", "text", "sentence", "captions")
RECALL_AT = (1, 5)
CAPTION_TEMPLATE = ["{}"]  # a caption is its own prompt


@dataclass(frozen=True)
class Row:
    """One judged direction and K of a retrieval suite (its name in reports: 'captions i→t R@1')."""

    direction: Direction
    k: int

    def name(self, suite: str) -> str:
        return f"{suite} {self.direction} R@{self.k}"


def rows_for(images: ImageSet) -> list[Row]:
    """Every direction at every K that is not trivially 100% (K below the number of candidates)."""
    captions, n = len(images.classnames), len(images)
    return [Row(d, k) for d, candidates in (("i→t", captions), ("t→i", n)) for k in RECALL_AT if k < candidates]


def is_caption_folder(root: Path) -> bool:
    """A folder whose images carry same-named .txt captions (not <class>/ folders)."""
    if not root.is_dir() or any((root / m).is_file() for m in DATASET_MARKERS):
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES and f.with_suffix(".txt").is_file() for f in root.rglob("*"))


def open_caption_set(root: Path, name: str = "", kind: str = "retrieval") -> ImageSet:
    """The images of a caption folder or saved dataset, labelled by their caption (`kind`: the
    suite they are for: a retrieval suite needs two different captions, a captioning one one)."""
    name = name or root.name
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", "give a folder of images with same-named .txt captions (a.jpg + a.txt)")
    if any((root / m).is_file() for m in DATASET_MARKERS):
        return _open_saved_captions(root, name, kind)
    captions: dict[str, int] = {}
    samples, skipped = [], []
    root_real = root.resolve()
    for f in sorted(root.rglob("*")):
        if f.is_dir() or f.name.startswith(".") or f.suffix.lower() == ".txt":
            continue
        caption = _first_line(f.with_suffix(".txt"))
        why = unusable(f, root_real) or ("" if caption else f"no caption: {f.with_suffix('.txt').name} is missing or empty")
        if why:
            skipped.append(SkippedFile(str(f), why))
            continue
        samples.append(Sample(str(f), captions.setdefault(caption, len(captions))))
    return _checked(ImageSet(name, str(root), list(captions), samples, skipped), root, kind)


def _first_line(path: Path) -> str:
    try:
        return next((ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    except (OSError, UnicodeDecodeError):
        return ""


def _open_saved_captions(root: Path, name: str, kind: str) -> ImageSet:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise DataError(f"{root}: not a readable saved dataset ({exc})", "re-save it with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next((s for s in ("test", "validation", "train") if s in ds), next(iter(ds)))]
    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    strings = [k for k, f in ds.features.items() if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
    text_col = next((c for c in TEXT_COLUMNS if c in strings), strings[0] if strings else None)
    if image_col is None or text_col is None:
        raise DataError(f"{root}: a {kind} suite needs an Image column and a text column",
                        f"add a string column named one of: {', '.join(TEXT_COLUMNS)}")
    captions: dict[str, int] = {}
    samples = []
    for i, text in enumerate(ds[text_col]):
        text = (text or "").strip()
        if text:
            samples.append(Sample(f"{root}#{i}", captions.setdefault(text, len(captions))))
    return _checked(ImageSet(name, str(root), list(captions), samples, [], ds, image_col), root, kind)


def _checked(images: ImageSet, root: Path, kind: str) -> ImageSet:
    if kind == "captioning" and not len(images):
        raise DataError(f"{root}: no captioned image", "a captioning suite needs images with same-named .txt captions (a.jpg + a.txt)")
    if kind != "captioning" and len(images.classnames) < 2:
        raise DataError(f"{root}: {len(images)} captioned image(s) with {len(images.classnames)} distinct caption(s)",
                        "a retrieval suite needs images with at least two different captions (a.jpg + a.txt)")
    return images


def query_sources(images: ImageSet, direction: Direction) -> list[str]:
    """What each query of a row is: an image (image->text), or for each distinct caption
    (text->image) the first image that carries it."""
    if direction == "i→t":
        return [s.source for s in images.samples]
    first: dict[int, str] = {}
    for s in images.samples:
        first.setdefault(s.label, s.source)
    return [first[c] for c in range(len(images.classnames))]


def row_predictions(features: torch.Tensor, captions: torch.Tensor, labels: np.ndarray, row: Row) -> Predictions:
    """Hits of one row. `features`: (n, d) normalized image features; `captions`: (c, d)
    normalized caption embeddings; `labels`: (n,) each image's caption."""
    sims = features.float() @ captions.float().T  # (n, c)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    if row.direction == "i→t":
        top = sims.topk(row.k, dim=1).indices  # (n, k) captions
        hit = (top == labels_t[:, None]).any(1)
        query_labels = labels_t
        preds = torch.where(hit, labels_t, top[:, 0])
    else:
        top = sims.T.topk(row.k, dim=1).indices  # (c, k) images
        query_labels = torch.arange(captions.shape[0])
        found = labels_t[top]  # (c, k) the retrieved images' captions
        hit = (found == query_labels[:, None]).any(1)
        preds = torch.where(hit, query_labels, found[:, 0])
    return Predictions(query_labels.numpy().astype(np.int64), preds.numpy().astype(np.int64))


def recalls(loaded, images: ImageSet, batch_size: int, device: str) -> dict[str, float]:
    """Recall@K (0..1) of every row, keyed by the row's name ('captions i→t R@1', ...): one pass."""
    from .models.heads import text_head
    from .runtime.passes import SuiteInputs

    captions = text_head(loaded, images.classnames, CAPTION_TEMPLATE)
    features = SuiteInputs(images, loaded.preprocess, batch_size).embed(loaded.model, device)
    labels = np.asarray(images.labels, dtype=np.int64)
    return {row.name(images.name): row_predictions(features, captions, labels, row).accuracy for row in rows_for(images)}
