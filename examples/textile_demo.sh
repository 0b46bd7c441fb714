#!/usr/bin/env bash
# The main job on the embedded default model, end to end (what `make demo` runs):
# a workspace on recipes/textile.yaml (built-in guard suites), errors/ from the
# textile package, then diagnose -> apply -> guard, the version log and v1's HTML page.
#   bash examples/textile_demo.sh [WORKSPACE]   (default: demo-ws)
set -euo pipefail
ws=${1:-demo-ws}
here=$(cd "$(dirname "$0")/.." && pwd)
shared="$here/../shared/data/imagenette-guard"

rm -rf "$ws"
vepatch init "$ws" --recipe "$here/recipes/textile.yaml"
imagenette=${VEPATCH_DEMO_IMAGENETTE:-$shared}   # an optional guard suite; digits and Fashion-MNIST are built in
[ -d "$imagenette" ] && mkdir -p "$ws/guards" && cp -r "$imagenette" "$ws/guards/imagenette"
python "$here/examples/prepare_textile_errors.py" "$ws/errors" --per-class 34
cd "$ws"

echo "== zero-shot on the target before any patch"
vepatch eval errors --version base
echo "== which parameters are to blame"
vepatch diagnose errors/
echo "== train a candidate from 16 shots per class (LoRSU)"
vepatch apply --shots 16
echo "== guard: candidate vs the current version; promoted only if prior tasks are kept"
vepatch guard || { rc=$?; [ $rc -eq 3 ] && echo "refused (exit 3): kept in .vepatch/candidates/ for inspection"; exit 0; }
vepatch log
echo "== the page to read: what v1 fixed and broke, image by image"
vepatch report v1
