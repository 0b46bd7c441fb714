#!/usr/bin/env bash
# Three nights of cron on the textile target, with no shot pool: each night 10 new images per
# class land in the inbox (night 2 also brings a bad drop: an unknown class folder and an empty
# file), `vepatch cycle` runs as cron would, and the current version is measured on a check
# set no night ever sees.
#   bash examples/textile_nights.sh [WORKSPACE]   (default: nights-ws)
set -euo pipefail
ws=${1:-nights-ws}
here=$(cd "$(dirname "$0")/.." && pwd)
shared="$here/../shared/data/imagenette-guard"

rm -rf "$ws" "$ws.drops"
vepatch init "$ws" --recipe "$here/recipes/textile-nightly.yaml"
[ -d "$shared" ] && mkdir -p "$ws/guards" && cp -r "$shared" "$ws/guards/imagenette"   # optional; digits are built in
python "$here/examples/prepare_textile_nights.py" "$ws.drops" --nights 3 --per-class 10 --check 60
echo "== night 0: the base on the check set"
vepatch eval "$ws.drops/check" -C "$ws" --version base
for night in 1 2 3; do
  mkdir -p "$ws/inbox"
  cp -r "$ws.drops/night$night/." "$ws/inbox/"
  if [ "$night" = 2 ]; then   # a bad drop: it must not block the night
    mkdir -p "$ws/inbox/zebra" && cp "$(ls "$ws.drops/night$night/nominal/"*.jpg | head -1)" "$ws/inbox/zebra/"
    : > "$ws/inbox/nominal/empty.jpg"
  fi
  echo "== night $night: vepatch cycle"
  start=$(date +%s)
  vepatch cycle -C "$ws" --settle 0 || echo "(exit $?)"   # the copy above is complete: nothing to wait for
  echo "   wall time: $(( $(date +%s) - start )) s"
  echo "== after night $night: the current version on the check set"
  vepatch eval "$ws.drops/check" -C "$ws"
done
vepatch log -C "$ws"
