"""Recordings for auditors: find sessions with recordings, export them with their audit events,
and replay asciicast v2 files at real or faster speed.

What it is for: the shared logic behind ``jit-proxy recordings list|play|export`` (over the admin
socket) and ``ssh jit-proxy recordings …`` (approvers, for the sessions of their policies).
What it must not do: show a recording to someone the policy does not let see it, trust a
recording whose SHA-256 no longer matches the one in the audit log without saying so, or play to
an auditor's terminal what would act on the terminal itself rather than draw on it (see
``TerminalFilter``; an export keeps the recording as it was).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from proxy.access.duration import parse_duration
from proxy.clock import rfc3339
from proxy.runtime.service import AccessError, AccessService

IDLE_LIMIT = 2.0  # seconds: longer pauses are shortened when playing


def parse_since(text: str, now: float) -> float:
    """``2h`` (that long ago) or an ISO 8601 / RFC 3339 time; POSIX seconds.

    Raises:
        AccessError: neither form.
    """
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AccessError(f"--since takes a duration (2h) or a time (2026-11-29T08:00:00Z), "
                          f"not {text!r}") from None
    return when.timestamp()


async def list_recordings(service: AccessService, filters: dict,
                          visible_to: tuple[str, list[str]] | None = None) -> list[dict]:
    """Sessions that have a recording, newest first, filtered by user, target and since."""
    since = filters.get("since")
    start = parse_since(since, service.clock.now()) if since else None
    sessions = await service.store.list_sessions(live=False, user=filters.get("user"),
                                                 visible_to=visible_to, limit=1000)
    out = []
    for s in sessions:
        if not s.recording:
            continue
        if filters.get("target") and s.target != filters["target"]:
            continue
        if start is not None and s.started_at < start:
            continue
        out.append({"id": s.id, "user": s.user, "target": s.target, "login": s.login,
                    "kind": s.kind, "grant": s.grant_id, "started_at": rfc3339(s.started_at),
                    "ended_at": rfc3339(s.ended_at) if s.ended_at else None,
                    "recording": s.recording, "sha256": s.recording_sha256})
    return out


async def get_recording(service: AccessService, actor: str, session_id: int,
                        visible_to: tuple[str, list[str]] | None = None,
                        play: bool = False) -> dict:
    """The recording of ``session_id`` and its session's audit events; audited as
    ``recording.played`` (``play``: shown at the caller's terminal) or ``recording.exported``.

    Raises:
        AccessError: no such recording (or not visible to the caller).
    """
    matches = [s for s in await service.store.list_sessions(live=False, visible_to=visible_to,
                                                            limit=100000) if s.id == session_id]
    if not matches:
        raise AccessError(f"no recording for session {session_id}")
    if not matches[0].recording:
        kind = matches[0].kind
        what = ("its statements are in the audit log (db.query)" if kind == "postgres" else
                "it is in the audit log with its bytes counted")
        named = {"exec": "an exec", "subsystem": "a subsystem (sftp)",
                 "postgres": "a PostgreSQL"}.get(kind, f"a {kind}")
        raise AccessError(f"no recording for session {session_id}: only terminal sessions are "
                          f"recorded, and this was {named} session; {what}")
    session = matches[0]
    data = Path(session.recording).read_bytes()
    intact = hashlib.sha256(data).hexdigest() == session.recording_sha256
    events = []
    with open(service.audit.path, "rb") as f:
        for line in f:
            if b'"session":' in line:
                event = json.loads(line)
                if event.get("session") == session_id:
                    events.append(event)
    service.audit.emit("recording.played" if play else "recording.exported", actor,
                       session=session_id, intact=intact)
    return {"session": session_id, "user": session.user, "target": session.target,
            "recording_path": session.recording, "sha256": session.recording_sha256,
            "intact": intact, "cast": data.decode("utf-8", "replace"), "audit_events": events}


ESC = "\x1b"
STRING_STARTS = "]PX^_k"           # after ESC: OSC, DCS, SOS, PM, APC (ECMA-48 control
                                   # strings), and screen's/tmux's title string (ESC k)
C1_STRING_STARTS = "\x9d\x90\x98\x9e\x9f"  # their 8-bit forms
CSI_LIMIT = 64                     # characters of one CSI sequence held back at most


def _asks_the_terminal(csi: str) -> bool:
    """A CSI sequence that acts on the window or makes the terminal type an answer into its
    own input: window operations and reports (``t``), device status (``n``), device
    attributes (``c``), DECRQM (``$p``), XTVERSION (``>q``)."""
    final = csi[-1]
    return final in "tnc" or (final == "p" and "$" in csi) or (final == "q" and ">" in csi[:3])


class TerminalFilter:
    """What a recorded session wrote, minus what would act on the auditor's terminal itself: the
    control strings (ECMA-48 8.3.89 and kin: OSC, DCS, SOS, PM, APC, in their ESC and 8-bit
    forms, up to BEL, ST or CAN/SUB) that set the window title, write the clipboard (OSC 52),
    make hyperlinks or reprogram the terminal (and screen's ESC k title), and the CSI
    sequences that operate the window or make the terminal answer into its own input (``t``,
    ``n``, ``c``, ``$p``, ``>q``). Colours, cursor movement and erasing, which
    draw the session, pass unchanged. Stateful: ``feed`` the output in any pieces and the
    result is the same."""

    def __init__(self) -> None:
        self._state = "ground"  # ground, esc, csi, string, string_esc
        self._held = ""         # an escape or CSI sequence not finished yet

    def feed(self, text: str) -> str:
        out = []
        for c in text:
            state = self._state
            if state == "string":
                if c in "\x07\x9c\x18\x1a":  # BEL, ST, CAN, SUB end it
                    self._state = "ground"
                elif c == ESC:
                    self._state = "string_esc"
                continue
            if state == "string_esc":
                if c == "\\":  # ESC \ (ST)
                    self._state = "ground"
                    continue
                state, self._held = "esc", ESC  # an ESC ends the string and starts anew
            if state == "csi":
                if " " <= c <= "?":  # parameter and intermediate bytes
                    self._held += c
                    if len(self._held) > CSI_LIMIT:  # no CSI is this long: dropped
                        self._state, self._held = "ground", ""
                    continue
                held, self._state, self._held = self._held, "ground", ""
                if "@" <= c <= "~":  # the final byte
                    if not _asks_the_terminal(held + c):
                        out.append(held + c)
                    continue
                state = "ground"  # anything else cuts the sequence (dropped): c starts anew
            if state == "esc":
                if c in STRING_STARTS:
                    self._state, self._held = "string", ""
                    continue
                if c == "[":
                    self._state, self._held = "csi", ESC + c
                    continue
                self._state, self._held = "ground", ""
                if " " <= c <= "~":  # a two-character escape sequence
                    out.append(ESC + c)
                    continue
                # anything else cuts the ESC (dropped): c starts anew
            if c == ESC:
                self._state, self._held = "esc", ESC
            elif c in C1_STRING_STARTS:
                self._state = "string"
            elif c == "\x9b":  # the 8-bit CSI
                self._state, self._held = "csi", c
            else:
                out.append(c)
        return "".join(out)


def frames(cast: str, speed: float = 1.0, idle_limit: float = IDLE_LIMIT
           ) -> Iterator[tuple[float, str]]:
    """(delay in seconds, text) pairs that replay an asciicast v2 recording's output, through
    a ``TerminalFilter``.

    Raises:
        ValueError: not an asciicast v2 recording.
    """
    lines = cast.split("\n")  # (not splitlines: output may hold U+2028 or U+0085, unescaped)
    if not lines or json.loads(lines[0]).get("version") != 2:
        raise ValueError("not an asciicast v2 recording")
    last = 0.0
    terminal = TerminalFilter()
    for line in lines[1:]:
        if not line.strip():
            continue
        t, kind, data = json.loads(line)
        if kind != "o":
            continue
        delay = min(max(0.0, t - last), idle_limit) / max(speed, 0.01)
        last = t
        yield delay, terminal.feed(data)


def summary_table(rows: list[dict]) -> str:
    from proxy.ssh.commands import _table
    return _table([[str(r["id"]), r["user"], f"{r['login']}@{r['target']}", r["kind"],
                    r["started_at"], r["ended_at"] or ""] for r in rows],
                  ["SESSION", "USER", "ACCESS", "KIND", "STARTED", "ENDED"])


def play(cast: str, speed: float, write: Any, sleep: Any) -> None:
    """Replay to ``write(text)``, pausing with ``sleep(seconds)`` (the local terminal)."""
    for delay, data in frames(cast, speed):
        if delay:
            sleep(delay)
        write(data)
