"""Shared fixtures: a real OpenSSH sshd target and a real ``jit-proxy serve`` process on 127.0.0.1.

What it is for: giving integration tests an ``Env`` that runs stock ``ssh``/``scp``/``sftp``/``rsync``
through a real proxy process to a real sshd, with helpers to request and approve grants, restart or
kill the proxy, and read the audit log.
What it must not do: touch the machine's own ~/.ssh or listen beyond 127.0.0.1; as root it creates
one test account (``jittest``) once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncssh
import pytest

from ca import SSHCertificateAuthority
from ca.keys import write_private_key
from proxy.config import load_config
from proxy.runtime.service import known_hosts_patterns
from proxy.runtime.sandbox import TargetSSHD, client_files, ensure_login, find_sshd

USERS = ("alice", "bob", "carol")
TEST_LOGIN_AS_ROOT = "jittest"


def _ssh_available() -> bool:
    try:
        find_sshd(install=False)
    except RuntimeError:
        return False
    return shutil.which("ssh") is not None


requires_openssh = pytest.mark.skipif(not _ssh_available() and not os.environ.get("CI"),
                                      reason="OpenSSH client/server not installed")


class PgCluster:
    """A throwaway PostgreSQL cluster with TLS (its own CA), an owner role, an application role,
    and two databases: ``orders`` (table ``items``, 3 rows) and ``other`` (table ``notes``)."""

    SUPERUSER_PASSWORD = "jit-test-superuser"

    def __init__(self):
        import tempfile
        from ca.x509 import X509CertificateAuthority
        from proxy.runtime.sandbox import TargetPostgres
        self.root = Path(tempfile.mkdtemp(prefix="jit-pg-"))
        os.chmod(self.root, 0o711)  # the postgres account must reach its data directory
        self.ca = X509CertificateAuthority.open(self.root / "ca", time.time(), name="upstream CA")
        self.ca_file = self.root / "upstream-ca.pem"
        self.ca_file.write_bytes(self.ca.certificate_pem)
        cert = self.ca.issue_server_certificate(["127.0.0.1", "localhost"], now=time.time(),
                                                validity=86400)
        self.server = TargetPostgres(self.root / "pg", cert.chain_pem, cert.key_pem,
                                     superuser_password=self.SUPERUSER_PASSWORD)
        self.server.start()
        self.port = self.server.port
        self.admin_password_file = self.root / "admin.password"
        self.admin_password_file.write_text(self.SUPERUSER_PASSWORD + "\n")
        os.chmod(self.admin_password_file, 0o600)
        self.sql("postgres", "CREATE ROLE app_owner NOLOGIN; CREATE ROLE app_writer NOLOGIN;"
                             " CREATE ROLE app_reader NOLOGIN")
        self.sql("postgres", "CREATE DATABASE orders OWNER app_owner")
        self.sql("postgres", "CREATE DATABASE other")
        self.sql("orders", """
            CREATE TABLE items (id int PRIMARY KEY, name text);
            INSERT INTO items VALUES (1, 'disk'), (2, 'cpu'), (3, NULL);
            ALTER TABLE items OWNER TO app_owner;
            GRANT SELECT, INSERT, UPDATE, DELETE ON items TO app_writer;
            GRANT SELECT ON items TO app_reader;
            GRANT CREATE, USAGE ON SCHEMA public TO app_writer;
        """)
        self.sql("other", "CREATE TABLE notes (id int); INSERT INTO notes VALUES (42);")

    def dsn(self, database: str = "postgres") -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres",
                "password": self.SUPERUSER_PASSWORD, "database": database}

    def sql(self, database: str, statements: str, fetch: bool = False, role: str | None = None):
        """Run ``statements`` as the superuser (``SET ROLE role`` first, if given); ``fetch``:
        one query, whose rows are returned."""
        import asyncio
        import asyncpg

        async def run():
            conn = await asyncpg.connect(**self.dsn(database), ssl=False)
            try:
                if role is not None:
                    await conn.execute(f'SET ROLE "{role}"')
                return await (conn.fetch(statements) if fetch else conn.execute(statements))
            finally:
                await conn.close()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run())
        import concurrent.futures  # called from a test's own event loop: run beside it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Env:
    """One proxy process, one sshd target, three users (alice, carol: dev; bob: sre approver),
    and with ``pg`` a PostgreSQL target ``orders`` (roles read and write) behind the proxy's
    PostgreSQL port."""

    def __init__(self, root: Path, login: str, pg: PgCluster | None = None):
        self.root = root
        self.login = login
        self.pg = pg
        self.pg_port = 0
        # every proxy sharing the cluster gets its own role prefix, so that one's reconciliation
        # never drops another's roles
        self.role_prefix = f"j{os.urandom(3).hex()}_"
        self.keys = root / "keys"
        self.keys.mkdir(parents=True, mode=0o700)
        self.pub = {}
        for u in USERS:
            write_private_key(self.keys / u, asyncssh.generate_private_key("ssh-ed25519"))
            self.pub[u] = (self.keys / f"{u}.pub").read_text().strip()
        self.state = root / "state"
        self.ca = SSHCertificateAuthority.open(self.state / "ca")
        self.target = TargetSSHD(root / "target", user_ca=self.ca.user_ca_public)
        self.target_host_key = self.target.prepare()
        self.target.start()
        self.config_path = root / "jit-proxy.yaml"
        self.write_config()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = root / "proxy.log"
        self.extra_env: dict[str, str] = {}  # e.g. pam_wrapper's variables for the proxy process

    # --- configuration -------------------------------------------------------------------------

    def config(self) -> dict:
        """The proxy's configuration as data (tests may change it, then ``write_config``)."""
        ssh_target = {"address": "127.0.0.1", "port": self.target.port,
                      "host_key": self.target_host_key}
        config: dict = {
            "state_dir": str(self.state),
            "ssh": {"listen_address": "127.0.0.1", "listen_port": 0, "host_names": ["jit-proxy"]},
            "users": {u: {"keys": [self.pub[u]]} for u in USERS},
            "groups": {"dev": {"members": ["alice", "carol"]}, "sre": {"members": ["bob"]}},
            # the tests fail logins on purpose, all from 127.0.0.1
            "auth": {"max_failures": 1000, "max_failures_per_address": 1000},
            "targets": {"web1": dict(ssh_target), "web2": dict(ssh_target)},
            "policies": [{"name": "web2-forwarding", "targets": ["web2"], "logins": [self.login],
                          "requesters": ["group:dev"], "approvers": ["group:sre"],
                          "max_duration": "4h", "allow": {"port_forwarding": True}},
                         {"name": "web", "targets": ["web1", "web2"],
                          "logins": [self.login, "otherlogin"], "requesters": ["group:dev"],
                          "approvers": ["group:sre"], "max_duration": "4h"}],
        }
        if self.pg is not None:
            pg = self.pg
            config["postgres"] = {"listen_address": "127.0.0.1", "listen_port": 0,
                                  "host_names": ["127.0.0.1", "localhost"],
                                  "role_prefix": self.role_prefix}
            config["targets"]["orders"] = {
                "kind": "postgres", "address": "127.0.0.1", "port": pg.port,
                "database": "orders",
                "admin": {"user": "postgres", "password_file": str(pg.admin_password_file)},
                "roles": {"read": ["app_reader"], "write": ["app_writer"]},
                "owner": "app_owner",
                "tls": {"mode": "verify-full", "ca_file": str(pg.ca_file)}}
            config["policies"].append({"name": "db", "targets": ["orders"],
                                       "roles": ["read", "write"], "requesters": ["group:dev"],
                                       "approvers": ["group:sre"], "max_duration": "1h"})
        return config

    def write_config(self, config: dict | None = None) -> None:
        import yaml
        self.config_path.write_text(yaml.safe_dump(config or self.config(), sort_keys=False))

    # --- the proxy process ---------------------------------------------------------------------

    def start(self) -> None:
        log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "-c", str(self.config_path)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, **self.extra_env})
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = re.search(r"listening for SSH on 127\.0\.0\.1:(\d+)", text)
            pg = re.search(r"listening for PostgreSQL on 127\.0\.0\.1:(\d+)", text)
            if m and (self.pg is None or pg):
                self.pg_port = int(pg.group(1)) if pg else 0
                self.port = int(m.group(1))
                self.ssh_config = client_files(self.root, self.port, self.known_hosts_line(),
                                               list(USERS), self.keys)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        raise RuntimeError("proxy did not start: " + self.log_path.read_text())

    def known_hosts_line(self) -> str:
        config = load_config(self.config_path)
        return self.ca.known_hosts_line(",".join(known_hosts_patterns(config, self.port)))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self, config: dict) -> None:
        """Write ``config`` and SIGHUP the proxy; returns once it has applied it."""
        seen = {e["hash"] for e in self.audit_events("proxy.reloaded")}
        self.write_config(config)
        self.proc.send_signal(signal.SIGHUP)
        self.wait_event("proxy.reloaded", lambda e: e["hash"] not in seen)

    def close(self) -> None:
        self.stop()
        self.target.stop()

    # --- clients --------------------------------------------------------------------------------

    def run(self, args: list[str], *, input: bytes | None = None, timeout: float = 60,
            stdin=None) -> subprocess.CompletedProcess:
        return subprocess.run(args, input=input, capture_output=True, timeout=timeout,
                              stdin=stdin if input is None else None)

    def ssh(self, user: str, command: str, **kw) -> subprocess.CompletedProcess:
        """``ssh -F CONFIG USER@jit-proxy COMMAND`` (the proxy's command shell)."""
        return self.run(["ssh", "-F", str(self.ssh_config), f"{user}@jit-proxy", command],
                        stdin=subprocess.DEVNULL, **kw)

    def jump_args(self, user: str, login: str | None = None, target: str = "web1") -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-J", f"{user}@jit-proxy",
                f"{login or self.login}@{target}"]

    def jump(self, user: str, command: str, login: str | None = None, target: str = "web1",
             **kw) -> subprocess.CompletedProcess:
        """``ssh -F CONFIG -J USER@jit-proxy LOGIN@TARGET COMMAND``."""
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        return self.run(self.jump_args(user, login, target) + [command], **kw)

    def json(self, user: str, command: str):
        r = self.ssh(user, command + " --json")
        assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
        return json.loads(r.stdout)

    def grant(self, user: str = "alice", login: str | None = None, target: str = "web1",
              duration: str = "1h") -> dict:
        """Request as ``user`` and approve as bob; returns the grant (JSON)."""
        req = self.json(user, f"request {target} --login {login or self.login} --for {duration}"
                              f" --reason 'test: {target}'")
        return self.json("bob", f"approve {req['id']} --comment ok")

    def wait_event(self, type_prefix: str, pred=lambda e: True, timeout: float = 10) -> dict:
        """The newest audit event of that type matching ``pred``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.audit_events(type_prefix) if pred(e)]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {type_prefix} event matching; last events: "
                                     f"{self.audit_events()[-5:]}")
            time.sleep(0.05)

    @contextlib.contextmanager
    def store_locked(self):
        """The proxy's SQLite database held locked (an exclusive transaction of the test's) for
        the block: each of the proxy's writes meanwhile fails after its busy timeout (5 s)."""
        db = sqlite3.connect(self.state / "jit-proxy.db", timeout=10)
        try:
            db.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            db.rollback()
            db.close()

    def audit_events(self, type_prefix: str = "") -> list[dict]:
        path = self.state / "audit.jsonl"
        events = [json.loads(line) for line in path.read_text().splitlines()]
        return [e for e in events if e["type"].startswith(type_prefix)]


@pytest.fixture(scope="session")
def test_login() -> str:
    return ensure_login(TEST_LOGIN_AS_ROOT)


@pytest.fixture(scope="module")
def env(tmp_path_factory, test_login):
    """A running proxy shared by the tests of one module."""
    e = Env(tmp_path_factory.mktemp("jit"), test_login)
    e.start()
    yield e
    e.close()


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the whole run (initdb costs seconds)."""
    cluster = PgCluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def pg_env(tmp_path_factory, test_login, pg_cluster):
    """A running proxy with the PostgreSQL target ``orders``, shared by one module."""
    e = Env(tmp_path_factory.mktemp("jitpg"), test_login, pg_cluster)
    e.start()
    yield e
    e.close()


@pytest.fixture
def fresh_pg_env(tmp_path, test_login, pg_cluster):
    e = Env(tmp_path, test_login, pg_cluster)
    e.start()
    yield e
    e.close()


@pytest.fixture
def fresh_env(tmp_path, test_login):
    """A running proxy of the test's own (for restarts, kills and expiry)."""
    e = Env(tmp_path, test_login)
    e.start()
    yield e
    e.close()
