"""The bench's peers on 127.0.0.1, started and stopped in one place.

What it is for: keys and the proxy's CA; an OpenSSH sshd as the target; a second sshd as a plain
OpenSSH jump host; optionally a PostgreSQL cluster (``TargetPostgres``, initdb/pg_ctl as the
``postgres`` account when root) with a pgbench database and pgbouncer (Debian's package, session
pooling, run as ``postgres`` when root) in front of it; and one jit-proxy process
(``python -m bench.proxyd serve``, recording on) configured with users for every measurement:
alice (auto-approved SSH and database grants), carol (needs bob's approval) and storm users
``s0000``… (auto-approved, for the expiry storm). ``ssh_config`` makes stock ``ssh`` reach each
path by name: ``jit-proxy`` (-J), ``openssh-jump`` (-J) and ``direct-target``.

What it must not do: listen beyond 127.0.0.1, touch the user's own ~/.ssh, or leave a process behind
(``close`` stops everything it started, also after a failure half-way).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import asyncssh
import yaml

from ca import SSHCertificateAuthority, UserCertificateSpec
from ca.keys import write_private_key
from proxy.config import load_config
from proxy.runtime.sandbox import (TargetPostgres, TargetSSHD, _postgres_bindir, apt_install,
                                   client_files, free_port)
from proxy.runtime.service import known_hosts_patterns

PG_DB = "bench"           # the database pgbench runs in, and the proxy's target name for it
PG_USER = "bench_user"    # the login direct and pgbouncer connections use
PG_PASSWORD = "bench-password-not-secret"
ADMIN_PASSWORD = "bench-superuser-not-secret"
SSHD_SCALE = "MaxStartups 2000:30:4000\nMaxSessions 100\n"


def require_tools(pg: bool) -> None:
    """Make sure the programs the bench runs exist; install them with apt-get as root, otherwise
    raise RuntimeError naming what is missing."""
    need = {"ssh": "openssh-client"}
    if pg:
        need.update({"pgbench": "postgresql-contrib", "psql": "postgresql-client",
                     "pgbouncer": "pgbouncer"})
    missing = {prog: pkg for prog, pkg in need.items()
               if not shutil.which(prog) and not Path(f"/usr/sbin/{prog}").exists()}
    if pg:
        try:
            _postgres_bindir()
        except RuntimeError:
            missing["initdb"] = "postgresql"
    if missing and apt_install(*sorted(set(missing.values()))):
        return require_tools(pg)
    if missing:
        raise RuntimeError("missing: " + ", ".join(f"{p} (Debian package {k})"
                                                      for p, k in missing.items())
                           + "; install them, or run the bench as root to have them installed")


def pgbouncer_path() -> str:
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgPeers:
    """The PostgreSQL cluster (TLS on, pgbench tables) and pgbouncer in front of it."""

    def __init__(self, d: Path, scale: int, max_connections: int):
        from ca.x509 import X509CertificateAuthority
        self.d = d
        d.mkdir(mode=0o711)
        self.ca = X509CertificateAuthority.open(d / "ca", time.time(), name="bench PostgreSQL CA")
        self.ca_file = d / "upstream-ca.pem"
        self.ca_file.write_bytes(self.ca.certificate_pem)
        cert = self.ca.issue_server_certificate(["127.0.0.1", "localhost"], now=time.time(),
                                                validity=86400)
        self.cert = cert
        self.admin_password_file = d / "admin.password"
        self.admin_password_file.write_text(ADMIN_PASSWORD + "\n")
        os.chmod(self.admin_password_file, 0o600)
        self.server = TargetPostgres(d / "pg", cert.chain_pem, cert.key_pem,
                                     superuser_password=ADMIN_PASSWORD,
                                     settings={"max_connections": max_connections,
                                               "shared_buffers": "256MB"})
        self.scale = scale
        self.bouncer: subprocess.Popen | None = None
        self.bouncer_port = 0

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()
        self.sql("postgres", f"CREATE ROLE bench_owner NOLOGIN; CREATE ROLE bench_reader NOLOGIN;"
                             f" CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'"
                             f" IN ROLE bench_reader")
        self.sql("postgres", f"CREATE DATABASE {PG_DB} OWNER bench_owner")
        env = {**os.environ, "PGPASSWORD": ADMIN_PASSWORD}
        subprocess.run(["pgbench", "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1", "-p",
                        str(self.port), "-U", "postgres", PG_DB], check=True, env=env,
                       capture_output=True)
        self.sql(PG_DB, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench_reader;"
                        "GRANT CONNECT ON DATABASE bench TO bench_reader")
        self._start_bouncer()

    def _start_bouncer(self) -> None:
        b = self.d / "pgbouncer"
        b.mkdir(mode=0o700)
        (b / "server.crt").write_bytes(self.cert.chain_pem)
        (b / "server.key").write_bytes(self.cert.key_pem)
        shutil.copy(self.ca_file, b / "ca.pem")
        (b / "userlist.txt").write_text(f'"{PG_USER}" "{PG_PASSWORD}"\n')
        self.bouncer_port = free_port()
        (b / "pgbouncer.ini").write_text(textwrap.dedent(f"""\
            [databases]
            {PG_DB} = host=127.0.0.1 port={self.port} dbname={PG_DB}
            [pgbouncer]
            listen_addr = 127.0.0.1
            listen_port = {self.bouncer_port}
            unix_socket_dir =
            auth_type = scram-sha-256
            auth_file = {b / 'userlist.txt'}
            pool_mode = session
            max_client_conn = 2000
            default_pool_size = 600
            client_tls_sslmode = require
            client_tls_cert_file = {b / 'server.crt'}
            client_tls_key_file = {b / 'server.key'}
            server_tls_sslmode = verify-full
            server_tls_ca_file = {b / 'ca.pem'}
            logfile = {b / 'pgbouncer.log'}
            log_connections = 0
            log_disconnections = 0
            """))
        owner = []
        if os.geteuid() == 0:
            for p in [b, *b.iterdir()]:
                shutil.chown(p, "postgres", "postgres")
            owner = ["runuser", "-u", "postgres", "--"]
        for p in b.glob("*"):
            os.chmod(p, 0o600)
        self.bouncer = subprocess.Popen(owner + [pgbouncer_path(), str(b / "pgbouncer.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.bouncer_port, self.bouncer, b / "pgbouncer.log")

    def sql(self, database: str, statements: str, fetch: bool = False):
        import asyncpg

        async def run():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                         password=ADMIN_PASSWORD, database=database, ssl=False)
            try:
                return await (conn.fetch(statements) if fetch else conn.execute(statements))
            finally:
                await conn.close()
        return asyncio.run(run())

    def stop(self) -> None:
        if self.bouncer is not None:
            try:
                os.killpg(self.bouncer.pid, signal.SIGTERM)
                self.bouncer.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.bouncer.pid, signal.SIGKILL)
            self.bouncer = None
        self.server.stop()


def wait_port(port: int, proc: subprocess.Popen | None = None, log: Path | None = None,
              timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[-2:]} exited {proc.returncode}: {text}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class BenchEnv:
    """Everything the measurements run against; ``close`` stops it all."""

    def __init__(self, d: Path, login: str, *, pg: bool, storm_users: int, pg_scale: int = 10,
                 pg_max_connections: int = 1400):
        self.d, self.login = d, login
        self.keys = d / "keys"
        self.keys.mkdir(mode=0o700)
        write_private_key(self.keys / "alice", asyncssh.generate_private_key("ssh-ed25519"))
        self.alice_pub = (self.keys / "alice.pub").read_text().strip()
        for u in ("bob", "carol"):
            write_private_key(self.keys / u, asyncssh.generate_private_key("ssh-ed25519"))
        self.storm_users = [f"s{i:04d}" for i in range(storm_users)]
        # a key each (one key under two user names is refused): in memory only
        self.storm_keys = {u: asyncssh.generate_private_key("ssh-ed25519")
                           for u in self.storm_users}
        self.ca = SSHCertificateAuthority.open(d / "state" / "ca")
        # a certificate for the anchors' paths (the target trusts only the CA)
        key = asyncssh.import_private_key((self.keys / "alice").read_bytes())
        now = int(time.time())
        cert = self.ca.issue_user_certificate(key, UserCertificateSpec(
            serial=1, key_id="bench", principal=login, valid_after=now - 60,
            valid_before=now + 86400, permit_port_forwarding=True))
        (self.keys / "alice-cert.pub").write_bytes(cert.export_certificate())
        self.target = TargetSSHD(d / "target", user_ca=self.ca.user_ca_public)
        self.target_host_key = self.target.prepare()
        _append(d / "target" / "sshd_config", SSHD_SCALE)
        self.jump = TargetSSHD(d / "jump", user_ca=self.ca.user_ca_public)
        self.jump.prepare()
        _append(d / "jump" / "sshd_config", "AllowTcpForwarding yes\n" + SSHD_SCALE)
        self.pg = PgPeers(d / "pgpeers", pg_scale, pg_max_connections) if pg else None
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None  # py-spy output for the proxy (``--profile``)
        self.profiles: list[str] = []  # the files written, one per proxy process
        self._spy: subprocess.Popen | None = None
        self.port = self.pg_port = 0
        self.log_path = d / "proxy.log"

    def config(self) -> dict:
        users = {"alice": {"keys": [self.alice_pub]},
                 "bob": {"keys": [(self.keys / "bob.pub").read_text().strip()]},
                 "carol": {"keys": [(self.keys / "carol.pub").read_text().strip()]}}
        users.update({u: {"keys": [k.export_public_key().decode().strip()]}
                      for u, k in self.storm_keys.items()})
        config: dict = {
            "state_dir": str(self.d / "state"),
            "ssh": {"listen_address": "127.0.0.1", "listen_port": free_port(),
                    "host_names": ["jit-proxy"], "max_unauthenticated": 5000,
                    "max_unauthenticated_per_address": 5000},
            "auth": {"max_failures": 1000, "max_failures_per_address": 100000},
            "users": users,
            "groups": {"storm": {"members": self.storm_users or ["alice"]}},
            "targets": {"web1": {"address": "127.0.0.1", "port": self.target.port,
                                 "host_key": self.target_host_key}},
            "policies": [
                {"name": "bench", "targets": ["web1"], "logins": [self.login],
                 "requesters": ["alice"], "approvers": ["bob"], "max_duration": "1d",
                 "auto_approve": {"requesters": ["alice"]}},
                {"name": "manual", "targets": ["web1"], "logins": [self.login],
                 "requesters": ["carol"], "approvers": ["bob"], "max_duration": "1d"},
                {"name": "storm", "targets": ["web1"], "logins": [self.login],
                 "requesters": ["group:storm"], "approvers": ["bob"], "max_duration": "1d",
                 "auto_approve": {"requesters": ["group:storm"]}}],
        }
        if self.pg is not None:
            config["postgres"] = {"listen_address": "127.0.0.1", "listen_port": free_port(),
                                  "host_names": ["127.0.0.1", "localhost"]}
            config["targets"][PG_DB] = {
                "kind": "postgres", "address": "127.0.0.1", "port": self.pg.port,
                "database": PG_DB,
                "admin": {"user": "postgres", "password_file": str(self.pg.admin_password_file)},
                "roles": {"read": ["bench_reader"]}, "owner": "bench_owner",
                "tls": {"mode": "verify-full", "ca_file": str(self.pg.ca_file)}}
            config["policies"] += [
                {"name": "bench-db", "targets": [PG_DB], "roles": ["read"],
                 "requesters": ["alice"], "approvers": ["bob"], "max_duration": "1d",
                 "auto_approve": {"requesters": ["alice"]}},
                {"name": "manual-db", "targets": [PG_DB], "roles": ["read"],
                 "requesters": ["carol"], "approvers": ["bob"], "max_duration": "1d"},
                {"name": "storm-db", "targets": [PG_DB], "roles": ["read"],
                 "requesters": ["group:storm"], "approvers": ["bob"], "max_duration": "1d",
                 "auto_approve": {"requesters": ["group:storm"]}}]
        return config

    def start(self) -> None:
        self.target.start()
        self.jump.start()
        if self.pg is not None:
            self.pg.start()
        config = self.config()
        (self.d / "jit-proxy.yaml").write_text(yaml.safe_dump(config))
        self.port = config["ssh"]["listen_port"]
        self.pg_port = config.get("postgres", {}).get("listen_port", 0)
        self.start_proxy()
        kh = self.ca.known_hosts_line(",".join(known_hosts_patterns(
            load_config(self.d / "jit-proxy.yaml"), self.port)))
        self.ssh_config = client_files(self.d, self.port, kh, ["alice", "bob", "carol"],
                                       self.keys)
        jump_key = (self.d / "jump" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        target_key = self.target_host_key.split()[:2]
        with open(self.d / "known_hosts", "a") as f:
            f.write(f"[127.0.0.1]:{self.jump.port} {' '.join(jump_key)}\n")
            f.write(f"[127.0.0.1]:{self.target.port} {' '.join(target_key)}\n")
        with open(self.ssh_config, "a") as f:
            f.write(textwrap.dedent(f"""\
                Host openssh-jump
                  HostName 127.0.0.1
                  Port {self.jump.port}
                  User {self.login}
                  IdentityFile {self.keys / 'alice'}
                  CertificateFile {self.keys / 'alice-cert.pub'}
                Host direct-target
                  HostName 127.0.0.1
                  Port {self.target.port}
                  IdentityFile {self.keys / 'alice'}
                  CertificateFile {self.keys / 'alice-cert.pub'}
                """))
        self.ssh_ok("alice", f"request web1 --login {self.login} --for 1d --reason bench")
        if self.pg is not None:
            self.ssh_ok("alice", f"request {PG_DB} --role read --for 1d --reason bench")
            (self.d / "jit-ca.pem").write_bytes(
                subprocess.run(self.ssh_cmd("alice", "ca --pg"), capture_output=True,
                               check=True, timeout=30).stdout)

    def start_proxy(self) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.proxyd", "serve", "-c",
                                      str(self.d / "jit-proxy.yaml")],  # logs as by default
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                     cwd=str(Path(__file__).resolve().parent.parent))
        log.close()
        wait_port(self.port, self.proc, self.log_path)
        if self.pg_port:
            wait_port(self.pg_port, self.proc, self.log_path)
        if self.profile:  # one py-spy per proxy process: FILE, then FILE.2 after a restart
            spy = shutil.which("py-spy")
            if spy is None:
                raise RuntimeError("--profile needs py-spy (pip install py-spy)")
            n = len(self.profiles) + 1
            out = self.profile if n == 1 else f"{self.profile}.{n}"
            self.profiles.append(out)
            self._spy = subprocess.Popen(
                [spy, "record", "-p", str(self.proc.pid), "-o", out, "--format", "raw", "-r",
                 "250", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart_proxy(self) -> None:
        """Stop the proxy (SIGTERM) and start it again with the same state: grants stay."""
        self.stop_proxy()
        self.start_proxy()

    def stop_proxy(self) -> None:
        if self._spy is not None:  # py-spy writes its file when interrupted
            self._spy.send_signal(signal.SIGINT)
            self._spy.wait(timeout=120)
            self._spy = None
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, 60)

    def ssh_cmd(self, user: str, command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), f"{user}@jit-proxy", command]

    def ssh_ok(self, user: str, command: str) -> str:
        r = subprocess.run(self.ssh_cmd(user, command), capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{user}: {command}: {r.stderr.strip()}")
        return r.stdout

    def ssh_args(self, path: str, user: str = "alice") -> list[str]:
        base = ["ssh", "-F", str(self.ssh_config)]
        if path == "jit-proxy":
            return base + ["-J", f"{user}@jit-proxy", f"{self.login}@web1"]
        if path == "openssh-jump":
            return base + ["-J", "openssh-jump", f"{self.login}@direct-target"]
        return base + [f"{self.login}@direct-target"]

    def db_login(self, user: str = "alice") -> str:
        import json
        return json.loads(self.ssh_ok(user, f"db-login {PG_DB} --json"))["password"]

    @contextlib.contextmanager
    def relay_cpu(self, path: str) -> Iterator[CPUSampler | _ProcessCPU | None]:
        """Measures the CPU seconds (``.used``, after the block) of what relays ``path`` during
        the block: the jit-proxy process, pgbouncer, or the OpenSSH jump host's per-connection
        processes; None for a direct path."""
        meter: CPUSampler | _ProcessCPU | None = None
        if path == "jit-proxy":
            assert self.proc is not None
            meter = _ProcessCPU(self.proc.pid)
        elif path == "openssh-jump":
            assert self.jump.process is not None
            meter = CPUSampler(self.jump.process.pid)
        elif path == "pgbouncer" and self.pg is not None and self.pg.bouncer is not None:
            pid = self.pg.bouncer.pid  # runuser's child when started as root
            kids = descendants(pid)
            meter = _ProcessCPU(kids[0] if kids else pid)
        with meter if meter is not None else contextlib.nullcontext():
            yield meter

    def proxy_rss_kib(self) -> int:
        assert self.proc is not None
        return rss_kib(self.proc.pid)

    def close(self) -> None:
        self.stop_proxy()
        for part in (self.target, self.jump):
            part.stop()
        if self.pg is not None:
            self.pg.stop()


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_split(stat: str) -> tuple[float, float]:
    """(user, system) CPU seconds in a /proc/PID/stat or /proc/PID/task/TID/stat line
    (proc(5): utime, stime)."""
    fields = stat.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_of(stat: str) -> float:
    """CPU seconds (user + system) in a /proc/PID/stat line."""
    return sum(cpu_split(stat))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far."""
    return _cpu_of(Path(f"/proc/{pid}/stat").read_text())


def descendants(pid: int) -> list[int]:
    """The living descendants of ``pid`` (proc(5): /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
        out += kids
        todo += kids
    return out


class _ProcessCPU:
    """CPU seconds one long-lived process uses during a ``with`` block (``.used``)."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> "_ProcessCPU":
        self._start = cpu_s(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.used = cpu_s(self.pid) - self._start


class CPUSampler:
    """CPU seconds the descendants of ``pid`` use while it runs (a context manager): each is
    sampled every ``interval`` seconds and counted at its last sample, so a process that exits,
    reaped or not, still counts (OpenSSH's per-connection processes never report to the
    listener). Misses at most ``interval`` of each process's last CPU."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.seen: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for p in descendants(self.pid):
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            start = stat.rsplit(")", 1)[1].split()[19]  # starttime: a reused pid is another
            self.seen[(p, start)] = _cpu_of(stat)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CPUSampler":
        self._sample()
        self.base = dict(self.seen)  # what the processes alive at the start had already used
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def used(self) -> float:
        return sum(v - self.base.get(k, 0.0) for k, v in self.seen.items())


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
