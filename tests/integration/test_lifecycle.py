"""Operating the daemon: SIGHUP reloads (or refuses) the configuration, SIGTERM drains and stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.integration.ptyrun import PtySession


def test_sighup_applies_a_new_policy_and_keeps_live_sessions(fresh_env):
    env = fresh_env
    env.grant("alice")
    proc = subprocess.Popen(env.jump_args("alice") + ["echo started; sleep 3; echo still-here"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    r = env.ssh("bob", "request web1 --login otherlogin --for 10m --reason bob asks")
    assert r.returncode == 1 and b"no policy lets bob" in r.stderr
    config = env.config()
    config["policies"][1]["requesters"].append("bob")
    env.reload(config)
    r = env.ssh("bob", "request web1 --login otherlogin --for 10m --reason bob asks")
    assert r.returncode == 0, r.stderr
    out, err = proc.communicate(timeout=20)
    assert out == b"still-here\n" and proc.returncode == 0, err


def test_sighup_taking_a_user_out_of_a_policy_stops_new_access(fresh_env):
    """Offboarding through the configuration (found by a newcomer run-through): once a reload
    takes alice out of the policy's requesters, her pending request can no longer be approved
    and her grant opens no new session; her live session carries on, the operator's log names
    the grant to revoke, and putting her back makes the grant usable again."""
    env = fresh_env
    grant = env.grant("alice")
    pending = env.json("alice", "request web2 --login otherlogin --for 10m --reason pending")
    proc = subprocess.Popen(env.jump_args("alice") + ["echo started; sleep 3; echo still-here"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    config = env.config()
    config["groups"]["dev"]["members"] = ["carol"]
    env.reload(config)
    r = env.jump("alice", "true")
    assert r.returncode != 0 and (
        f"alice's grant {grant['id']} for {env.login}@web1 is no longer allowed: alice is no "
        f"longer a requester under policy web (the configuration changed)").encode() \
        in r.stderr, r.stderr
    event = env.wait_event("access.grant.disallowed", lambda e: e["grant"] == grant["id"])
    assert event["why"] == "alice is no longer a requester under policy web"
    rows = [line.split() for line in env.ssh("alice", "grants").stdout.decode().splitlines()]
    assert [row[1] for row in rows if row[0] == str(grant["id"])] == ["disallowed"], rows
    assert "no longer allowed: alice is no longer a requester" in \
        env.ssh("alice", "whoami").stdout.decode()
    r = env.ssh("bob", f"approve {pending['id']}")
    assert r.returncode == 1 and (
        f"request {pending['id']} can no longer be approved: alice is no longer a requester "
        f"under policy web (the configuration changed); deny it").encode() in r.stderr, r.stderr
    refused = env.wait_event("access.approval.refused")
    assert refused["request"] == pending["id"] and "no longer a requester" in refused["why"]
    r = env.ssh("alice", f"extend {grant['id']} --for 10m --reason more")
    assert r.returncode == 1 and f"grant {grant['id']} is no longer allowed".encode() in r.stderr
    out, err = proc.communicate(timeout=20)
    assert out == b"still-here\n" and proc.returncode == 0, err
    assert any("level=warning" in line and f"grant {grant['id']} (alice" in line
               and "no longer allowed" in line for line in env.log_path.read_text().splitlines())
    env.reload(env.config())
    r = env.jump("alice", "echo back")
    assert r.returncode == 0 and r.stdout == b"back\n", r.stderr


def test_a_listen_port_in_use_is_named_by_its_key(fresh_env):
    import socket
    env = fresh_env
    env.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = env.config()
        config["ssh"]["listen_port"] = taken.getsockname()[1]
        env.write_config(config)
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "-c", str(env.config_path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"jit-proxy: cannot start: [Errno 98] ssh.listen_address/listen_port "
            f"127.0.0.1:{config['ssh']['listen_port']}: Address already in use") in r.stderr, \
        r.stderr


def test_an_admin_socket_that_cannot_be_made_is_named_and_nothing_says_started(fresh_env):
    env = fresh_env
    env.stop()
    blocker = env.root / "not-a-directory"
    blocker.write_text("")
    config = env.config()
    config["daemon"] = {"admin_socket": str(blocker / "admin.sock")}
    env.write_config(config)
    started = len(env.audit_events("proxy.started"))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "-c", str(env.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"jit-proxy: cannot start: [Errno 17] daemon.admin_socket {blocker}/admin.sock: File "
            f"exists (its directory must exist") in r.stderr, r.stderr
    assert len(env.audit_events("proxy.started")) == started


def test_sighup_with_a_broken_config_keeps_the_old_one_and_logs_key_and_line(fresh_env):
    env = fresh_env
    good = env.config_path.read_text()
    broken = good.replace("max_duration: 4h", "max_duration: 4 hours", 1)
    env.config_path.write_text(broken)
    line = next(i for i, l in enumerate(broken.splitlines(), 1) if "4 hours" in l)
    env.proc.send_signal(signal.SIGHUP)
    refused = env.wait_event("proxy.reload.refused")
    assert any(f":{line}: policies[0].max_duration:" in e for e in refused["errors"])
    log = env.log_path.read_text()
    assert f"{env.config_path}:{line}: policies[0].max_duration:" in log
    assert env.ssh("alice", "whoami").returncode == 0  # the old configuration is in force
    r = env.ssh("alice", f"request web1 --login {env.login} --for 2h --reason still allowed")
    assert r.returncode == 0, r.stderr


def test_sigterm_with_live_ssh_and_psql_sessions(fresh_pg_env):
    env = fresh_pg_env
    config = env.config()
    config["daemon"] = {"drain_time": "1s"}
    env.write_config(config)
    env.restart()
    env.grant("alice")
    req = env.json("alice", "request orders --role read --for 10m --reason drain")
    env.json("bob", f"approve {req['id']}")
    login = env.json("alice", "db-login orders")
    (env.root / "jit-ca.pem").write_bytes(env.ssh("alice", "ca --pg").stdout)
    psql = subprocess.Popen(
        ["psql", "-X", "-At", f"host=127.0.0.1 port={env.pg_port} user=alice dbname=orders "
         f"sslmode=verify-full sslrootcert={env.root / 'jit-ca.pem'}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PGPASSWORD": login["password"]})
    psql.stdin.write("SELECT 'psql up';\n")
    psql.stdin.flush()
    assert psql.stdout.readline() == "psql up\n"
    with PtySession(env.jump_args("alice") + ["-tt"]) as s:
        s.send(b"echo SHELL-$((40+2))\r")
        s.expect(b"SHELL-42")  # the remote shell's output, not the local echo of the line
        t0 = time.monotonic()
        rc = env.stop(signal.SIGTERM)
        assert rc == 0
        assert time.monotonic() - t0 < 10
        s.expect(b"the proxy is shutting down", timeout=5)
    out, err = psql.communicate("SELECT 1;\n", timeout=20)
    assert "terminating connection: the proxy is shutting down" in err, err
    events = [json.loads(l) for l in (env.state / "audit.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["type"] in ("ssh.session.end", "db.session.end")]
    assert {e["type"] for e in ends} == {"ssh.session.end", "db.session.end"}
    assert all(e["reason"] == "proxy stopped" for e in ends), ends
    shell = next(e for e in ends if e["type"] == "ssh.session.end")
    played = subprocess.run(["asciinema", "cat", shell["recording"]], capture_output=True)
    assert played.returncode == 0 and b"SHELL-42" in played.stdout
    assert events[-1]["type"] == "proxy.stopped"
    v = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify",
                        str(env.state / "audit.jsonl")], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    env.start()  # for the fixture's teardown


def test_logs_are_one_logfmt_line_per_event_and_hold_no_secret(fresh_pg_env):
    import re
    env = fresh_pg_env
    req = env.json("alice", "request orders --role read --for 10m --reason logs")
    env.json("bob", f"approve {req['id']}")
    login = env.json("alice", "db-login orders")
    (env.root / "jit-ca.pem").write_bytes(env.ssh("alice", "ca --pg").stdout)
    r = subprocess.run(["psql", "-X", "-At", f"host=127.0.0.1 port={env.pg_port} user=alice "
                        f"dbname=orders sslmode=verify-full sslrootcert={env.root / 'jit-ca.pem'}",
                        "-c", "SELECT 1"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PGPASSWORD": login["password"]})
    assert r.returncode == 0, r.stderr
    env.wait_event("db.session.end")
    env.stop()
    log = env.log_path.read_text()
    lines = [l for l in log.splitlines() if l.strip()]
    pattern = re.compile(r'^ts=\S+Z level=(debug|info|warning|error|critical) logger=\S+ msg=".*"$')
    assert lines and all(pattern.match(l) for l in lines), [l for l in lines
                                                            if not pattern.match(l)][:3]
    assert any('\\"type\\":\\"db.session.start\\"' in l for l in lines)  # audit events, too
    assert login["password"] not in log
    for key in (env.state / "ca").iterdir():  # no key material either
        if not key.name.endswith(".pub") and key.suffix != ".pem":
            body = [l for l in key.read_text().splitlines() if l and not l.startswith("-----")]
            assert all(part not in log for part in body)
    env.start()
