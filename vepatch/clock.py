"""The one clock: every timestamp vepatch writes comes from here, in UTC.

  stamp()  compact and sortable, used in ids and file names: 20261123T104512123456Z
  iso()    for humans and logs:                                2026-11-23T10:45:12.123456Z
"""

from __future__ import annotations

from datetime import datetime, timezone


def now() -> datetime:
    return datetime.now(timezone.utc)


def stamp(when: datetime | None = None) -> str:
    return (when or now()).strftime("%Y%m%dT%H%M%S%fZ")


def iso(when: datetime | None = None) -> str:
    return (when or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def day(when: datetime | None = None) -> str:
    """The date part of a stamp: archive/ and quarantine/ folders are per day."""
    return (when or now()).strftime("%Y%m%d")
