"""The proxy's own command shell, as people reach it: ``ssh jit-proxy COMMAND`` and ``ssh jit-proxy``."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.ptyrun import PtySession


def test_interactive_shell_runs_commands(env):
    with PtySession(["ssh", "-F", str(env.ssh_config), "-tt", "alice@jit-proxy"]) as s:
        s.expect(b"jit-proxy> ")
        s.send(b"whoami\r")
        s.expect(b"user: alice")
        s.expect(b"groups: dev")
        s.send(b"targets\r")
        s.expect(b"web1")
        s.send(b"exit\r")
        assert s.wait() == 0


def test_every_command_has_json_and_is_audited(env):
    for command in ("help", "whoami", "targets", "requests", "grants", "sessions", "ca"):
        r = env.ssh("alice", f"{command} --json")
        assert r.returncode == 0, (command, r.stderr)
        json.loads(r.stdout)
    runs = [e["command"] for e in env.audit_events("command.run") if e["actor"] == "alice"]
    assert "sessions --json" in runs and "ca --json" in runs


def test_unknown_user_key_and_unknown_command(env, tmp_path):
    r = env.ssh("alice", "frobnicate")
    assert r.returncode == 2 and b"invalid choice" in r.stderr
    r = env.ssh("mallory", "whoami")  # no key configured for mallory: refused
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    failure = env.wait_event("auth.failure", lambda e: e["actor"] == "mallory")
    # mallory has no key file: her client offered none (and then just closed the connection)
    assert failure["why"] == "no key offered", failure
    assert failure["ended"] == "Connection lost", failure


def test_a_command_that_meets_a_store_error_fails_alone_and_is_audited(fresh_env):
    """The store's database stays locked past its busy timeout while alice requests access:
    that command fails with the reason (exit 1) and is audited as command.failed; at the prompt
    the shell carries on. Before, the client's connection just closed, nothing said or audited."""
    env = fresh_env
    with PtySession(["ssh", "-F", str(env.ssh_config), "-tt", "alice@jit-proxy"]) as s:
        s.expect(b"jit-proxy> ")
        with env.store_locked():
            r = env.ssh("alice", f"request web1 --login {env.login} --for 5m --reason locked")
            s.send(f"request web1 --login {env.login} --for 5m --reason locked\r".encode())
            s.expect(b"jit-proxy: internal error: database is locked", timeout=20)
            s.expect(b"jit-proxy> ")
        s.send(b"whoami\r")
        s.expect(b"user: alice")
        s.send(b"exit\r")
        assert s.wait() == 0
    assert r.returncode == 1
    assert r.stderr.startswith(b"jit-proxy: internal error: database is locked"), r.stderr
    failed = env.wait_event("command.failed", lambda e: e["actor"] == "alice")
    assert failed["error"] == "database is locked" and failed["command"].startswith("request")
    assert env.json("alice", f"request web1 --login {env.login} --for 5m --reason free")["id"]


def test_a_shell_whose_client_stops_reading_stops_running_commands(fresh_env):
    """A client that sends commands to the proxy's shell but stops reading its socket: once the
    answers back up past the socket's buffers, the shell stops taking commands (asyncssh
    ignores the socket's flow control) instead of running them all and buffering every answer.
    Before, all 6,000 ran (10 MB of answers)."""
    import asyncio

    import asyncssh

    env = fresh_env
    sent = 6000

    def ran() -> int:
        return len([e for e in env.audit_events("command.run") if e["command"] == "help"])

    async def scenario() -> int:
        conn = await asyncssh.connect("127.0.0.1", env.port, username="alice",
                                      client_keys=[str(env.keys / "alice")], known_hosts=None,
                                      config=None, agent_path=None)
        proc = await conn.create_process(window=2**31 - 1)  # the shell, without a terminal
        await proc.stdout.readuntil("jit-proxy> ")
        conn._transport.pause_reading()  # the socket: nothing more is read from the proxy
        proc.stdin.write("help\n" * sent)  # (about 1.7 KB of answer each)
        last, still = -1, 0
        for _ in range(60):  # until no command has run for 2 s
            await asyncio.sleep(0.5)
            now = ran()
            still = still + 1 if now == last else 0
            last = now
            if still == 4 or now == sent:
                break
        conn.abort()
        return last

    done = asyncio.run(scenario())
    assert 0 < done < sent, done  # stopped while the client did not read


def test_requester_rules(env):
    r = env.ssh("alice", f"request web1 --login {env.login} --for 5h --reason too long")
    assert r.returncode == 1 and b"exceeds the maximum of 4h" in r.stderr
    r = env.ssh("bob", f"request web1 --login {env.login} --for 1h --reason not a requester")
    assert r.returncode == 1 and b"no policy lets bob request" in r.stderr
    req = env.json("alice", f"request web1 --login {env.login} --for 1h --reason self-approve?")
    r = env.ssh("alice", f"approve {req['id']}")
    assert r.returncode == 1 and b"cannot approve or deny your own request" in r.stderr
    r = env.ssh("carol", f"approve {req['id']}")
    assert r.returncode == 1 and b"carol is not an approver" in r.stderr
    r = env.ssh("bob", f"deny {req['id']} --reason not today")
    assert r.returncode == 0
    listed = [line for line in env.ssh("alice", "requests").stdout.decode().splitlines()
              if line.startswith(f"{req['id']} ")]
    assert listed and listed[0].endswith("self-approve? [denied by bob: not today]"), listed
    r = env.ssh("bob", f"approve {req['id']}")
    assert r.returncode == 1 and b"is denied, not pending" in r.stderr
    refused = {e["type"] for e in env.audit_events("access.") if e["type"].endswith(".refused")}
    assert {"access.request.refused", "access.approval.refused"} <= refused


def test_ca_prints_the_lines_targets_and_clients_need(env):
    data = env.json("alice", "ca")
    assert data["known_hosts"] == (env.root / "known_hosts").read_text().strip()
    assert data["user_ca"] == (env.target.directory / "user_ca.pub").read_text().strip()
    r = subprocess.run(["ssh-keygen", "-l", "-f", "/dev/stdin"], input=data["user_ca"].encode(),
                       capture_output=True)
    assert r.returncode == 0 and b"ED25519" in r.stdout


def test_unauthenticated_connections_are_capped_per_address(fresh_env):
    import socket
    import time
    env = fresh_env
    config = env.config()
    config["ssh"]["max_unauthenticated_per_address"] = 3
    env.write_config(config)
    env.restart()
    held = [socket.create_connection(("127.0.0.1", env.port), timeout=5) for _ in range(3)]
    try:
        for s in held:
            assert s.recv(64).startswith(b"SSH-2.0-")  # admitted: the server's banner
        extra = socket.create_connection(("127.0.0.1", env.port), timeout=5)
        extra.sendall(b"SSH-2.0-test\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = extra.recv(4096)
            if not chunk:
                break
            data += chunk
        extra.close()
        assert b"too many unauthenticated connections" in data or data.count(b"\n") <= 1
        r = env.ssh("alice", "whoami")  # still refused while the three are held
        assert r.returncode == 255
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    r = env.ssh("alice", "whoami")
    assert r.returncode == 0, r.stderr
    assert env.wait_event("ssh.connection.refused",
                          lambda e: e["why"] == "too many unauthenticated connections")


def test_failed_keys_lock_out_the_address_not_the_user(fresh_env):
    """Nobody can guess a key, so failing with wrong keys on purpose must not lock a named user
    out (a denial of service anyone reaching the port could repeat): those failures count
    against the source address only. Once the address's allowance is spent, every login from
    it waits out the lockout, the right key included, and the client is told why."""
    import asyncssh
    from tests.integration.test_operations import jit
    env = fresh_env
    config = env.config()
    config["auth"] = {"max_failures": 3, "max_failures_per_address": 5, "lockout": "10m"}
    env.write_config(config)
    env.restart()
    wrong = env.root / "wrong_key"
    wrong.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    wrong.chmod(0o600)
    wrong_config = env.root / "wrong_ssh_config"
    wrong_config.write_text(env.ssh_config.read_text().replace(
        f"IdentityFile {env.keys / 'alice'}\n", f"IdentityFile {wrong}\n"))

    def wrong_key() -> None:
        r = env.run(["ssh", "-F", str(wrong_config), "alice@jit-proxy", "whoami"],
                    stdin=subprocess.DEVNULL)
        assert r.returncode == 255
    for _ in range(4):  # more than max_failures
        wrong_key()
    failures = env.wait_event("auth.failure", lambda e: e["actor"] == "alice")
    assert failures["method"] == "publickey" and failures["why"] == "no valid key"
    assert failures["counts_against"] == ["address:127.0.0.1"]
    r = env.ssh("alice", "whoami")  # her own key: in
    assert r.returncode == 0, r.stderr
    assert not env.audit_events("auth.lockout")
    wrong_key()  # the address's fifth
    lock = env.wait_event("auth.lockout", lambda e: e["subject"] == "address:127.0.0.1")
    assert lock["failures"] == 5
    r = env.ssh("alice", "whoami")  # the right key, refused for the lockout time
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert b"too many failed logins" in r.stderr
    assert env.wait_event("auth.locked", lambda e: e["actor"] == "alice")
    assert env.ssh("bob", "whoami").returncode == 255  # from that address, nobody
    assert [e["subject"] for e in env.audit_events("auth.lockout")] == ["address:127.0.0.1"]
    r = jit("lockouts", "clear", "address:127.0.0.1", "-c", str(env.config_path))
    assert r.returncode == 0, r.stderr
    assert env.ssh("alice", "whoami").returncode == 0


def test_a_key_offered_after_the_address_got_locked_is_refused(fresh_env):
    """The address's lockout is read when the key is checked, not when the connection began:
    a connection opened before the lockout cannot log in by key after it."""
    import asyncio

    import asyncssh
    env = fresh_env
    config = env.config()
    config["auth"] = {"max_failures": 3, "max_failures_per_address": 3, "lockout": "10m"}
    env.write_config(config)
    env.restart()

    async def run() -> bool:
        go = asyncio.Event()

        class Slow(asyncssh.SSHClient):
            offered = False

            async def public_key_auth_requested(self):
                await go.wait()  # 'none' already went out: the login began before the lockout
                if self.offered:
                    return None
                self.offered = True
                return asyncssh.read_private_key(str(env.keys / "alice"))

        login = asyncio.ensure_future(asyncssh.create_connection(
            Slow, "127.0.0.1", env.port, username="alice", known_hosts=None, agent_path=None,
            client_keys=None, preferred_auth="publickey"))
        await asyncio.sleep(1)
        for _ in range(3):  # wrong keys lock the address
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect("127.0.0.1", env.port, username="bob", known_hosts=None,
                                       agent_path=None, client_keys=[str(env.keys / "alice")],
                                       preferred_auth="publickey")
        await asyncio.to_thread(env.wait_event, "auth.lockout",
                                lambda e: e["subject"] == "address:127.0.0.1")
        go.set()
        try:
            conn, _ = await asyncio.wait_for(login, 15)
        except (asyncssh.PermissionDenied, asyncssh.DisconnectError):
            return False
        conn.close()
        return True
    assert asyncio.run(run()) is False
