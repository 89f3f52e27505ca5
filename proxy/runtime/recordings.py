"""Recordings for auditors: find sessions with recordings, export them with their audit events,
and replay asciicast v2 files at real or faster speed.

What it is for: the shared logic behind ``jit-proxy recordings list|play|export`` (over the admin
socket) and ``ssh jit-proxy recordings …`` (approvers, for the sessions of their policies).
What it must not do: show a recording to someone the policy does not let see it, or trust a
recording whose SHA-256 no longer matches the one in the audit log without saying so.
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
    if not matches or not matches[0].recording:
        raise AccessError(f"no recording for session {session_id}")
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


def frames(cast: str, speed: float = 1.0, idle_limit: float = IDLE_LIMIT
           ) -> Iterator[tuple[float, str]]:
    """(delay in seconds, text) pairs that replay an asciicast v2 recording's output.

    Raises:
        ValueError: not an asciicast v2 recording.
    """
    lines = cast.splitlines()
    if not lines or json.loads(lines[0]).get("version") != 2:
        raise ValueError("not an asciicast v2 recording")
    last = 0.0
    for line in lines[1:]:
        if not line.strip():
            continue
        t, kind, data = json.loads(line)
        if kind != "o":
            continue
        delay = min(max(0.0, t - last), idle_limit) / max(speed, 0.01)
        last = t
        yield delay, data


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
