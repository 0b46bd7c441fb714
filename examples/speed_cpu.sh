#!/usr/bin/env bash
# The CPU speed figures of README "Speed", one after another (run on an otherwise idle machine).
# Usage: examples/speed_cpu.sh WORKSPACE LORSU_CANDIDATE HEADS_CANDIDATE [OUT_DIR]
# (WORKSPACE: the bench workspace of README "Results"; candidates: ids from its candidates/.)
set -euo pipefail
ws=$1 lorsu=$2 heads=$3 out=${4:-speed-out}
vp=(python -m vepatch)
mkdir -p "$out"
t() { /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M kB peak" "$@"; }
t "${vp[@]}" speed --guard "$lorsu" -C "$ws" --json > "$out/guard-lorsu.json" 2> "$out/guard-lorsu.time"
VEPATCH_MALLOC=system t "${vp[@]}" speed --guard "$lorsu" -C "$ws" --json > "$out/guard-lorsu-system.json" 2> "$out/guard-lorsu-system.time"
t "${vp[@]}" speed --guard "$heads" -C "$ws" --json > "$out/guard-heads.json" 2> "$out/guard-heads.time"
for malloc in tuned system; do
  for bs in 16 32 64; do
    if [ "$malloc" = system ]; then export VEPATCH_MALLOC=system; else unset VEPATCH_MALLOC; fi
    "${vp[@]}" speed --batch-size "$bs" --steps 8 --json > "$out/default-$malloc-$bs.json"
  done
done
unset VEPATCH_MALLOC
"${vp[@]}" speed --model ViT-B-16 --batch-size 8 --steps 3 --json > "$out/vitb16-cpu.json"
echo "written: $out"
