"""Write guard suites into WORKSPACE/guards/ as image folders, from data a fresh machine can
have without a network beyond the package registries (recipes can also name the first two as
`builtin:digits` / `builtin:fashion-mnist`, written into the workspace on first use):

  digits         scikit-learn's load_digits
  fashion-mnist  Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), if installed
  imagenette     a folder of class subfolders given with --imagenette (e.g. ../shared/data/imagenette-guard)

and, with --reference DIR, WORKSPACE/reference/: up to --reference-count images of DIR (e.g.
../shared/data/unlabelled-cifar10-train) for `apply.retain: *distill` to keep the parent's
answers on; never a guard suite. Files named <word>_<n>.jpg go to reference/<word>/ (its words
join the distillation vocabulary), others to reference/images/.

    python examples/prepare_guards.py WORKSPACE [--per-class 20] [--imagenette DIR] [--reference DIR]
"""

import argparse
import random
import shutil
from pathlib import Path

from vepatch.errors import DataError
from vepatch.suites import BUILDERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imagenette", type=Path, default=None)
    parser.add_argument("--reference", type=Path, default=None, help="images to distill on (never a guard suite)")
    parser.add_argument("--reference-count", type=int, default=400)
    args = parser.parse_args()
    guards = args.workspace / "guards"
    for name, build in BUILDERS.items():
        try:
            build(guards / name, args.per_class, args.seed)
            print(f"{guards / name}: {sum(1 for _ in (guards / name).rglob('*.png'))} images")
        except DataError as exc:
            print(f"{name}: skipped ({exc})")
    if args.imagenette and args.imagenette.is_dir():
        shutil.copytree(args.imagenette, guards / "imagenette", dirs_exist_ok=True)
        print(f"{guards / 'imagenette'}: copied from {args.imagenette}")
    if args.reference and args.reference.is_dir():
        files = sorted(f for f in args.reference.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        chosen = random.Random(args.seed).sample(files, min(args.reference_count, len(files)))
        for f in chosen:
            word, _, number = f.stem.rpartition("_")
            d = args.workspace / "reference" / (word if word and number.isdigit() else "images")
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / f.name)
        print(f"{args.workspace / 'reference'}: {len(chosen)} images from {args.reference}")


if __name__ == "__main__":
    main()
