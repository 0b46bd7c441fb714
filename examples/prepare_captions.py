"""Turn a labelled folder (<class>/ subfolders) into a retrieval guard suite: every image
copied flat into OUT with a same-named .txt caption made from its class name.

    python examples/prepare_captions.py SRC OUT [--template "a photo of a {}."] [--per-class 20]

Then name OUT in the recipe as a suite of kind retrieval:

    guard:
      suites:
        - {path: guards/captions, kind: retrieval, max_drop_pp: 2.0}

With class captions, image->text asks "is my class's caption the best match?" and text->image
asks "does each class's caption retrieve an image of that class first?" (one query per distinct
caption). A folder with real per-image captions is used the same way.
"""

import argparse
import shutil
from pathlib import Path

from vepatch.data import open_image_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--template", default="a photo of a {}.")
    parser.add_argument("--per-class", type=int, default=0, help="images per class (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = open_image_set(args.src, max_per_class=args.per_class, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(images.samples):
        src = Path(s.source)
        target = args.out / f"{src.parent.name}-{src.stem}-{i:05d}{src.suffix.lower()}"
        shutil.copy2(src, target)
        target.with_suffix(".txt").write_text(args.template.format(images.classnames[s.label]) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(images)} images with {len(images.classnames)} distinct captions")
    if images.skipped:
        print(f"skipped {len(images.skipped)} unreadable file(s)")


if __name__ == "__main__":
    main()
