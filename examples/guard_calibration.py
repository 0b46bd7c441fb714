"""The guard's calibration table (README, "Guard statistics"): planted candidates through the
guard's own strength search (vepatch/calibration.py), on synthetic paired outcomes and on the
embedded default model's real predictions.

    python examples/guard_calibration.py --trials 500 [--imagenette ../shared/data/imagenette-guard]

Real predictions: the default model on the textile target (60 images a class of
conformal-clip-data, as recipes/textile.yaml holds out), on builtin:fashion-mnist (when
Debian's dataset-fashion-mnist is installed) and on Imagenette (when a folder is given; it is
a measurement set, and only its baseline predictions are used here). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from vepatch import calibration
from vepatch.recipe import GuardSpec, GuardSuite


def real_outcomes(imagenette: Path | None) -> tuple[calibration.Outcomes, list[tuple[calibration.Outcomes, float]]]:
    """The default model's predictions: the textile target and the guard suites with their bars."""
    import numpy as np

    from vepatch import suites
    from vepatch.data import open_image_set, resolve_path
    from vepatch.evaluate import predict
    from vepatch.models import load_model
    from vepatch.models.heads import text_head

    loaded = load_model("default")

    def outcomes(name, folder, classes=None, folders=None, templates=("a photo of a {}.",), per_class=0):
        images = open_image_set(folder, classes, folders, name)
        if per_class:
            rng = random.Random(0)
            pick = [i for k in range(len(images.classnames))
                    for i in sorted(rng.sample([j for j, s in enumerate(images.samples) if s.label == k],
                                               min(per_class, sum(s.label == k for s in images.samples))))]
            images = images.subset(pick)
        p = predict(loaded, text_head(loaded, images.classnames, list(templates)), images, 32, "cpu")
        return calibration.Outcomes(name, np.asarray(p.labels), np.asarray(p.preds), len(images.classnames))

    textile = resolve_path("pkg:conformal_clip_data/data/textile_images/simulated")
    target = outcomes("textile", textile, ["nominal", "local defect", "global defect"],
                      {"local": "local defect", "global": "global defect"}, ("a photo of {} fabric.",), per_class=60)
    guards = []
    if suites.available("fashion-mnist"):
        folder = Path(tempfile.mkdtemp()) / "fashion-mnist"
        suites.materialize("fashion-mnist", folder)
        guards.append((outcomes("fashion-mnist (real)", folder), 2.0))
    if imagenette is not None:
        guards.append((outcomes("imagenette (real)", imagenette), 1.0))
    return target, guards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=500, help="planted candidates per scenario")
    ap.add_argument("--imagenette", type=Path, help="an Imagenette folder for real baseline predictions (optional)")
    ap.add_argument("--no-real", action="store_true", help="synthetic suites only (no model is loaded)")
    args = ap.parse_args()
    start = time.time()
    night = calibration.synthetic("night target", 9, 0.0, classes=3, seed=1)
    main_target = calibration.synthetic("main target", 180, 0.15, classes=3, seed=1)
    configs = [  # (target, its true gain at λ 1, guard suite, its bar, its churn at λ 1)
        (main_target, 0.20, calibration.synthetic("synthetic", 600, 0.8, seed=2), 1.0, 0.02),
        (main_target, 0.20, calibration.synthetic("synthetic", 1000, 0.3, seed=3), 2.0, 0.05),
        (night, 0.60, calibration.synthetic("synthetic", 1000, 0.3, seed=3), 2.0, 0.05),
    ]
    if not args.no_real:
        target, guards = real_outcomes(args.imagenette)
        configs += [(target, 0.20, g, bar, 0.03) for g, bar in guards]
    print("| target (n) | guard suite (n, base acc.) | bar | claim | scenario | accepted | 95% CI | design | holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target, gain, guard, bar, churn in configs:
        spec = GuardSpec(suites=[GuardSuite(path="g", name=guard.name, max_drop_pp=bar)])
        for r in calibration.run(target, guard, spec, gain, churn, args.trials):
            print(f"| {target.name} ({len(target.labels)}) | {guard.name} ({len(guard.labels)}, {100 * guard.right.mean():.0f}%) "
                  f"| {bar:g} pp | {r.claim} | {r.scenario} | {100 * r.rate:.1f}% | {100 * r.low:.1f}–{100 * r.high:.1f}% "
                  f"| {100 * r.predicted:.1f}% | {'yes' if r.holds else 'NO'} |", flush=True)
    print(f"\n{args.trials} trials a scenario, strengths 1, 0.75, 0.5, 0.25 at alpha 0.05 (0.0125 each); "
          f"guard churn {', '.join(f'{100 * c[4]:g}%' for c in configs)} at λ 1; {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
