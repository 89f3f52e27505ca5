"""The TTL: sessions end within 2 s of the grant's end with one readable line; revoke is immediate."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime

from tests.integration.ptyrun import PtySession


def _ends_at(grant: dict) -> float:
    return datetime.fromisoformat(grant["ends_at"].replace("Z", "+00:00")).timestamp()


def test_session_held_past_the_grant_end_is_closed_within_2s(fresh_env):
    env = fresh_env
    grant = env.grant("alice", duration="4s")
    end = _ends_at(grant)
    proc = subprocess.Popen(env.jump_args("alice") + ["echo started; sleep 60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    closed_at = time.time()
    assert out == b"started\n"
    assert closed_at - end < 2.0, f"closed {closed_at - end:.2f}s after the end"
    assert closed_at >= end - 0.1
    lines = [l for l in err.decode().splitlines() if l.strip()]
    assert len(lines) == 1, lines
    # the grant's own end, not the time the sweep found it
    assert lines[0] == (f"jit-proxy: access to {env.login}@web1 ended at {grant['ends_at']} "
                        f"(grant {grant['id']} expired)")
    assert proc.returncode != 0
    # new sessions are refused
    r = env.jump("alice", "true")
    assert r.returncode == 255
    assert b"no active grant" in r.stderr
    expired = env.wait_event("access.grant.expired", lambda e: e["grant"] == grant["id"])
    assert expired["actor"] == "system"
    status = env.json("alice", "grants --all")
    assert [g["status"] for g in status if g["id"] == grant["id"]] == ["expired"]


def test_interactive_session_sees_the_line_at_the_end(fresh_env):
    env = fresh_env
    grant = env.grant("alice", duration="3s")
    with PtySession(env.jump_args("alice") + ["-tt"]) as s:
        s.send(b"echo READY-$((6*7))\n")
        s.expect(b"READY-42")
        s.expect(b"jit-proxy: access to", timeout=10)
        s.expect(f"grant {grant['id']} expired".encode())
        assert s.wait() != 0
    assert time.time() - _ends_at(grant) < 4  # includes the pty teardown


def test_revoke_closes_sessions_at_once(fresh_env):
    env = fresh_env
    grant = env.grant("alice", duration="1h")
    proc = subprocess.Popen(env.jump_args("alice") + ["echo started; sleep 60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    t0 = time.time()
    r = env.ssh("bob", f"revoke {grant['id']}")
    assert r.returncode == 0, r.stderr
    err = proc.stderr.read().decode()
    proc.wait(timeout=10)
    assert time.time() - t0 < 2.0
    assert f"grant {grant['id']} was revoked by bob" in err
    r = env.jump("alice", "true")
    assert r.returncode == 255
    revoked = env.wait_event("access.grant.revoked", lambda e: e["grant"] == grant["id"])
    assert revoked["actor"] == "bob"
    # what ended is named (a newcomer read "no active grant" as never having had one)
    assert (f"Your grant {grant['id']} ({env.login}@web1) ended at ").encode() in r.stderr \
        and b"(revoked). Request one with" in r.stderr, r.stderr
    r = env.ssh("alice", f"extend {grant['id']} --for 10m --reason more")
    assert r.returncode == 1 and f"grant {grant['id']} ended at ".encode() in r.stderr \
        and b"(revoked): request the access anew" in r.stderr, r.stderr


def test_revoke_needs_the_owner_or_an_approver(fresh_env):
    env = fresh_env
    grant = env.grant("alice", duration="1h")
    r = env.ssh("carol", f"revoke {grant['id']}")
    assert r.returncode == 1 and b"carol may not revoke" in r.stderr
    assert env.wait_event("access.revoke.refused", lambda e: e["actor"] == "carol")
    r = env.ssh("alice", f"revoke {grant['id']}")
    assert r.returncode == 0
