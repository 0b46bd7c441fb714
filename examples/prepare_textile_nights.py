"""Lay out textile drops for several nights, as operators would make them, and a disjoint
check set to measure each night's version on (conformal-clip-data, no shot pool needed):

  OUT/night1..nightN/<class>/*.jpg   dropped into the inbox one night each
  OUT/check/<class>/*.jpg            never dropped: `vepatch eval OUT/check` after each night

    python examples/prepare_textile_nights.py OUT [--nights 3] [--per-class 10] [--check 60]
"""

import argparse
import random
import shutil
from pathlib import Path

import conformal_clip_data as ccd

FOLDERS = {"nominal": ccd.nominal_dir, "local_defect": ccd.local_dir, "global_defect": ccd.global_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=10, help="images per class per night")
    parser.add_argument("--check", type=int, default=60, help="check images per class")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for name, folder in FOLDERS.items():
        files = rng.sample(sorted(folder().glob("*.jpg")), args.check + args.nights * args.per_class)
        parts = {"check": files[: args.check]}
        for n in range(args.nights):
            start = args.check + n * args.per_class
            parts[f"night{n + 1}"] = files[start : start + args.per_class]
        for part, chosen in parts.items():
            target = args.out / part / name
            target.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, target / f.name)
    nights = f"{args.nights} night{'s' if args.nights != 1 else ''}"
    print(f"{args.out}: {nights} of {args.per_class} images per class, check set of {args.check} per class")


if __name__ == "__main__":
    main()
