"""Options shared by several commands, defined once so a flag means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

WorkspaceOpt = Annotated[
    Optional[Path], typer.Option("-C", "--workspace", help="Workspace folder (default: found upwards from here).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or auto (default: the recipe's).")]
OnlineOpt = Annotated[bool, typer.Option("--online", help="Allow model downloads from a hub (off by default).")]
