"""The one injectable clock.

What it is for: every reading of "now" in the proxy goes through a ``Clock`` so that expiry and
validity logic can be tested by moving a ``ManualClock`` instead of sleeping.
What it must not do: anything but tell time (no scheduling; the runtime does that).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """POSIX seconds (UTC)."""


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_800_000_000.0):
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def rfc3339(ts: float) -> str:
    """POSIX seconds as RFC 3339 UTC with milliseconds, e.g. ``2026-11-29T07:07:47.123Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
