"""Errors the library raises. Each carries a one-line message, a fix and the exit code
the CLI returns for it (DESIGN.md: 1 error, 2 usage, 3 refused, 4 nothing to do, 5 locked)."""

from __future__ import annotations


class VepatchError(Exception):
    """A failure a user can act on: `message` says what, `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(VepatchError):
    """Bad arguments, a bad recipe, a path that is not there."""

    exit_code = 2


class DataError(VepatchError):
    """An image set that cannot be used (no readable image, unknown class folder)."""


class ModelError(VepatchError):
    """A base model that cannot be loaded offline, or a tower vepatch does not know."""


class StoreError(VepatchError):
    """A workspace store that is corrupt, tampered with or bound to another base."""


class NothingToDo(VepatchError):
    """No new errors, no candidate: nothing was changed."""

    exit_code = 4


class LockedError(VepatchError):
    """Another vepatch process holds the workspace lock."""

    exit_code = 5
