"""Restarts lose nothing; the audit log's hash chain verifies and catches a one-byte change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def jit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_restart_keeps_pending_requests_and_active_grants(fresh_env):
    env = fresh_env
    pending = env.json("alice", f"request web1 --login {env.login} --for 1h --reason pending-one")
    grant = env.grant("alice", duration="2h")
    assert env.jump("alice", "true").returncode == 0
    env.restart()
    reqs = env.json("bob", "requests --pending")
    assert [r["id"] for r in reqs] == [pending["id"]]
    grants = env.json("bob", "grants")
    assert [(g["id"], g["status"], g["ends_at"]) for g in grants] == \
        [(grant["id"], "active", grant["ends_at"])]
    r = env.jump("alice", "echo still-granted")
    assert r.stdout == b"still-granted\n", r.stderr
    # after kill -9 too
    env.stop(signal.SIGKILL)
    env.start()
    assert [r["id"] for r in env.json("bob", "requests --pending")] == [pending["id"]]
    assert env.jump("alice", "true").returncode == 0
    approved = env.json("bob", f"approve {pending['id']}")
    assert approved["request_id"] == pending["id"]


def test_sigterm_exits_0_and_audit_verify_passes_then_catches_one_changed_byte(fresh_env):
    env = fresh_env
    env.grant("alice")
    assert env.jump("alice", "true").returncode == 0
    assert env.stop(signal.SIGTERM) == 0
    log = env.state / "audit.jsonl"
    r = jit("audit", "verify", str(log))
    assert r.returncode == 0, r.stderr
    assert "hash chain intact" in r.stdout
    r = jit("audit", "verify", "-c", str(env.config_path))  # the configured log by default
    assert r.returncode == 0, r.stderr
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) > 5
    target = 4  # 1-based line number to tamper with
    line = bytearray(lines[target - 1])
    i = line.index(b'"actor":"') + len(b'"actor":"')
    line[i] = ord("X") if line[i] != ord("X") else ord("Y")
    lines[target - 1] = bytes(line)
    log.write_bytes(b"".join(lines))
    r = jit("audit", "verify", str(log))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{log}:{target}: "), r.stderr


def test_a_torn_last_audit_write_is_repaired_and_told_to_the_operator(fresh_env):
    env = fresh_env
    env.stop()
    path = env.state / "audit.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"ts":"2026-')  # a crash in the middle of a write
    env.start()
    repaired = env.wait_event("audit.log.repaired")
    assert repaired["removed_bytes"] == len(b'{"ts":"2026-')
    assert any("level=warning" in line and "audit.log.repaired" in line
               for line in env.log_path.read_text().splitlines())
    assert env.run(["jit-proxy", "audit", "verify", str(path)]).returncode == 0


def test_a_group_readable_ca_key_stops_the_daemon_naming_the_file(fresh_env):
    env = fresh_env
    env.stop()
    key = env.state / "ca" / "user_ca"
    os.chmod(key, 0o640)
    r = jit("serve", "-c", str(env.config_path))
    assert r.returncode == 1
    assert str(key) in r.stderr and "chmod 600" in r.stderr
    os.chmod(key, 0o600)
    env.start()


def test_encrypted_ca_keys_with_a_passphrase_file(tmp_path):
    from ca import CAKeyError, SSHCertificateAuthority
    pf = tmp_path / "pass"
    pf.write_text("correct horse\n")
    from proxy.runtime.daemon import read_passphrase
    pw = read_passphrase(pf)
    assert pw == b"correct horse"
    SSHCertificateAuthority.open(tmp_path / "ca", pw)
    assert b"ENCRYPTED" in (tmp_path / "ca" / "user_ca").read_bytes()
    try:
        SSHCertificateAuthority.open(tmp_path / "ca", b"wrong")
    except CAKeyError as exc:
        assert "user_ca" in str(exc)
    else:
        raise AssertionError("a wrong passphrase was accepted")
