"""Run a program on a real pseudo-terminal, as a person at a terminal would (no pexpect needed)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import time


class PtySession:
    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80):
        self.argv, self.rows, self.cols = argv, rows, cols
        self.buffer = b""

    def __enter__(self) -> "PtySession":
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvp(self.argv[0], self.argv)
        self.resize(self.rows, self.cols)
        return self

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _read(self, timeout: float) -> bytes:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return b""
        try:
            return os.read(self.fd, 65536)
        except OSError:
            return b""

    def expect(self, needle: bytes, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buffer:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not seen; screen so far: {self.buffer[-2000:]!r}")
            chunk = self._read(0.2)
            if chunk == b"" and self._exited():
                raise AssertionError(f"exited before {needle!r}; output: {self.buffer[-2000:]!r}")
            self.buffer += chunk
        i = self.buffer.index(needle) + len(needle)
        seen, self.buffer = self.buffer[:i], self.buffer[i:]
        return seen

    def _exited(self) -> bool:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status = os.waitstatus_to_exitcode(status)
            self.pid = 0
            return True
        return self.pid == 0

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() > deadline:
                raise AssertionError("program did not exit")
            self.buffer += self._read(0.1)
        return self.status

    def read_rest(self, timeout: float = 2) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = self._read(0.1)
            if chunk:
                self.buffer += chunk
            elif self.pid == 0 or self._exited():
                break
        return self.buffer

    def __exit__(self, *exc) -> None:
        if self.pid:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
        os.close(self.fd)
