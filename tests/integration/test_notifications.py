"""Approvers are told about new requests: a webhook (retried when down) and requests --watch."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import subprocess
import threading
import time

import asyncssh


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_receives_requests_and_retries_while_down(fresh_env):
    env = fresh_env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = env.config()
    config["notifications"] = {"webhook_url": f"http://127.0.0.1:{port}/hook",
                               "webhook_timeout": 2}
    env.write_config(config)
    env.restart()
    # down: the request still succeeds at once, and delivery is retried
    t0 = time.monotonic()
    first = env.json("alice", f"request web1 --login {env.login} --for 10m --reason while-down")
    assert time.monotonic() - t0 < 5
    env.wait_event("notify.webhook.failed", lambda e: e["request"] == first["id"]
                   and e["attempt"] == 2, timeout=15)
    _Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        delivered = env.wait_event("notify.webhook.delivered",
                                   lambda e: e["request"] == first["id"], timeout=30)
        assert delivered["attempt"] >= 3
        second = env.json("alice", f"request web1 --login {env.login} --for 10m --reason up")
        env.wait_event("notify.webhook.delivered", lambda e: e["request"] == second["id"])
        ids = [m["request"]["id"] for m in _Hook.received]
        assert ids.count(first["id"]) == 1 and ids.count(second["id"]) == 1
        assert _Hook.received[-1]["request"]["reason"] == "up"
    finally:
        server.shutdown()


def test_requests_watch_streams_new_pending_requests(env):
    """Also with stdin at its end (``ssh -n``, cron, a background job): only the client going
    away ends the watch."""
    watch = subprocess.Popen(["ssh", "-n", "-F", str(env.ssh_config), "bob@jit-proxy",
                              "requests --pending --watch"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # bob is watching
        req = env.json("alice", f"request web1 --login {env.login} --for 10m --reason watched")
        line = ""
        deadline = time.monotonic() + 10
        while f"new request {req['id']}" not in line:
            assert time.monotonic() < deadline, "no line for the new request"
            line = watch.stdout.readline()
            assert line or watch.poll() is None, f"the watch ended: {watch.stderr.read()}"
        assert "alice asks for" in line and "watched" in line
        assert watch.poll() is None
    finally:
        watch.terminate()  # Ctrl-C: the client goes away
        watch.wait(timeout=10)
    sessions = env.json("bob", "requests --pending")  # the proxy carries on
    assert any(r["id"] == req["id"] for r in sessions)
    # typed at a terminal, Ctrl-D ends it: with a pty (-tt) and without (ssh's default for a
    # command, where it is an EOF like ssh -n's, but not at once)
    from tests.integration.ptyrun import PtySession
    for tty in (["-tt"], []):
        with PtySession(["ssh", *tty, "-F", str(env.ssh_config), "bob@jit-proxy",
                         "requests --pending --watch"]) as s:
            s.expect(b"watched")
            time.sleep(1.2)  # (NO_INPUT_EOF)
            if tty:  # a resize is no end
                s.resize(30, 100)
                time.sleep(0.5)
                assert not s._exited(), "a resize ended the watch"
            s.send(b"\x04")
            assert s.wait(10) == 0, tty


def test_command_sessions_on_one_connection_are_bounded(env):
    """ssh.max_sessions_per_connection holds for the proxy's own command sessions too (each
    requests --watch holds one): one connection cannot open them without end."""
    async def run() -> tuple[list[int], str]:
        async with asyncssh.connect("127.0.0.1", env.port, username="bob", known_hosts=None,
                                    client_keys=[str(env.keys / "bob")], agent_path=None,
                                    config=None) as conn:
            watches = [await conn.create_process("requests --pending --watch") for _ in range(10)]
            for w in watches:  # each is running (its list came)
                await asyncio.wait_for(w.stdout.readline(), 10)
            extra = await asyncio.wait_for(conn.run("whoami", check=False), 10)
            for w in watches:
                w.close()
            await asyncio.sleep(0.3)
            after = await asyncio.wait_for(conn.run("whoami", check=False), 10)
            return [extra.exit_status, after.exit_status], extra.stderr
    statuses, err = asyncio.run(run())
    assert statuses == [1, 0], (statuses, err)  # the 11th refused; once they end, in again
    assert "at most 10 sessions at once on one connection" in err
    assert env.wait_event("ssh.session.refused", lambda e: e["actor"] == "bob"
                          and "sessions on one connection" in e["why"])
