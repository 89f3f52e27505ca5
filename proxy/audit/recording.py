"""Terminal session recordings in asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/).

What it is for: writing what a terminal session showed, with timing, so that ``asciinema play`` and
``asciinema cat`` replay it; and the SHA-256 of the finished file, which goes into the audit log.
The header's ``title`` and the extra ``jit_proxy`` object name user, target, login, grant and session.

What it must not do: record the client's keystrokes (they may be passwords typed with echo off), or
block on a slow disk for long (writes are buffered and flushed on close).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from proxy.clock import Clock


class AsciicastRecorder:
    """One ``.cast`` file, mode 0600, created new (never overwritten)."""

    def __init__(self, path: Path, *, width: int, height: int, clock: Clock,
                 title: str, env: dict[str, str], meta: dict[str, Any]):
        self.path = Path(path)
        for d in reversed([p for p in self.path.parents if not p.exists()]):
            d.mkdir(mode=0o700)  # every directory it creates is private, not just the last
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self._sha = hashlib.sha256()
        self._clock = clock
        self._start = clock.now()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.sha256: str | None = None
        header = {"version": 2, "width": max(1, width or 80), "height": max(1, height or 24),
                  "timestamp": int(self._start), "title": title, "env": env, "jit_proxy": meta}
        self._write(header)

    def _write(self, obj: Any) -> None:
        line = json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")).encode() + b"\n"
        self._sha.update(line)
        self._file.write(line)

    def _elapsed(self) -> float:
        return round(max(0.0, self._clock.now() - self._start), 6)

    def output(self, data: bytes) -> None:
        """Record bytes the session showed (stdout and stderr of a terminal are one stream)."""
        text = self._decoder.decode(data)
        if text:
            self._write([self._elapsed(), "o", text])

    def resize(self, width: int, height: int) -> None:
        self._write([self._elapsed(), "r", f"{width}x{height}"])

    def close(self) -> str:
        """Flush, fsync and close; returns the file's SHA-256 (hex). Idempotent."""
        if self.sha256 is None:
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._write([self._elapsed(), "o", tail])
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.sha256 = self._sha.hexdigest()
        return self.sha256
