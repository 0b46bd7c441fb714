"""vepatch's command line, one module per command group (as the `hf` CLI): each command parses,
calls one library function and renders. No loops over data, no file writing here.

  _app.py        the typer app, the command decorator (errors -> exit codes), output helpers
  options.py     options shared by several commands
  workspace.py   init, eval
  patching.py    diagnose, apply, guard
  store.py       log, show, report, rollback, export, verify, gc
  cycle.py       cycle (cron), cycle --stream
  bench.py       bench, speed
  render.py      rich tables
  progress_view.py  the library's progress as a bar (terminal) or lines (cron)
"""

from ._app import app

# each module registers its commands; `vepatch --help` lists them in this order
from . import workspace, patching, store, cycle, bench  # noqa: E402, F401, I001

__all__ = ["app"]
