"""Durations as people write them: ``30s``, ``15m``, ``2h``, ``1d``, ``1h30m``.

What it is for: one parser and one formatter shared by the config, the command shell and messages.
What it must not do: accept anything ambiguous (bare numbers are seconds only when given as ints
by the config, never as text; negative or zero durations are refused).
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"([0-9]{1,9})([smhdw])")
_WHOLE = re.compile(r"(?:[0-9]{1,9}[smhdw])+")
MAX_DURATION = 366 * 86400  # seconds: no access, request or certificate lasts longer than this


def parse_duration(text: str) -> int:
    """Parse ``text`` such as ``"90s"``, ``"15m"``, ``"2h"``, ``"1h30m"`` into seconds (int > 0).

    Raises:
        ValueError: with a message showing the accepted forms.
    """
    t = text.strip().lower()
    if not _WHOLE.fullmatch(t):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, like 30s, 15m, 2h, 1d")
    seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(t))
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be longer than 0s")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {text!r}: longer than {format_duration(MAX_DURATION)}")
    return seconds


def format_duration(seconds: float) -> str:
    """Format a number of seconds as the shortest ``1h30m``-style text (whole seconds)."""
    s = int(round(seconds))
    if s <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, s = divmod(s, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
