"""Brokered SSH sessions through the proxy with stock OpenSSH against a real sshd."""

from __future__ import annotations

import hashlib
from datetime import datetime
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.ptyrun import PtySession


def connect_when_listening(port: int, timeout: float = 15) -> socket.socket:
    """A connection to 127.0.0.1:PORT once something (ssh -L) listens there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listened on port {port}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def granted(env):
    """alice holds a live grant for LOGIN@web1 for the whole module."""
    return env.grant("alice")


def test_known_hosts_with_only_the_cert_authority_line_is_enough(env, granted):
    kh = (env.root / "known_hosts").read_text().strip().splitlines()
    assert len(kh) == 1
    assert kh[0].startswith(f"@cert-authority jit-proxy,[jit-proxy]:{env.port},web1,web2 "
                            "ssh-ed25519 ")
    r = env.jump("alice", "echo via-proxy", )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"via-proxy\n"


def test_empty_known_hosts_is_refused_by_the_client(env, granted, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(env.ssh_config.read_text().replace(str(env.root / "known_hosts"), str(empty)))
    r = env.run(["ssh", "-F", str(cfg), "-J", "alice@jit-proxy", f"{env.login}@web1", "true"],
                stdin=subprocess.DEVNULL)
    assert r.returncode == 255
    assert b"Host key verification failed" in r.stderr
    # and the proxy never presents a plain key under the target's name: with the CA line only
    # for the jump host, the inner hop still verifies (the certificate names web1)
    cfg2 = tmp_path / "ssh_config2"
    kh2 = tmp_path / "kh2"
    kh2.write_text(env.ca.known_hosts_line("jit-proxy") + "\n")
    cfg2.write_text(env.ssh_config.read_text().replace(str(env.root / "known_hosts"), str(kh2)))
    r = env.run(["ssh", "-F", str(cfg2), "-J", "alice@jit-proxy", f"{env.login}@web1", "true"],
                stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and b"Host key verification failed" in r.stderr


def test_without_a_grant_the_message_names_the_grant_and_the_request_command(env):
    r = env.jump("carol", "true")
    assert r.returncode == 255
    err = r.stderr.decode()
    assert "carol has no active grant for web1" in err
    assert "ssh jit-proxy request web1 --login" in err
    refused = [e for e in env.audit_events("ssh.session.refused") if e["actor"] == "carol"]
    assert refused and refused[-1]["target"] == "web1"


def test_a_request_still_waiting_is_named_instead_of_the_request_command(env):
    req = env.json("carol", f"request web1 --login {env.login} --for 10m --reason waiting")
    r = env.jump("carol", "true")  # the channel refusal
    assert r.returncode == 255
    assert f"Your request {req['id']} ({env.login}@web1) is waiting for approval" in \
        r.stderr.decode(), r.stderr
    other = env.json("carol", f"request web1 --login otherlogin --for 10m --reason other")
    r = env.jump("carol", "true", login="otherlogin")
    assert f"Your request {other['id']} (otherlogin@web1) is waiting" in r.stderr.decode()
    for r in (req, other):  # withdrawn by carol herself
        done = env.ssh("carol", f"cancel {r['id']}")
        assert done.stdout == f"request {r['id']} cancelled\n".encode(), done.stderr
    r = env.jump("carol", "true")
    assert b"is waiting" not in r.stderr and b"ssh jit-proxy request web1 --login" in r.stderr
    # an extension waiting for a grant that has ended can never be approved: not named
    grant = env.grant("carol")
    ext = env.json("carol", f"extend {grant['id']} --for 10m --reason more")
    assert ext["status"] == "pending", ext
    assert env.ssh("carol", f"revoke {grant['id']}").returncode == 0
    r = env.jump("carol", "true")
    assert b"is waiting" not in r.stderr and b"ssh jit-proxy request web1 --login" in r.stderr
    assert env.ssh("carol", f"cancel {ext['id']}").returncode == 0


def test_a_grant_for_another_login_or_target_does_not_open(env, granted):
    carol = env.grant("carol", login="otherlogin")
    assert carol["login"] == "otherlogin"
    before = len(env.audit_events())
    r = env.jump("carol", "true")  # LOGIN@web1, but carol's grant is for otherlogin
    assert r.returncode == 255
    assert f"carol has no active grant for {env.login}@web1" in r.stderr.decode()
    assert f"--login {env.login}" in r.stderr.decode()
    # the connection to web1 begun for otherlogin when the channel opened (connect_early) is
    # dropped unused: no certificate minted, no failure reported
    time.sleep(0.5)
    assert not [e for e in env.audit_events()[before:] if e["type"] in (
        "ca.certificate.issued", "ssh.upstream.failed") and e.get("grant") == carol["id"]]
    r = env.jump("alice", "true", target="web2")  # alice's grant is for web1
    assert r.returncode == 255
    assert "alice has no active grant for web2" in r.stderr.decode()


def _proxy_rss_kib(env) -> int:
    for line in open(f"/proc/{env.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _jump_with_asyncssh(env, target: str = "web1", window: int | None = None):
    """(outer, inner): alice's connection to the proxy and, through it, to ``target`` as the
    test login; with ``window``, the outer direct-tcpip channel announces that window."""
    import asyncssh

    class Tunnel:  # asyncssh's tunnel= takes anything with create_connection
        async def create_connection(self, session_factory, host, port):
            extra = {} if window is None else {"window": window}
            return await outer.create_connection(session_factory, host, port, **extra)

    outer = await asyncssh.connect("127.0.0.1", env.port, username="alice",
                                   client_keys=[str(env.keys / "alice")], known_hosts=None,
                                   config=None, agent_path=None)
    inner = await asyncssh.connect(target, 22, tunnel=Tunnel(), username=env.login,
                                   known_hosts=None, config=None, agent_path=None,
                                   client_keys=None)
    return outer, inner


def _connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` (the proxy's, to the target)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, _, remote, state = line.split()[:4]
        count += state == "01" and remote == f"0100007F:{port:04X}"
    return count


def test_the_connection_to_the_target_begins_early_but_one_per_user_and_only_for_a_while(
        fresh_env):
    """connect_early: a channel opened with nothing sent on it begins at most one connection
    to the target per user and target (opening channels must not fill the target's
    MaxStartups), and one not claimed by a login within EARLY_CLAIM_WITHIN is dropped; a
    client that logs in later still gets in, on a fresh connection, with no failure reported.
    (A proxy of its own: an earlier test's unclaimed early connection starts a cooldown.)"""
    env = fresh_env
    env.grant("alice")
    hold = [subprocess.Popen(["sh", "-c", f"sleep 3 | ssh -F {env.ssh_config} -W web1:22 "
                                          f"alice@jit-proxy"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(6)]
    try:
        deadline = time.monotonic() + 10
        while _connections_to(env.target.port) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # every channel is open by now
        assert _connections_to(env.target.port) == 1
    finally:
        for p in hold:
            p.kill()
            p.wait()
    before = len(env.audit_events())
    hop = f"sh -c '(sleep 5.5; cat) | ssh -F {env.ssh_config} -W %h:%p alice@jit-proxy'"
    r = env.run(["ssh", "-F", str(env.ssh_config), "-o", f"ProxyCommand={hop}",
                 f"{env.login}@web1", "echo late-$((6*7))"], stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and b"late-42" in r.stdout, r.stderr
    events = env.audit_events()[before:]
    assert not [e for e in events if e["type"] == "ssh.upstream.failed"], events


def test_a_session_the_store_cannot_record_fails_alone_and_is_audited(fresh_env):
    """On a jump connection already open, a second session meets a store error (its database
    locked past the busy timeout): that session fails with a message and ssh.session.failed
    (before, nothing was audited), and the connection carries on."""
    import asyncio

    env = fresh_env
    grant = env.grant("alice")

    async def scenario():
        outer, inner = await _jump_with_asyncssh(env)
        first = await inner.run("echo first", check=False)
        with env.store_locked():
            second = await inner.run("echo second", check=False)
        third = await inner.run("echo third", check=False)
        outer.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert (first.exit_status, first.stdout) == (0, "first\n")
    assert second.exit_status == 255 and second.stdout == ""
    assert "jit-proxy: the proxy could not open this session" in second.stderr
    failed = env.wait_event("ssh.session.failed", lambda e: e.get("grant") == grant["id"])
    assert (failed["command"], failed["error"]) == ("echo second", "database is locked")
    assert (third.exit_status, third.stdout) == (0, "third\n")


def test_after_an_early_connection_went_unclaimed_none_begins_for_a_while(fresh_env):
    """Opening and closing channels over and over must not make the target accept a stream of
    connections nobody logs in on (none of them is audited): after one went unclaimed, the
    next channel begins none (EARLY_COOLDOWN), and a login then connects at its login."""
    env = fresh_env
    env.grant("alice")

    def open_channel_for(seconds: float) -> subprocess.Popen:
        return subprocess.Popen(["sh", "-c", f"sleep {seconds} | ssh -F {env.ssh_config} "
                                             f"-W web1:22 alice@jit-proxy"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    first = open_channel_for(1)
    deadline = time.monotonic() + 10
    while _connections_to(env.target.port) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections_to(env.target.port) == 1  # connect_early at work
    first.wait(timeout=15)
    deadline = time.monotonic() + 10
    while _connections_to(env.target.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = open_channel_for(2)
    try:
        seen = 0
        for _ in range(30):  # while the second channel is open
            seen = max(seen, _connections_to(env.target.port))
            time.sleep(0.05)
        assert seen == 0
    finally:
        second.wait(timeout=15)
    r = env.jump("alice", "echo in-$((6*7))")
    assert r.returncode == 0 and r.stdout == b"in-42\n", r.stderr


def test_exit_status_passes_through(env, granted):
    assert env.jump("alice", "exit 3").returncode == 3
    r = env.jump("alice", "echo out; echo err >&2; exit 0")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"out\n", b"err\n")


def test_signal_exit_passes_through(env, granted):
    r = env.jump("alice", "kill -TERM $$")
    assert r.returncode == 255  # OpenSSH exits 255 when the remote command died of a signal
    assert b"" == r.stdout


def test_100mb_of_random_bytes_both_ways(env, granted, tmp_path):
    data = os.urandom(100 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    r = env.jump("alice", "sha256sum", input=data, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == digest
    remote = f"/tmp/jit-test-{os.getpid()}.bin"
    r = env.jump("alice", f"cat > {remote}", input=data, timeout=180)
    assert r.returncode == 0
    r = env.jump("alice", f"cat {remote}; rm -f {remote}", timeout=180)
    assert r.returncode == 0
    assert hashlib.sha256(r.stdout).hexdigest() == digest


def test_scp_sftp_and_rsync(env, granted, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    remote = f"/tmp/jit-scp-{os.getpid()}"
    base = ["-F", str(env.ssh_config), "-J", "alice@jit-proxy"]
    r = env.run(["scp", *base, str(src), f"{env.login}@web1:{remote}"])
    assert r.returncode == 0, r.stderr
    r = env.run(["scp", *base, f"{env.login}@web1:{remote}", str(tmp_path / "scp_back")])
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "scp_back").read_bytes()).hexdigest() == want

    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {remote}.sftp\nget {remote}.sftp {tmp_path / 'sftp_back'}\n"
                     f"rm {remote}.sftp\n")
    r = env.run(["sftp", *base, "-b", str(batch), f"{env.login}@web1"])
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "sftp_back").read_bytes()).hexdigest() == want

    e = f"ssh -F {env.ssh_config} -J alice@jit-proxy"
    r = env.run(["rsync", "-e", e, str(src), f"{env.login}@web1:{remote}.rsync"])
    assert r.returncode == 0, r.stderr
    r = env.run(["rsync", "-e", e, f"{env.login}@web1:{remote}.rsync", str(tmp_path / "rs_back")])
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "rs_back").read_bytes()).hexdigest() == want
    env.jump("alice", f"rm -f {remote} {remote}.rsync")
    sftp = env.wait_event("ssh.session.end", lambda e: e.get("kind") == "subsystem")
    assert sftp["bytes_up"] > 3 * 1024 * 1024 and sftp["bytes_down"] > 3 * 1024 * 1024


def test_environment_is_passed(env, granted):
    args = env.jump_args("alice")
    r = subprocess.run(args[:1] + ["-o", "SendEnv=JIT_PROBE"] + args[1:] + ["echo $JIT_PROBE"],
                       env={**os.environ, "JIT_PROBE": "hello-env"}, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.stdout == b"hello-env\n", r.stderr


def test_pty_follows_resize_and_is_recorded(env, granted):
    with PtySession(env.jump_args("alice") + ["-tt"], rows=24, cols=80) as s:
        s.send(b"stty size; echo MARK-$((6*7))\n")
        s.expect(b"24 80")
        s.expect(b"MARK-42")
        s.resize(rows=40, cols=132)
        time.sleep(0.3)
        s.send(b"stty size\n")
        s.expect(b"40 132")
        s.send(b"exit 0\n")
        assert s.wait() == 0
    end = env.wait_event("ssh.session.end", lambda e: e.get("recording") is not None)
    path = end["recording"]
    assert re.fullmatch(r"[0-9a-f]{64}", end["recording_sha256"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == end["recording_sha256"]
    header = json.loads(open(path).readline())
    assert header["version"] == 2
    assert header["jit_proxy"]["user"] == "alice"
    assert header["jit_proxy"]["target"] == "web1"
    assert header["jit_proxy"]["login"] == env.login
    assert header["jit_proxy"]["grant"] == granted["id"]
    played = subprocess.run(["asciinema", "cat", path], capture_output=True, timeout=30)
    assert played.returncode == 0, played.stderr
    assert b"MARK-42" in played.stdout and b"40 132" in played.stdout


def test_forwarding_to_anything_but_a_target_is_refused(env, granted):
    for dest, why in ((f"127.0.0.1:{env.target.port}", b"is not a target of this proxy"),
                      ("web1:2200", b"web1 is reached on port 22 through the proxy"),
                      ("example.com:22", b"is not a target of this proxy")):
        r = env.run(["ssh", "-F", str(env.ssh_config), "-W", dest, "alice@jit-proxy"],
                    stdin=subprocess.DEVNULL)
        assert r.returncode == 255
        assert why in r.stderr, r.stderr
    refused = [e for e in env.audit_events("ssh.forward.refused") if "dest_host" in e]
    assert {e["dest_host"] for e in refused} >= {"127.0.0.1", "web1", "example.com"}
    # the audit says what the user was told
    assert any(e["dest_host"] == "web1" and e["why"].startswith("web1 is reached on port 22")
               for e in refused), refused
    # -R on the proxy itself is refused
    r = env.run(["ssh", "-F", str(env.ssh_config), "-o", "ExitOnForwardFailure=yes",
                 "-R", "0:127.0.0.1:9", "alice@jit-proxy", "help"], stdin=subprocess.DEVNULL)
    assert r.returncode == 255


def test_a_forward_when_the_target_cannot_be_reached_fails_that_channel_only(fresh_env):
    """A port forwarding whose target connection failed ends that channel with the reason;
    before, the error escaped as an internal one and closed the client's whole connection."""
    env = fresh_env
    env.grant("alice", target="web2")  # web2's policy allows port forwarding
    env.target.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = env.jump_args("alice", target="web2")
    proc = subprocess.Popen(args[:1] + ["-N", "-L", f"127.0.0.1:{port}:127.0.0.1:9"] + args[1:],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        with connect_when_listening(port) as conn:
            conn.settimeout(10)
            assert conn.recv(100) == b""  # the forwarded channel failed
        time.sleep(0.5)
        assert proc.poll() is None, "the client's connection was closed"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=10)[1]
    assert b"jit-proxy: cannot reach web2" in err, err


def test_local_forwarding_inside_the_target_session_is_refused(env, granted):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = env.jump_args("alice")
    proc = subprocess.Popen(args[:1] + ["-N", "-L", f"127.0.0.1:{port}:127.0.0.1:{env.target.port}"]
                            + args[1:], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        with connect_when_listening(port) as conn:
            conn.settimeout(10)
            assert conn.recv(100) == b""  # closed at once: no SSH banner from the target
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # ssh and its ProxyJump child, which holds stderr
        err = proc.communicate(timeout=10)[1]
    assert b"administratively prohibited" in err
    assert any(e["dest_port"] == env.target.port for e in env.audit_events("ssh.forward.refused")
               if "dest_port" in e and e.get("login") == env.login)


def test_agent_forwarding_is_refused(env, granted, tmp_path):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        args = env.jump_args("alice")
        r = env.run(args[:1] + ["-o", f"ForwardAgent={sock}"] + args[1:] +
                    ["echo agent=[$SSH_AUTH_SOCK]"], stdin=subprocess.DEVNULL)
    finally:
        agent.terminate()
        agent.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"agent=[]\n"


def test_target_saw_a_certificate_naming_user_grant_and_serial(env, granted):
    log = (env.target.directory / "sshd.log").read_text()
    m = re.findall(r"Accepted publickey for (\S+) .*ID jit-proxy user=alice grant=(\d+) "
                   r"request=(\d+) serial=(\d+) \(serial (\d+)\)", log)
    assert m, log[-2000:]
    login, grant, request, serial, serial2 = m[-1]
    assert login == env.login and int(grant) == granted["id"]
    assert int(request) == granted["request_id"] and serial == serial2
    serials = [int(x[3]) for x in m]
    assert len(set(serials)) == len(serials)  # every session got a fresh certificate


def test_a_long_command_is_audited_cut_with_its_hash(env, granted):
    """An exec command is audited whole up to AUDIT_COMMAND_LIMIT characters; a longer one (an
    attack review flooded the audit log with them) is cut there, with the hash of all of it."""
    import hashlib

    command = "true #" + os.urandom(60000).hex()  # 120,006 characters
    r = env.jump("alice", command)
    assert r.returncode == 0, r.stderr
    event = env.wait_event("ssh.session.start", lambda e: (e.get("command") or "")
                           .startswith(command[:100]))
    assert event["command"] == command[:65536] and event["command_truncated"] is True
    assert event["command_sha256"] == hashlib.sha256(command.encode()).hexdigest()


def test_a_login_the_target_refuses_says_what_the_target_needs(env):
    """The target has no account otherlogin: the user is told it is the target's setup, not
    their grant (a newcomer read "Permission denied" as their own mistake)."""
    grant = env.grant("alice", login="otherlogin", duration="10m")
    r = env.jump("alice", "true", login="otherlogin")
    assert env.ssh("alice", f"revoke {grant['id']}").returncode == 0  # (the env is shared)
    assert r.returncode != 0
    assert (b"jit-proxy: cannot reach web1: Permission denied for user otherlogin on host "
            b"127.0.0.1 (the target refused the proxy's certificate for otherlogin: its sshd "
            b"must trust the proxy's user CA") in r.stderr, r.stderr


def test_playing_an_exec_session_says_why_there_is_no_recording(env, granted):
    marker = os.urandom(4).hex()
    assert env.jump("alice", f"echo {marker}").returncode == 0
    start = env.wait_event("ssh.session.start", lambda e: marker in (e.get("command") or ""))
    r = env.ssh("bob", f"recordings play {start['session']}")
    assert r.returncode == 1 and (
        f"no recording for session {start['session']}: only terminal sessions are recorded, and "
        f"this was an exec session; it is in the audit log with its bytes counted").encode() \
        in r.stderr, r.stderr


def test_environment_requests_cannot_grow_the_proxy(env, granted):
    """One session channel sending env requests without end (found by an attack review: 200 MB
    sent grew the proxy 200 MB), on the proxy's own shell and on a jump to a target: past
    MAX_ENV_VARS variables or MAX_ENV_BYTES they are refused, and the sessions still run."""
    import asyncio

    import asyncssh

    flood = {f"JIT_{i}": "x" * 30000 for i in range(1500)}  # 45 MB

    async def scenario() -> tuple[int, int, str, str]:
        outer, inner = await _jump_with_asyncssh(env)
        before = _proxy_rss_kib(env)
        shell = await outer.run("whoami", env=flood)
        jumped = await inner.run("echo through", env=flood)
        peak = _proxy_rss_kib(env)
        inner.close()
        outer.close()
        return before, peak, shell.stdout, jumped.stdout

    before, peak, shell, jumped = asyncio.run(scenario())
    assert "alice" in shell and jumped == "through\n", (shell, jumped)
    assert peak - before < 16 * 1024, f"proxy RSS grew by {(peak - before) // 1024} MiB"


def test_a_client_that_stops_reading_cannot_grow_the_proxy(env, granted):
    """A hostile client announces a huge window, then stops reading its outer channel while the
    target sends 1 GB: the proxy must stop reading from the target, not buffer it."""
    import asyncio

    import asyncssh

    async def scenario() -> tuple[int, int]:
        outer, inner = await _jump_with_asyncssh(env)
        chan, _ = await inner.create_session(asyncssh.SSHClientSession,
                                             "read x; head -c 1000000000 /dev/zero",
                                             window=2**31 - 1)
        await asyncio.sleep(0.5)
        before = _proxy_rss_kib(env)
        inner._transport.pause_reading()  # stop consuming the outer direct-tcpip channel
        chan.write("go\n")
        peak = before
        for _ in range(30):
            await asyncio.sleep(0.2)
            peak = max(peak, _proxy_rss_kib(env))
        outer.close()
        return before, peak

    before, peak = asyncio.run(scenario())
    assert peak - before < 64 * 1024, f"proxy RSS grew by {(peak - before) // 1024} MiB"


def test_a_client_that_stops_reading_its_socket_cannot_grow_the_proxy(env, granted):
    """As above, but the client announces a huge window on its outer channel too and stops
    reading the TCP socket itself: asyncssh ignores its transport's pause_writing, so the
    proxy must stop reading from the target while the client's socket is backed up (before,
    it buffered 950 MiB in 6 s), and carry on once it drains: every byte arrives."""
    import asyncio

    import asyncssh

    size = 300_000_000

    class Counting(asyncssh.SSHClientSession):
        received = 0

        def data_received(self, data, datatype):
            Counting.received += len(data)

    async def scenario() -> tuple[int, int]:
        outer, inner = await _jump_with_asyncssh(env, window=2**31 - 1)
        chan, _ = await inner.create_session(Counting, f"read x; head -c {size} /dev/zero",
                                             window=2**31 - 1)
        await asyncio.sleep(0.5)
        before = _proxy_rss_kib(env)
        outer._transport.pause_reading()  # the socket: nothing more is read from the proxy
        chan.write("go\n")
        peak = before
        for _ in range(25):
            await asyncio.sleep(0.2)
            peak = max(peak, _proxy_rss_kib(env))
        outer._transport.resume_reading()
        await asyncio.wait_for(chan.wait_closed(), 60)
        outer.close()
        return before, peak

    before, peak = asyncio.run(scenario())
    assert peak - before < 64 * 1024, f"proxy RSS grew by {(peak - before) // 1024} MiB"
    assert Counting.received == size


def test_a_forwarding_whose_client_stops_reading_its_channel_cannot_grow_the_proxy(fresh_env):
    """A port forwarding (asyncssh bridges it, not the proxy's sessions) to a server that
    sends 300 MB, while the client keeps reading its socket but stops taking data from the
    outer channel (no window adjusts) and announces a huge window on the forward: the proxy
    must stop reading from the target, as it does for sessions (before, it buffered 1 GiB in
    6 s), and carry on once the client reads again: every byte arrives."""
    import asyncio
    import socketserver
    import threading

    import asyncssh

    size = 300 << 20

    class Blast(socketserver.BaseRequestHandler):
        def handle(self):
            chunk = bytes(1 << 20)
            try:
                for _ in range(size >> 20):
                    self.request.sendall(chunk)
            except OSError:
                pass

    class Counting(asyncssh.SSHTCPSession):
        received = 0

        def data_received(self, data, datatype):
            Counting.received += len(data)

    env = fresh_env
    env.grant("alice", target="web2")  # its policy allows port forwarding
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Blast)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def scenario() -> tuple[int, int]:
        outer, inner = await _jump_with_asyncssh(env, target="web2")
        await asyncio.sleep(0.3)
        before = _proxy_rss_kib(env)
        chan, _ = await inner.create_connection(Counting, "127.0.0.1", server.server_address[1],
                                                window=2**31 - 1)
        await asyncio.sleep(0.05)
        inner._transport.pause_reading()  # the outer channel: nothing taken, no window adjust
        peak = before
        for _ in range(25):
            await asyncio.sleep(0.2)
            peak = max(peak, _proxy_rss_kib(env))
        inner._transport.resume_reading()
        deadline = asyncio.get_running_loop().time() + 60
        while Counting.received < size and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        outer.close()
        return before, peak

    try:
        before, peak = asyncio.run(scenario())
    finally:
        server.shutdown()
    assert peak - before < 64 * 1024, f"proxy RSS grew by {(peak - before) // 1024} MiB"
    assert Counting.received == size


def test_local_forwarding_when_the_policy_allows_it_and_revoke_ends_it(env):
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(4096):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    grant = env.grant("alice", target="web2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
    args = env.jump_args("alice", target="web2")
    proc = subprocess.Popen(args[:1] + ["-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                        f"127.0.0.1:{lport}:127.0.0.1:{server.server_address[1]}"]
                            + args[1:], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        with connect_when_listening(lport) as conn:
            conn.sendall(b"ping through the proxy")
            assert conn.recv(100) == b"ping through the proxy"
        assert env.wait_event("ssh.forward.opened", lambda e: e["target"] == "web2")
        assert env.ssh("alice", f"revoke {grant['id']}").returncode == 0
        proc.wait(timeout=10)  # the whole jump connection ends with the grant
        try:
            c2 = socket.create_connection(("127.0.0.1", lport), timeout=2)
            c2.close()
            raise AssertionError("the forward outlived the revoke")
        except OSError:
            pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        server.shutdown()


def test_a_certificate_that_cannot_be_minted_fails_the_jump_and_is_audited(fresh_env):
    """The store cannot record a certificate's serial (here its database stays locked past its
    busy timeout). For the proxy's host certificate (the first ``ssh -J`` to a target) that
    channel fails with the reason, audited as ssh.session.refused; before, the client's whole
    connection closed with nothing said or audited. For the certificate the proxy logs in to
    the target with, the user is told the target cannot be reached and why, audited as
    ssh.upstream.failed; before, that was audited only for errors of the connection itself."""
    env = fresh_env
    grant = env.grant("alice")

    def jump_while_the_store_is_locked() -> subprocess.CompletedProcess:
        with env.store_locked():
            return env.jump("alice", "true")

    r = jump_while_the_store_is_locked()
    assert r.returncode == 255
    assert b"jit-proxy: cannot open a session to web1: database is locked" in r.stderr, r.stderr
    refused = env.wait_event("ssh.session.refused", lambda e: e.get("target") == "web1")
    assert refused["why"] == ("the proxy could not mint its host certificate for web1: "
                              "database is locked")
    assert env.jump("alice", "echo back").stdout == b"back\n"  # (the host certificate is kept)
    r = jump_while_the_store_is_locked()
    assert r.returncode == 255
    assert b"jit-proxy: cannot reach web1: database is locked" in r.stderr, r.stderr
    failed = env.wait_event("ssh.upstream.failed", lambda e: e.get("grant") == grant["id"])
    assert failed["error"] == "database is locked" and failed["login"] == env.login
    assert env.jump("alice", "echo again").stdout == b"again\n"


def test_a_first_use_window_starts_only_once_the_target_is_reached(fresh_env):
    """window_starts: first_use. An ssh -J while the target is down fails and leaves the window
    unstarted (before, that attempt started it: the user lost the time the target was down);
    the first login that reaches the target starts it, and the certificate ends with it."""
    env = fresh_env
    config = env.config()
    config["policies"][1]["window_starts"] = "first_use"
    env.reload(config)
    grant = env.grant("alice", duration="10m")
    assert grant["awaiting_first_use"] is True
    env.target.stop()
    r = env.jump("alice", "true")
    assert r.returncode == 255 and b"jit-proxy: cannot reach web1" in r.stderr, r.stderr
    assert env.json("alice", "grants")[0]["awaiting_first_use"] is True
    assert not env.audit_events("access.grant.started")
    env.target.start()
    before = time.time()
    r = env.jump("alice", "echo reached")
    assert r.returncode == 0 and r.stdout == b"reached\n", r.stderr
    started = env.wait_event("access.grant.started", lambda e: e["grant"] == grant["id"])
    (now,) = env.json("alice", "grants")
    assert now["awaiting_first_use"] is False
    ends = datetime.fromisoformat(now["ends_at"].replace("Z", "+00:00")).timestamp()
    assert before - 1 < ends - 600 < time.time() + 1
    issued = [e for e in env.audit_events("ca.certificate.issued") if e.get("grant") == grant["id"]]
    assert len(issued) == 1  # and valid until the window's end (to the second)
    assert issued[0]["valid_before"][:19] == started["ends_at"][:19], (issued, started)
