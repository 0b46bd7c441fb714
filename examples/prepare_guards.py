"""Write guard suites into WORKSPACE/guards/ as image folders, from data a fresh machine can
have without a network beyond the package registries (recipes can also name the first two as
`builtin:digits` / `builtin:fashion-mnist`, written into the workspace on first use):

  digits         scikit-learn's load_digits
  fashion-mnist  Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), if installed
  imagenette     a folder of class subfolders given with --imagenette (e.g. ../shared/data/imagenette-guard)

    python examples/prepare_guards.py WORKSPACE [--per-class 20] [--imagenette DIR]
"""

import argparse
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


if __name__ == "__main__":
    main()
