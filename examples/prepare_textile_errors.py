"""Lay out an errors/ folder for the textile demo, as operators would: images per true class
(errors/nominal, errors/local_defect, errors/global_defect), copied from the installed
conformal-clip-data package. Some will turn out to be classified right already: `vepatch
diagnose` reports those and leaves them out.

    python examples/prepare_textile_errors.py WORKSPACE/errors --per-class 34
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
    parser.add_argument("--per-class", type=int, default=34)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for name, folder in FOLDERS.items():
        files = sorted(folder().glob("*.jpg"))
        target = args.out / name
        target.mkdir(parents=True, exist_ok=True)
        for f in rng.sample(files, args.per_class):
            shutil.copy2(f, target / f.name)
    print(f"{args.out}: {args.per_class} images in each of {', '.join(FOLDERS)}")


if __name__ == "__main__":
    main()
