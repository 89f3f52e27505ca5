"""Small pieces of the daemon's lifecycle: systemd credentials, sd_notify datagrams, the state lock,
audit events in the operator's log."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

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


def test_the_state_lock_is_exclusive_and_never_follows_a_symlink(tmp_path):
    from proxy.runtime.daemon import lock_state_dir
    fd = lock_state_dir(tmp_path)
    assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    assert oct((tmp_path / "lock").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(OSError, match=rf"--dir {tmp_path} is in use by another jit-proxy "
                                      rf"\(pid {os.getpid()}\)"):
        lock_state_dir(tmp_path, "--dir")  # (flock: a second open file, even in one process)
    os.close(fd)
    os.close(lock_state_dir(tmp_path))  # released: taken again
    other = tmp_path / "other"
    other.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (other / "lock").symlink_to(victim)
    with pytest.raises(OSError):
        lock_state_dir(other)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("event, level", [
    ({"type": "access.grant.created", "actor": "bob", "grant": 3}, "INFO"),
    ({"type": "ssh.session.refused", "actor": "alice", "why": "no active grant"}, "WARNING"),
    ({"type": "db.role.teardown_failed", "actor": "system", "error": "x"}, "WARNING"),
    ({"type": "access.grant.setup_failed", "actor": "system", "grant": 3}, "WARNING"),
    ({"type": "db.role.orphaned", "actor": "system", "role": "jit_a_g1"}, "WARNING"),
    ({"type": "ssh.session.orphaned", "actor": "system", "session": 4}, "WARNING"),
    ({"type": "auth.lockout", "actor": "system", "key": "user:alice"}, "WARNING"),
    ({"type": "ssh.protocol.error", "actor": "alice", "error": "bad"}, "WARNING"),
    ({"type": "db.role.dropped", "actor": "system", "role": "jit_a_g1"}, "INFO"),
    ({"type": "auth.failure.suppressed", "actor": "system", "count": 40}, "WARNING"),
    ({"type": "audit.log.repaired", "actor": "system", "removed_bytes": 12}, "WARNING"),
    ({"type": "db.query", "actor": "alice", "sql": "SELECT 1"}, "DEBUG"),
    ({"type": "db.query", "actor": "alice", "sql": "SET client_encoding TO 'SJIS'",
      "refused": "changes the client encoding"}, "WARNING"),
])
def test_audit_events_reach_the_operators_log_at_their_level(caplog, event, level):
    """Every audit event has its line (a statement only at debug level: journald rate-limits a
    unit that floods it); ``prev``, ``hash`` and ``ts`` stay in the audit log."""
    from proxy.runtime.daemon import _log_event
    full = {"ts": "2026-11-29T17:00:00.000Z", **event, "prev": "0" * 64, "hash": "f" * 64}
    with caplog.at_level(logging.DEBUG, logger="jit_proxy.audit"):
        _log_event(full)
    [record] = caplog.records
    assert record.levelname == level
    assert json.loads(record.getMessage()) == event
    caplog.clear()
    with caplog.at_level(getattr(logging, level) + 1, logger="jit_proxy.audit"):
        _log_event(full)
    assert caplog.records == []
