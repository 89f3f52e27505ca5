"""sd_notify(3) without a library: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET.

What it is for: telling systemd (Type=notify) when the daemon is ready, what it is doing, that its
event loop is alive (WatchdogSec=), and that it is stopping.
What it must not do: fail the daemon when systemd is absent (every call is then a no-op), or block
(one datagram per call, non-blocking).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications when ``NOTIFY_SOCKET`` is set ("/path" or "@abstract")."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None  # seconds between pings: half the timeout
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> None:
        """Send ``KEY=value`` lines, e.g. ``notify(READY=1, STATUS="listening")``."""
        if self._sock is None or self._address is None:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self._address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            pass  # systemd went away or is busy: never the daemon's problem

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
