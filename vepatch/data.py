"""Labelled image sets: image folders and `datasets` saved to disk, bad-file handling,
seeded k-shot sampling with a disjoint holdout, and a torch Dataset over them."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .errors import DataError, UsageError
from .images import IMAGE_SUFFIXES, BadImage, read_image, to_rgb
from .records import HoldoutRef, SkippedFile

DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Sample:
    source: str  # file path, or '<dataset dir>#<row>' for `datasets` rows
    label: int  # index into the set's classnames


ROW_RE = re.compile(r"(.+)#(\d+)")


def dataset_row(source: str) -> tuple[str, int] | None:
    """(dataset folder, row) of a '<dataset dir>#<row>' source; None for a file. A '#' may
    stand anywhere in a file's path ('IMG#0001.png', a workspace 'ws#1'): an image file's name
    ends with its suffix (IMAGE_SUFFIXES), never with '#<digits>'."""
    m = ROW_RE.fullmatch(source)
    return (m.group(1), int(m.group(2))) if m else None


@dataclass
class ImageSet:
    """A labelled set: what was readable (`samples`) and what was not (`skipped`)."""

    name: str
    root: str
    classnames: list[str]
    samples: list[Sample]
    skipped: list[SkippedFile] = field(default_factory=list)
    dataset: Any = None  # the `datasets.Dataset` behind '#row' sources, if any
    image_column: str = "image"

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def subset(self, indices: Sequence[int], name: str | None = None) -> "ImageSet":
        return ImageSet(
            name or self.name, self.root, self.classnames, [self.samples[i] for i in indices],
            [], self.dataset, self.image_column,
        )

    def load(self, sample: Sample) -> Image.Image:
        row = dataset_row(sample.source) if self.dataset is not None else None
        if row is not None:
            return to_rgb(self.dataset[row[1]][self.image_column])
        return read_image(Path(sample.source))

    def state_hash(self) -> str:
        """Hash of the sources, labels and each file's size and modification time: changes
        when any image of the set is replaced, added or removed (a saved dataset counts as the
        files of its folder)."""
        digest = hashlib.sha256(self.content_hash().encode())
        rows = [dataset_row(s.source) for s in self.samples]
        files = [Path(s.source) for s, row in zip(self.samples, rows) if row is None]
        roots = sorted({row[0] for row in rows if row is not None})
        files += [f for r in roots for f in sorted(Path(r).iterdir()) if f.is_file()]
        for f in files:
            st = f.stat()
            digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def content_hash(self) -> str:
        """Hash of the sources and labels: records which data a patch or verdict used."""
        digest = hashlib.sha256()
        for s in self.samples:
            digest.update(f"{s.source}\t{s.label}\n".encode())
        return digest.hexdigest()


# --- opening a set ------------------------------------------------------------------------


def resolve_path(path: str, base: Path | None = None) -> Path:
    """A recipe path: 'pkg:MODULE/sub/dir' inside an installed package, else relative to `base`."""
    if path.startswith("pkg:"):
        module, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"{path}: package '{module}' is not installed", f"pip install {module.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def folder_to_name(folder: str) -> str:
    return folder.replace("_", " ").strip()


def _name_key(name: str) -> str:
    return folder_to_name(name).lower()


def class_of_folder(folder: str, classnames: Sequence[str], folders: dict[str, str] | None = None) -> int | None:
    """The class a folder holds: mapped by `folders`, or by name ('_' read as a space,
    case-insensitive); None when it is none of `classnames`."""
    target = _name_key((folders or {}).get(folder, folder))
    return next((i for i, c in enumerate(classnames) if _name_key(c) == target), None)


def merge_sets(name: str, sets: Sequence[ImageSet]) -> ImageSet:
    """One set of every image of `sets`, their class names joined in order of first appearance
    (labels re-indexed), each source once. Rows of one saved `datasets` dataset pool together; a
    dataset's rows cannot share a set with files or another dataset's: the first dataset's set
    is returned alone."""
    backed = [s for s in sets if s.dataset is not None]
    if backed and (len(backed) < len(sets) or len({s.root for s in backed}) > 1):
        return backed[0]
    classnames = list(dict.fromkeys(c for s in sets for c in s.classnames))
    samples: dict[str, Sample] = {}  # by source, the first one kept
    for s in sets:
        for x in s.samples:
            samples.setdefault(x.source, Sample(x.source, classnames.index(s.classnames[x.label])))
    first = sets[0] if sets else ImageSet(name, "", [], [])
    return ImageSet(name, first.root, classnames, list(samples.values()), [], first.dataset, first.image_column)


def open_image_set(
    root: Path,
    classnames: Sequence[str] | None = None,
    folders: dict[str, str] | None = None,
    name: str = "",
    max_per_class: int = 0,
    seed: int = 0,
) -> ImageSet:
    """Open a labelled set. With `classnames`, folders map onto them (by `folders`, or by name
    with '_' read as a space, case-insensitive); without, the folders are the classes."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", "give a folder of <class>/ subfolders or a saved `datasets` dataset")
    name = name or root.name
    if any((root / m).is_file() for m in DATASET_MARKERS):
        image_set = _open_saved_dataset(root, classnames, name)
    else:
        image_set = _open_folder(root, classnames, folders or {}, name)
    if max_per_class:
        image_set = _cap_per_class(image_set, max_per_class, seed)
    if not image_set.samples:
        skipped = image_set.skipped
        first = f"; first: {skipped[0].source}: {skipped[0].reason}" if skipped else ""
        raise DataError(
            f"{root}: no readable image" + (f" ({len(skipped)} skipped{first})" if skipped else ""),
            "replace the unreadable files with real images (jpg, png, ...)" if skipped else
            "put images in <class>/ subfolders (jpg, png, ...)",
        )
    return image_set


def _open_folder(root: Path, classnames, folders: dict[str, str], name: str) -> ImageSet:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root}: no class folders", "images go in <root>/<class name>/*.jpg")
    if classnames is None:
        listed = root / "classnames.txt"
        lines = [ln.strip() for ln in listed.read_text().splitlines() if ln.strip()] if listed.is_file() else []
        if lines and len(lines) == len(subdirs):
            classnames = lines  # CLIP_benchmark style: display names in folder order
            folders = {d.name: lines[i] for i, d in enumerate(subdirs)}
        else:
            classnames = [folders.get(d.name, folder_to_name(d.name)) for d in subdirs]
    classnames = list(classnames)
    root_real = root.resolve()
    samples, skipped = [], []
    for d in subdirs:
        label = class_of_folder(d.name, classnames, folders)
        if label is None:
            raise DataError(
                f"{d}: unknown class '{d.name}'",
                f"known classes: {', '.join(classnames)} (rename the folder or map it in the recipe's folders)",
            )
        for f in sorted(d.rglob("*")):
            if f.is_dir() or f.name.startswith("."):
                continue
            why = unusable(f, root_real)
            if why:
                skipped.append(SkippedFile(str(f), why))
                continue
            samples.append(Sample(str(f), label))
    return ImageSet(name, str(root), classnames, samples, skipped)


def unusable(f: Path, root_real: Path) -> str:
    """Why file `f` of a set rooted at `root_real` cannot be one of its images ('' if it can):
    a link leading outside, not an image suffix, or not readable as an image."""
    if not f.resolve().is_relative_to(root_real):
        return "symlink leading outside the set's folder"
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ('{f.suffix or f.name}')"
    try:
        read_image(f)
    except BadImage as exc:
        return str(exc)
    return ""


def _open_saved_dataset(root: Path, classnames, name: str) -> ImageSet:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise DataError(f"{root}: not a readable saved dataset ({exc})", "re-save it with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in ("test", "validation", "train") if s in ds), next(iter(ds)))
        ds = ds[split]
    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise DataError(f"{root}: needs an Image column and a ClassLabel column", "cast the columns with datasets' features")
    own = [folder_to_name(n) for n in ds.features[label_col].names]
    classnames = list(classnames) if classnames is not None else own
    index = {_name_key(c): i for i, c in enumerate(classnames)}
    remap = []
    for n in own:
        if _name_key(n) not in index:
            raise DataError(f"{root}: unknown class '{n}'", f"known classes: {', '.join(classnames)}")
        remap.append(index[_name_key(n)])
    labels = ds[label_col]
    samples = [Sample(f"{root}#{i}", remap[y]) for i, y in enumerate(labels)]
    return ImageSet(name, str(root), classnames, samples, [], ds, image_col)


def _cap_per_class(image_set: ImageSet, cap: int, seed: int) -> ImageSet:
    rng = random.Random(seed)
    keep: list[int] = []
    for label in range(len(image_set.classnames)):
        idx = [i for i, s in enumerate(image_set.samples) if s.label == label]
        keep += sorted(rng.sample(idx, min(cap, len(idx))))
    capped = image_set.subset(sorted(keep))
    capped.skipped = image_set.skipped
    return capped


# --- shots and holdout --------------------------------------------------------------------


def split_shots(
    image_set: ImageSet, shots: int, seed: int, holdout_per_class: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded k-shot sample per class and a disjoint holdout (the rest, or `holdout_per_class`)."""
    rng = random.Random(seed)
    train, holdout = [], []
    for label in range(len(image_set.classnames)):
        idx = [i for i, s in enumerate(image_set.samples) if s.label == label]
        rng.shuffle(idx)
        train += idx[:shots]
        rest = idx[shots:]
        holdout += rest[:holdout_per_class] if holdout_per_class else rest
    return sorted(train), sorted(holdout)


def open_holdout(ref: HoldoutRef, workspace_root: Path) -> ImageSet:
    """The images a manifest recorded as its target holdout (image files, or rows of a saved
    dataset: 'root#index'); relative sources lie in the workspace (Workspace.portable)."""
    sources = [str(workspace_root / s) for s in ref.sources]  # an absolute source stays as it is
    row = dataset_row(sources[0]) if sources else None
    if row is not None:
        root = row[0]
        full = open_image_set(Path(root), ref.classnames, name=ref.name)
        by_source = {s.source: i for i, s in enumerate(full.samples)}
        return full.subset([by_source[s] for s in sources], ref.name)
    root = str(Path(sources[0]).parent.parent) if sources else ""
    return ImageSet(ref.name, root, list(ref.classnames), [Sample(s, y) for s, y in zip(sources, ref.labels)])


class TorchImages:
    """A torch-style Dataset: (preprocessed image tensor, label)."""

    def __init__(self, image_set: ImageSet, preprocess):
        self.image_set = image_set
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, i: int):
        sample = self.image_set.samples[i]
        return self.preprocess(self.image_set.load(sample)), sample.label
