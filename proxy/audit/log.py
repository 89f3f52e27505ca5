"""The hash-chained audit log (JSON Lines).

Each line is one JSON object: ``ts`` (RFC 3339 UTC), ``type`` (dotted lowercase, e.g.
``access.request.created``), ``actor``, the event's own fields, ``prev`` (the previous line's
``hash``, 64 zeros for the first line) and ``hash``: the SHA-256 (hex) of the line's canonical JSON
without ``hash`` (keys sorted, no spaces, UTF-8).

What it is for: writing events durably in order and verifying a log file.
What it must not do: accept secrets as fields (callers never pass them; ``emit`` refuses field names
that look like secrets), or rewrite anything already written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.clock import Clock, rfc3339

GENESIS = "0" * 64
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_RESERVED = frozenset({"ts", "type", "actor", "prev", "hash"})
_SECRET_FIELD = re.compile(r"pass(word|phrase)|secret|private|token", re.I)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# stands in for the hash while a line is serialised once (see AuditLog.emit); random, so that no
# field value can contain it
_PLACEHOLDER = os.urandom(32).hex()


def cut_text(name: str, text: str, limit: int) -> dict[str, Any]:
    """Event fields for ``text`` (SQL, a command line): ``{name: text}``, or, when ``text`` is
    longer than ``limit`` characters, its first ``limit`` with ``NAME_truncated`` and
    ``NAME_sha256`` (the SHA-256 of all of it, hex), so a long text cannot fill the log and what
    was cut can still be matched."""
    if len(text) <= limit:
        return {name: text}
    return {name: text[:limit], f"{name}_truncated": True,
            f"{name}_sha256": hashlib.sha256(text.encode()).hexdigest()}


def canonical(event: dict[str, Any]) -> bytes:
    return _ENCODER.encode(event).encode()


def _hash(event: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(event)).hexdigest()


class AuditLogError(Exception):
    """The existing log cannot be continued; the message names the file and what to do."""


def _tail(f, size: int) -> tuple[int, bytes]:
    """(offset, bytes) of the file's last line, newline included if present."""
    pos, tail = size, b""
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0:
            return pos + cut + 1, tail[cut + 1:]
    return 0, tail


def _recover(path: Path) -> tuple[str, dict | None]:
    """The last line's hash, after repairing a torn last write.

    A last line without its newline is a write the previous process did not finish: when it is a
    whole event it gets its newline; otherwise it is cut off, and the repair (bytes removed and
    their SHA-256) is returned so it can be audited.

    Raises:
        AuditLogError: a complete last line that is not an event of this log.
    """
    repair = None
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return GENESIS, None
        offset, last = _tail(f, size)
        if not last.endswith(b"\n"):
            try:
                event = json.loads(last)
                claimed = event["hash"]
            except (ValueError, KeyError, TypeError):
                f.truncate(offset)
                repair = {"removed_bytes": len(last),
                          "removed_sha256": hashlib.sha256(last).hexdigest()}
                size = offset
                if size == 0:
                    return GENESIS, repair
                offset, last = _tail(f, size)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                return claimed, None
        try:
            return json.loads(last)["hash"], repair
        except (ValueError, KeyError, TypeError):
            pass
        raise AuditLogError(f"{path}: the last line is not an audit event; run 'jit-proxy audit "
                            f"verify {path}', keep the file as evidence and start a new log")


class AuditLog:
    """Appends events to ``path`` (created 0600). Not thread-safe: use from the event loop."""

    def __init__(self, path: Path, clock: Clock):
        self.path = Path(path)
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)
        self.observers: list = []  # called with each event after it is written (metrics)
        self._checked_types: set[str] = set()   # event types and field names already
        self._checked_fields: set[str] = set()  # validated (emit is on the per-statement path)
        self._ts_second, self._ts_prefix = -1, ""
        try:
            self._prev, repair = _recover(self.path)
            self._size = os.fstat(fd).st_size  # where the next line starts
        except BaseException:
            self._file.close()
            raise
        # the repair, if any, for the owner to pass on (observers are attached after this)
        self.repaired: dict[str, Any] | None = None
        if repair is not None:
            self.repaired = self.emit("audit.log.repaired", "system",
                                      why="torn last write removed", **repair)

    def emit(self, type: str, actor: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it (with ``prev`` and ``hash``).

        Args:
            type: dotted lowercase event type.
            actor: who caused it (a user name, ``system``, or ``policy``).
            fields: JSON-serialisable values; none may be named like a secret.
        Raises:
            ValueError: a malformed type or a secret-looking field name (a programming error).
        """
        if type not in self._checked_types:
            if not _EVENT_TYPE.match(type):
                raise ValueError(f"audit event type {type!r} is not dotted lowercase")
            self._checked_types.add(type)
        for name in fields:
            if name in self._checked_fields:
                continue
            if name in _RESERVED:
                raise ValueError(f"audit field {name!r} is set by the log itself")
            if _SECRET_FIELD.search(name):
                raise ValueError(f"audit field {name!r} looks like a secret; never log secrets")
            self._checked_fields.add(name)
        event: dict[str, Any] = {"ts": self._rfc3339(self._clock.now()), "type": type,
                                 "actor": actor}
        event.update(fields)
        event["prev"] = self._prev
        # serialise once: the canonical line with a placeholder hash, which removed gives the
        # canonical JSON without ``hash`` (keys sorted, so ``actor`` always comes before it)
        event["hash"] = _PLACEHOLDER
        line = _ENCODER.encode(event)
        marker = f',"hash":"{_PLACEHOLDER}"'
        digest = hashlib.sha256(line.replace(marker, "", 1).encode()).hexdigest()
        event["hash"] = digest
        self._append(line.replace(_PLACEHOLDER, digest, 1).encode() + b"\n")
        self._prev = digest
        for observer in self.observers:
            observer(event)
        return event

    def _append(self, data: bytes) -> None:
        """Write ``data`` whole, or raise with the file as it was: a write cut short (a full
        disk) is taken back, so the chain never holds half a line.

        Raises:
            OSError: the write failed (then the event is not in the log)."""
        fd, done = self._file.fileno(), 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            if done:
                try:
                    os.ftruncate(fd, self._size)
                except OSError:  # then the next start repairs the torn last line
                    pass
            raise
        self._size += len(data)

    def _rfc3339(self, now: float) -> str:
        """``rfc3339(now)``, with the part up to the second formatted once per second."""
        frac, whole = math.modf(now)
        us = round(frac * 1e6)  # as datetime.fromtimestamp rounds
        if us >= 1_000_000 or us < 0:
            return rfc3339(now)
        second = int(whole)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = rfc3339(float(second))[:-4]  # "YYYY-MM-DDTHH:MM:SS."
        return f"{self._ts_prefix}{us // 1000:03d}Z"

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int
    bad_line: int | None = None
    problem: str | None = None
    last_hash: str = GENESIS


def verify_log(path: Path) -> VerifyResult:
    """Check every line's hash and its link to the previous line.

    Returns:
        ``VerifyResult(ok=True, lines=N)``, or ``ok=False`` with the first bad line number
        (1-based) and what is wrong with it.
    Raises:
        OSError: the file cannot be read.
    """
    prev = GENESIS
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return VerifyResult(False, n, n, "line is incomplete (no newline)")
            try:
                event = json.loads(raw)
            except ValueError:
                return VerifyResult(False, n, n, "line is not valid JSON")
            if not isinstance(event, dict) or "hash" not in event or "prev" not in event:
                return VerifyResult(False, n, n, "line lacks 'prev' or 'hash'")
            claimed = event.pop("hash")
            if event["prev"] != prev:
                return VerifyResult(False, n, n, "chain broken: 'prev' is not the previous "
                                                 "line's hash (a line was removed or reordered)")
            if canonical({**event, "hash": claimed}) + b"\n" != raw:
                return VerifyResult(False, n, n, "line is not in canonical form (edited)")
            if _hash(event) != claimed:
                return VerifyResult(False, n, n, "hash does not match the line's content")
            prev = claimed
    return VerifyResult(True, n, last_hash=prev)
