"""How long the commands that need no model take to answer, and whether they import torch.

  python examples/startup_time.py [WORKSPACE] [--runs 5]

Runs each command in a fresh process `--runs` times and prints the median wall time and
whether torch was imported (`python -X importtime`). WORKSPACE (default: a new one from
`vepatch init` in a temp folder) is only read; with an accepted v1 in it, `show v1` and
`report v1` are measured on it too. A benchmark, not a test: the figures depend on the machine
and on what else runs on it (README, "Startup").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VEPATCH = [sys.executable, "-m", "vepatch"]


def commands(ws: Path, has_v1: bool) -> list[tuple[str, list[str]]]:
    """(label, arguments): usage errors first, then the store readers."""
    c = ["-C", str(ws)]
    out = [
        ("--help", ["--help"]),
        ("a typo: aply", ["aply"]),
        ("apply --method lorsa", ["apply", "--method", "lorsa", *c]),
        ("log", ["log", *c]),
        ("show v9 (no such version)", ["show", "v9", *c]),
        ("report v9 (no such version)", ["report", "v9", *c]),
    ]
    if has_v1:
        out += [("show v1", ["show", "v1", *c]), ("report v1", ["report", "v1", *c, "--out", str(ws / ".startup-v1.html")])]
    return out + [("verify (loads the base model)", ["verify", *c])]


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(VEPATCH + args, capture_output=True)
    return time.perf_counter() - start


def imports_torch(args: list[str]) -> bool:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vepatch", *args], capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in done.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = args.workspace
        if ws is None:
            ws = Path(tmp) / "ws"
            subprocess.run(VEPATCH + ["init", str(ws)], check=True, capture_output=True)
        has_v1 = (ws / ".vepatch" / "patches" / "v0001" / "patch.json").is_file()
        print(f"{'command':32} {'median s':>9} {'min s':>7}  torch imported")
        for label, argv in commands(ws, has_v1):
            times = [seconds(argv) for _ in range(args.runs)]
            print(f"{label:32} {statistics.median(times):9.2f} {min(times):7.2f}  {'yes' if imports_torch(argv) else 'no'}")


if __name__ == "__main__":
    main()
