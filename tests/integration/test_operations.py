"""Operator tools on the proxy host: the admin socket (status, kill, revoke), recordings, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.ptyrun import PtySession

RAW_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused:", e.strerror); sys.exit(1)
try:
    s.sendall(b'{"command": "status"}\\n')
except BrokenPipeError:  # refused before it read the request: the answer is still there
    pass
print(s.recv(65536).decode())
"""


def jit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def ops_env(fresh_env):
    env = fresh_env
    sock_dir = Path(tempfile.mkdtemp(prefix="jit-admin-"))
    os.chmod(sock_dir, 0o711)
    config = env.config()
    config["daemon"] = {"admin_socket": str(sock_dir / "admin.sock"),
                        "metrics_listen": "127.0.0.1:0"}  # status says which port it got
    env.write_config(config)
    env.restart()
    env.admin_socket = sock_dir / "admin.sock"
    r = jit("status", "-c", str(env.config_path), "--json")
    assert r.returncode == 0, r.stderr
    address = json.loads(r.stdout)["listeners"]["metrics"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0"), address
    env.metrics_url = f"http://{address}/metrics"
    yield env
    env.stop()


def live_sessions_metric(env) -> int:
    text = urllib.request.urlopen(env.metrics_url, timeout=5).read().decode()
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith("jit_proxy_live_sessions{"))


def test_status_kill_revoke_metrics_and_recordings(ops_env):
    env = ops_env
    grant = env.grant("alice")
    assert live_sessions_metric(env) == 0
    with PtySession(env.jump_args("alice") + ["-tt"]) as s:
        s.send(b"echo OPS-$((20+22))\r")
        s.expect(b"OPS-42")
        r = jit("status", "-c", str(env.config_path), "--json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        live = [x for x in status["live_sessions"] if x["user"] == "alice"]
        assert len(live) == 1 and live[0]["kind"] == "shell"
        assert [g["id"] for g in status["active_grants"]] == [grant["id"]]
        assert "ssh" in status["listeners"] and "admin" in status["listeners"]
        assert live_sessions_metric(env) == 1
        text = jit("status", "-c", str(env.config_path))
        assert f"alice  {env.login}@web1" in text.stdout.replace("   ", "  ")
        r = jit("sessions", "kill", str(live[0]["id"]), "-c", str(env.config_path))
        assert r.returncode == 0, r.stderr
        s.expect(b"ended by an operator")
        assert s.wait() != 0
    deadline = time.monotonic() + 5
    while live_sessions_metric(env) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # the grant survived the kill; revoke it from the host
    assert env.jump("alice", "true").returncode == 0
    r = jit("grants", "-c", str(env.config_path), "revoke", str(grant["id"]))  # -c first
    assert r.returncode == 0, r.stderr
    assert env.jump("alice", "true").returncode == 255
    assert env.wait_event("access.grant.revoked", lambda e: e["actor"] == "local:root")

    # recordings: find by user and target, play, export
    r = jit("recordings", "list", "--user", "alice", "--target", "web1", "--since", "1h",
            "-c", str(env.config_path), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["recordings"]
    assert rows and rows[0]["user"] == "alice" and rows[0]["target"] == "web1"
    sid = rows[0]["id"]
    r = jit("recordings", "play", str(sid), "--speed", "50", "-c", str(env.config_path))
    assert r.returncode == 0 and "OPS-42" in r.stdout, r.stderr
    out = env.root / "export"
    blocked = env.root / "a-file"
    blocked.write_text("")
    r = jit("recordings", "export", str(sid), "--out", str(blocked / "x"), "-c",
            str(env.config_path))
    assert r.returncode == 1 and f"cannot write to {blocked}/x: Not a directory" in r.stderr
    r = jit("recordings", "export", str(sid), "--out", str(out), "-c", str(env.config_path))
    assert r.returncode == 0, r.stderr
    cast = (out / f"session-{sid}.cast").read_text()
    assert json.loads(cast.splitlines()[0])["version"] == 2
    events = [json.loads(l) for l in (out / f"session-{sid}.audit.jsonl").read_text()
              .splitlines()]
    assert {"ssh.session.start", "ssh.session.end"} <= {e["type"] for e in events}
    # and approvers over SSH
    r = env.ssh("bob", f"recordings play {sid} --speed 50")
    assert r.returncode == 0 and b"OPS-42" in r.stdout, r.stderr
    # each audited as what it was: two plays (the operator's, bob's) and one export
    seen = [(e["type"], e["actor"]) for e in env.audit_events("recording.")
            if e.get("session") == sid]
    assert sorted(seen) == sorted([("recording.played", "local:root"),
                                   ("recording.exported", "local:root"),
                                   ("recording.played", "bob")]), seen
    r = env.ssh("alice", "recordings list")
    assert r.returncode == 1 and b"approvers" in r.stderr


def test_ca_on_the_proxy_host_prints_what_the_shell_prints(ops_env):
    """A first contact has nothing to check the proxy against: the operator reads the
    @cert-authority line on the proxy host instead of the client trusting the key on first use."""
    env = ops_env
    r = jit("ca", "-c", str(env.config_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.encode() == env.ssh("alice", "ca").stdout
    assert env.known_hosts_line() in r.stdout
    data = json.loads(jit("ca", "-c", str(env.config_path), "--json").stdout)
    assert data["known_hosts"] == env.known_hosts_line() and "text" not in data
    r = jit("ca", "--pg", "-c", str(env.config_path))
    assert r.returncode == 1 and "no PostgreSQL port" in r.stderr, r.stderr


def test_status_shows_a_first_use_grant_as_its_window_and_deadline(ops_env):
    env = ops_env
    config = yaml.safe_load(env.config_path.read_text())
    config["policies"][1]["window_starts"] = "first_use"
    env.reload(config)
    grant = env.grant("alice", duration="10m")
    text = jit("status", "-c", str(env.config_path)).stdout
    assert f"10m from first use, start by {grant['ends_at']}" in text, text


def test_admin_socket_refuses_users_outside_the_admin_group(ops_env):
    env = ops_env
    r = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", RAW_CLIENT,
                        str(env.admin_socket)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "refused: Permission denied" in r.stdout  # mode 0660
    os.chmod(env.admin_socket, 0o666)  # even when the file mode lets it in, SO_PEERCRED does not
    r = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", RAW_CLIENT,
                        str(env.admin_socket)], capture_output=True, text=True, timeout=30)
    assert "not allowed" in r.stdout and "live_sessions" not in r.stdout
    assert env.wait_event("proxy.admin.refused", lambda e: e["actor"] == "local:nobody")


def test_a_member_of_the_admin_group_reaches_the_socket(fresh_env):
    """The daemon makes the socket's directory itself (no RuntimeDirectory=): a member of
    ``admin_group`` who is neither root nor the daemon's user must get through it (found by a
    newcomer run-through: the shipped unit's 0750 directory kept them out)."""
    env = fresh_env
    group, user = "jittest-admins", "jittestadm"
    subprocess.run(["groupadd", "-f", group], check=True)
    subprocess.run(["useradd", "-M", "-p", "*", "-s", "/usr/sbin/nologin", "-G", group, user],
                   capture_output=True)
    try:
        sock_dir = Path(tempfile.mkdtemp(prefix="jit-admin-"))
        os.chmod(sock_dir, 0o711)
        config = env.config()
        config["daemon"] = {"admin_socket": str(sock_dir / "run" / "admin.sock"),
                            "admin_group": group}
        env.write_config(config)
        env.restart()
        r = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", RAW_CLIENT,
                            str(sock_dir / "run" / "admin.sock")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "live_sessions" in r.stdout, r.stdout + r.stderr
    finally:
        env.stop()
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def test_a_second_proxy_on_the_same_state_dir_is_refused_and_the_first_carries_on(ops_env):
    """Started by mistake on a live proxy's state_dir (a copied config, or a manual serve beside
    systemd's), a second proxy stops before it touches anything: it would replace the first
    one's admin socket and TLS key and close its sessions as orphans."""
    env = ops_env

    def keys_and_certificates() -> dict[str, int]:  # (the live proxy may write its database)
        return {str(p): p.stat().st_mtime_ns for p in env.state.rglob("*")
                if p.is_file() and ".db" not in p.name and "audit" not in p.name}

    before = keys_and_certificates()
    r = jit("serve", "-c", str(env.config_path), "--log-level", "warning")
    assert r.returncode == 1
    assert (f"state_dir {env.state} is in use by another jit-proxy (pid {env.proc.pid})"
            in r.stderr), r.stderr
    assert keys_and_certificates() == before
    status = jit("status", "-c", str(env.config_path), "--socket", str(env.admin_socket))
    assert status.returncode == 0, status.stderr
