"""Named places where tests kill a real process: VEPATCH_FAULT_AT=<name> sends SIGKILL there.

  after-stage, after-diagnose, after-apply, after-version, after-guard, mid-archive   cycle.py
  before-head   store.write_version: the version folder is renamed into place, HEAD not moved yet
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """Tests kill a real process here: VEPATCH_FAULT_AT=<name> sends SIGKILL to it."""
    if os.environ.get("VEPATCH_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
