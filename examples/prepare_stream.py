"""Lay out a continual stream (LoRSU's protocol: a dataset split into disjoint class groups,
one group per round) from Fashion-MNIST (Debian's dataset-fashion-mnist):

  STREAM/r1..r5/pool/<class>/    labelled shots + holdout for that round's two classes
  STREAM/r1..r5/errors/<class>/  images dropped into the inbox for that round (disjoint from pool)

    python examples/prepare_stream.py STREAM [--pool 190] [--errors 10] [--split test|train]
    vepatch cycle --stream STREAM      # in a workspace made from recipes/fashion-stream.yaml

Every image of a round is dropped into the inbox (both folders); the cycle sets its holdout
aside from them (cycle.holdout_share 0.3: 60 of each class's 200, 120 a round, so that one
lost image is 0.8 pp and the 1 pp forgetting bar can be read; with 50 a class it was 3.3 pp).
Tune on a stream from the training split (--split train), report on one from the test split
(the default): the two never share an image.
"""

import argparse
import random
from pathlib import Path

from PIL import Image

from vepatch.suites import FASHION, FASHION_CLASSES, read_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pool", type=int, default=190, help="pool images per class per round")
    parser.add_argument("--errors", type=int, default=10, help="inbox images per class per round")
    parser.add_argument("--split", choices=["test", "train"], default="test", help="Fashion-MNIST split to draw from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prefix = "t10k" if args.split == "test" else "train"
    images = read_idx(next(iter(sorted(FASHION.glob(f"{prefix}-images*")))))
    labels = read_idx(next(iter(sorted(FASHION.glob(f"{prefix}-labels*")))))
    rng = random.Random(args.seed)
    for r in range(5):
        for c in (2 * r, 2 * r + 1):
            idx = [i for i, y in enumerate(labels) if y == c]
            chosen = rng.sample(idx, args.pool + args.errors)
            name = FASHION_CLASSES[c].replace(" ", "_")
            for part, subset in (("pool", chosen[: args.pool]), ("errors", chosen[args.pool:])):
                d = args.out / f"r{r + 1}" / part / name
                d.mkdir(parents=True, exist_ok=True)
                for i in subset:
                    Image.fromarray(images[i]).save(d / f"{i:05d}.png")
    print(f"{args.out}: 5 rounds of 2 classes, {args.pool} + {args.errors} images per class ({args.split} split)")


if __name__ == "__main__":
    main()
