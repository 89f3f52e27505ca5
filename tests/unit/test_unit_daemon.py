"""Small pieces of the daemon's lifecycle: systemd credentials, sd_notify datagrams."""

from __future__ import annotations

import socket

from proxy.runtime.daemon import CREDENTIAL, read_passphrase, systemd_credential
from proxy.runtime.notify import Notifier


def test_ca_passphrase_from_systemd_load_credential(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert systemd_credential(CREDENTIAL) is None
    (tmp_path / CREDENTIAL).write_text("s3cret passphrase\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_passphrase(systemd_credential(CREDENTIAL)) == b"s3cret passphrase"


def test_notifier_sends_datagrams_and_is_a_no_op_without_systemd(tmp_path):
    assert not Notifier({}).enabled
    Notifier({}).notify(READY=1)  # nothing to send to: no error either
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval == 2.0
    n.notify(READY=1, STATUS="up")
    assert sock.recv(100) == b"READY=1\nSTATUS=up"
    sock.close()
    n.notify(STOPPING=1)  # the socket went away: still no error
