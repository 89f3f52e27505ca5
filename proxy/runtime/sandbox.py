"""``jit-proxy sandbox``: a complete local playground, and the throwaway sshd the tests use too.

What it is for: in one command, a newcomer gets the proxy (in this process), a real OpenSSH sshd as
target ``web1`` trusting the proxy's user CA, two users (alice requests, bob approves) with keys,
an ``ssh_config`` and ``known_hosts`` that make stock ``ssh`` work, and ``sandbox.json`` describing
it. ``TargetSSHD`` starts and stops such an sshd on 127.0.0.1 with an OS-chosen port.

What it must not do: touch the user's own ~/.ssh, listen beyond 127.0.0.1, or leave a process
behind after SIGINT/SIGTERM/SIGHUP. As root it creates one login account (``deploy``) when missing.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ca.keys import write_private_key

SANDBOX_LOGIN_AS_ROOT = "deploy"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just handed out (for programs that need it up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apt_install(*packages: str) -> bool:
    """As root on a machine with apt-get: install Debian ``packages`` (after refreshing the
    package lists). Returns False when this is not such a machine.

    Raises:
        subprocess.CalledProcessError: apt-get failed.
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print(f"jit-proxy: installing {' '.join(packages)} (apt-get) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return True


def find_sshd(install: bool = True) -> str:
    """The absolute path of sshd; installs Debian's openssh-server when missing and root.

    Raises:
        RuntimeError: sshd is missing and cannot be installed here.
    """
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    if install and apt_install("openssh-server", "openssh-client"):
        return find_sshd(install=False)
    raise RuntimeError("sshd not found: install OpenSSH's server (Debian: apt-get install "
                       "openssh-server)")


def ensure_login(name: str) -> str:
    """As root: make sure account ``name`` exists (created with a home, shell /bin/bash, and an
    unusable but unlocked password ``*`` so sshd accepts certificate logins). Otherwise: the
    current user. Returns the login to use."""
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-p", "*", "-s", "/bin/bash", name], check=True)
    return name


@dataclass
class TargetSSHD:
    """A real OpenSSH sshd on 127.0.0.1 that trusts ``user_ca`` for certificate logins."""

    directory: Path
    user_ca: str
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def host_key_path(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    def prepare(self) -> str:
        """Create the host key (once) and config; returns the host public key line."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.host_key_path.exists():
            write_private_key(self.host_key_path, asyncssh.generate_private_key("ssh-ed25519"))
        (self.directory / "user_ca.pub").write_text(self.user_ca.strip() + "\n")
        self.port = self.port or free_port()
        d = self.directory
        (d / "sshd_config").write_text(textwrap.dedent(f"""\
            # written by jit-proxy: a throwaway target that trusts the proxy's user CA only
            Port {self.port}
            ListenAddress 127.0.0.1
            HostKey {self.host_key_path}
            PidFile {d / 'sshd.pid'}
            TrustedUserCAKeys {d / 'user_ca.pub'}
            AuthorizedKeysFile none
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            PermitRootLogin no
            AcceptEnv LANG LC_* JIT_*
            X11Forwarding no
            Subsystem sftp internal-sftp
            LogLevel VERBOSE
            """))
        return (d / "ssh_host_ed25519_key.pub").read_text().strip()

    def start(self, log_path: Path | None = None) -> None:
        """Start ``sshd -D -e`` in its own process group and wait until it accepts connections.

        Raises:
            RuntimeError: sshd exited or did not listen within 10 s (its log is in the message).
        """
        sshd = find_sshd()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        log_path = log_path or self.directory / "sshd.log"
        log = open(log_path, "ab")
        self.process = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.directory / "sshd_config")],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on port {self.port}")

    def stop(self) -> None:
        """Terminate sshd and every session process it started (its whole process group)."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None


def _user_key(keys: Path, name: str) -> str:
    path = keys / name
    if not path.exists():
        write_private_key(path, asyncssh.generate_private_key("ssh-ed25519"))
    return (keys / f"{name}.pub").read_text().strip()


def sandbox_config(d: Path, target_port: int, target_host_key: str, alice: str, bob: str,
                   login: str, pg: "TargetPostgres | None" = None) -> str:
    """The sandbox's configuration file (YAML): alice (group dev) may request LOGIN on web1 and,
    with PostgreSQL, the role ``read`` on ``orders``; bob (group sre) approves."""
    import yaml
    config: dict = {
        "state_dir": str(d / "state"),
        "ssh": {"listen_address": "127.0.0.1", "listen_port": 0,
                "host_names": ["jit-proxy"]},
        "users": {"alice": {"keys": [alice]}, "bob": {"keys": [bob]}},
        "groups": {"dev": {"members": ["alice"]}, "sre": {"members": ["bob"]}},
        "targets": {"web1": {"address": "127.0.0.1", "port": target_port,
                             "host_key": target_host_key,
                             "description": "throwaway OpenSSH server of the sandbox"}},
        "policies": [{"name": "web1-access", "targets": ["web1"], "logins": [login],
                      "requesters": ["group:dev"], "approvers": ["group:sre"],
                      "max_duration": "4h"}],
    }
    if pg is not None:
        config["postgres"] = {"listen_address": "127.0.0.1", "listen_port": 0,
                              "host_names": ["127.0.0.1", "localhost", "jit-proxy"]}
        config["targets"]["orders"] = {
            "kind": "postgres", "address": "127.0.0.1", "port": pg.port, "database": "orders",
            "admin": {"user": "postgres", "password_file": str(d / "pg" / "admin.password")},
            "roles": {"read": ["orders_reader"]}, "owner": "app_owner",
            "tls": {"mode": "verify-full", "ca_file": str(d / "pg" / "upstream-ca.pem")},
            "description": "throwaway PostgreSQL database of the sandbox"}
        config["policies"].append({"name": "orders-read", "targets": ["orders"],
                                   "roles": ["read"], "requesters": ["group:dev"],
                                   "approvers": ["group:sre"], "max_duration": "1h"})
    return ("# jit-proxy sandbox configuration, written by `jit-proxy sandbox`\n"
            "# (config/jit-proxy.example.yaml documents every key)\n"
            + yaml.safe_dump(config, sort_keys=False))


SANDBOX_ORDERS_SQL = """
CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL, status text NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO orders (customer, status) VALUES ('acme', 'shipped'), ('globex', 'stuck'),
  ('initech', 'stuck'), ('umbrella', 'paid');
ALTER TABLE orders OWNER TO app_owner;
CREATE ROLE orders_reader NOLOGIN;
GRANT CONNECT ON DATABASE orders TO orders_reader;
GRANT USAGE ON SCHEMA public TO orders_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO orders_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA public GRANT SELECT ON TABLES TO orders_reader;
"""


def _traversable(path: Path) -> bool:
    """Whether every directory from / down to ``path`` lets others through (o+x)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


async def sandbox_postgres(d: Path) -> "TargetPostgres | None":
    """Start (creating once) the sandbox's PostgreSQL cluster with database ``orders``; None when
    PostgreSQL is not installed and cannot be."""
    import asyncpg
    import time
    from ca.x509 import X509CertificateAuthority
    try:
        _postgres_bindir()
    except RuntimeError:
        if not apt_install("postgresql", "postgresql-client"):
            return None
    pgdir = d / "pg"
    pgdir.mkdir(exist_ok=True, mode=0o711)
    ca = X509CertificateAuthority.open(pgdir / "ca", time.time(), name="sandbox PostgreSQL CA")
    (pgdir / "upstream-ca.pem").write_bytes(ca.certificate_pem)
    cert = ca.issue_server_certificate(["127.0.0.1", "localhost"], now=time.time(),
                                       validity=30 * 86400)
    password_file = pgdir / "admin.password"
    if not password_file.exists():
        from ca.keys import write_secret_file
        import secrets as _secrets
        write_secret_file(password_file, (_secrets.token_urlsafe(24) + "\n").encode())
    password = password_file.read_text().strip()
    cluster_dir = pgdir / "cluster"
    if os.geteuid() == 0 and not _traversable(pgdir):
        # e.g. DIR under a 0700 directory: the postgres account could not reach its data there
        cluster_dir = Path(tempfile.mkdtemp(prefix="jit-sandbox-pg-"))
        os.chmod(cluster_dir, 0o711)
        cluster_dir = cluster_dir / "cluster"
    fresh = not (cluster_dir / "data" / "PG_VERSION").exists()
    pg = TargetPostgres(cluster_dir, cert.chain_pem, cert.key_pem, superuser_password=password)
    pg.start()
    if fresh:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                                     password=password, database="postgres", ssl=False)
        try:
            await conn.execute("CREATE ROLE app_owner NOLOGIN")
            await conn.execute("CREATE DATABASE orders OWNER app_owner")
        finally:
            await conn.close()
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                                     password=password, database="orders", ssl=False)
        try:
            await conn.execute(SANDBOX_ORDERS_SQL)
        finally:
            await conn.close()
    return pg


def client_files(d: Path, proxy_port: int, known_hosts_line: str, users: list[str],
                 keys: Path) -> Path:
    """Write DIR/ssh_config and DIR/known_hosts for stock OpenSSH; returns the ssh_config path.

    ``users`` get ``IdentityFile KEYS/USER`` when they connect to ``jit-proxy``; the known_hosts
    file holds only the proxy's ``@cert-authority`` line, and host keys are checked strictly.
    """
    (d / "known_hosts").write_text(known_hosts_line + "\n")
    path = d / "ssh_config"
    identities = "".join(f"Match originalhost jit-proxy user {u}\n  IdentityFile {keys / u}\n"
                         for u in users)
    path.write_text(textwrap.dedent(f"""\
        # ssh -F {path} {users[0]}@jit-proxy help
        Host jit-proxy
          HostName 127.0.0.1
          Port {proxy_port}
          HostKeyAlias jit-proxy
        """) + identities + textwrap.dedent(f"""\
        Match all
          IdentitiesOnly yes
          IdentityAgent none
          UserKnownHostsFile {d / 'known_hosts'}
          GlobalKnownHostsFile /dev/null
          StrictHostKeyChecking yes
          UpdateHostKeys no
          BatchMode yes
        """))
    return path


async def _run_sandbox(d: Path) -> int:
    from proxy.config import load_config
    from proxy.runtime.daemon import Daemon

    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        os.chmod(d, 0o711)  # the postgres account must reach DIR/pg; nothing here is listable
    (d / "keys").mkdir(exist_ok=True, mode=0o700)
    alice, bob = _user_key(d / "keys", "alice"), _user_key(d / "keys", "bob")
    login = ensure_login(SANDBOX_LOGIN_AS_ROOT)
    # the CA is created by the daemon; the target's sshd starts once its public key exists
    target = TargetSSHD(d / "target", user_ca="")
    target.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not target.host_key_path.exists():
        write_private_key(target.host_key_path, asyncssh.generate_private_key("ssh-ed25519"))
    target_host_key = (target.directory / "ssh_host_ed25519_key.pub").read_text().strip()
    target.port = free_port()
    pg = await sandbox_postgres(d)
    config_path = d / "jit-proxy.yaml"
    config_path.write_text(sandbox_config(d, target.port, target_host_key, alice, bob, login, pg))
    daemon = Daemon(load_config(config_path))
    try:
        _, proxy_port = await daemon.start()
        assert daemon.service is not None
        target.user_ca = daemon.service.ca.user_ca_public
        target.prepare()
        target.start()
        ssh_config = client_files(d, proxy_port, daemon.service.known_hosts_line(),
                                  ["alice", "bob"], d / "keys")
        info = {"ssh_config": str(ssh_config), "proxy_port": proxy_port, "target": "web1",
                "target_port": target.port, "login": login, "config": str(config_path),
                "audit_log": str(daemon.config.audit_log_path),
                "recordings": str(daemon.config.recording_dir), "pid": os.getpid()}
        if daemon.pg is not None:
            info.update(db_target="orders", pg_port=daemon.pg.port,
                        pg_data=str(pg.directory / "data") if pg else None)
        (d / "sandbox.json").write_text(json.dumps(info, indent=2) + "\n")
        db_lines = ""
        if daemon.pg is not None:
            db_lines = textwrap.indent(textwrap.dedent(f"""\

                ssh -F $S alice@jit-proxy request orders --role read --for 30m --reason "INC-2: stuck orders"
                ssh -F $S bob@jit-proxy approve ID     # the request's ID, printed above
                cd {d} && ssh -F $S alice@jit-proxy ca --pg > jit-ca.pem
                psql "$(ssh -F $S alice@jit-proxy db-login orders --uri)" -c 'SELECT * FROM orders'"""),
                "  ")
        else:
            db_lines = ("\n\n(PostgreSQL is not installed: the database part of the "
                        "walkthrough is off.)")
        print(textwrap.dedent(f"""\
            jit-proxy sandbox is running (proxy on 127.0.0.1:{proxy_port}, target web1 on
            127.0.0.1:{target.port}). In another terminal, try:

              S={ssh_config}
              ssh -F $S alice@jit-proxy request web1 --login {login} --for 10m --reason "INC-1: check disk"
              ssh -F $S bob@jit-proxy requests --pending
              ssh -F $S bob@jit-proxy approve ID --comment ok     # ID: printed by request
              ssh -F $S -J alice@jit-proxy {login}@web1""") + db_lines + textwrap.dedent(f"""\


            Recordings: {daemon.config.recording_dir}
            Audit log:  {daemon.config.audit_log_path}  (jit-proxy audit verify FILE)
            Operator:   jit-proxy status -c {config_path}   (also with -c: grants revoke ID,
                        sessions kill ID, lockouts clear SUBJECT, recordings list, recordings
                        play ID; the sandbox writes this file anew at each start)
            Stop with Ctrl-C."""), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # a closed terminal (SIGHUP) stops it the same clean way: nothing left running
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        (d / "sandbox.json").unlink(missing_ok=True)  # it describes a running sandbox only
        target.stop()
        await daemon.stop()
        if pg is not None:
            pg.stop()
            if pg.directory.parent.name.startswith("jit-sandbox-pg-"):
                shutil.rmtree(pg.directory.parent, ignore_errors=True)
    print("jit-proxy sandbox stopped.", flush=True)
    return 0


def main(d: Path) -> int:
    from proxy.runtime.daemon import run
    try:
        find_sshd()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"jit-proxy sandbox: {exc}", file=sys.stderr)
        return 1
    from proxy.runtime.daemon import lock_state_dir
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = lock_state_dir(d, "--dir")  # before anything in it is touched
    except OSError as exc:
        print(f"jit-proxy sandbox: {exc}", file=sys.stderr)
        return 1
    try:
        return run(_run_sandbox(d))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"jit-proxy sandbox: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)


def _postgres_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl`` (Debian keeps them in /usr/lib/postgresql/N/bin)."""
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if versions:
        return versions[-1].parent
    raise RuntimeError("PostgreSQL server not found: install it (Debian: apt-get install "
                       "postgresql)")


@dataclass
class TargetPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with TLS, started by ``initdb``/``pg_ctl``.

    As root the cluster runs as the ``postgres`` account (``initdb`` refuses root) in a directory
    that account owns. ``tls_chain``/``tls_key`` are PEM bytes of the server certificate.
    """

    directory: Path
    tls_chain: bytes
    tls_key: bytes
    superuser: str = "postgres"
    superuser_password: str = ""
    port: int = 0
    settings: dict | None = None  # more postgresql.conf settings (they override the defaults)

    def _run(self, argv: list[str]) -> None:
        """Run a PostgreSQL program as the cluster's owner; RuntimeError with its stderr."""
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        r = subprocess.run(owner + argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {r.stderr.strip() or r.stdout}")

    def start(self) -> None:
        """initdb (once), write TLS files and settings, then ``pg_ctl start`` and wait.

        Raises:
            RuntimeError / subprocess.CalledProcessError: with PostgreSQL's own message.
        """
        bindir = _postgres_bindir()
        d = self.directory
        data = d / "data"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:  # the parents must be traversable by the postgres account
            shutil.chown(d, "postgres", "postgres")
        if not (data / "PG_VERSION").exists():
            pwfile = d / "pwfile"
            pwfile.write_text(self.superuser_password + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            os.chmod(pwfile, 0o600)
            self._run([str(bindir / "initdb"), "-D", str(data), "-U", self.superuser,
                       "--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8",
                       "--locale=C.UTF-8"])
            pwfile.unlink()
        for name, content in (("server.crt", self.tls_chain), ("server.key", self.tls_key)):
            path = data / name
            path.write_bytes(content)
            os.chmod(path, 0o600)
            if os.geteuid() == 0:
                shutil.chown(path, "postgres", "postgres")
        self.port = self.port or free_port()
        (data / "postgresql.auto.conf").write_text(textwrap.dedent(f"""\
            listen_addresses = '127.0.0.1'
            port = {self.port}
            unix_socket_directories = '{data}'
            ssl = on
            ssl_cert_file = 'server.crt'
            ssl_key_file = 'server.key'
            password_encryption = 'scram-sha-256'
            max_connections = 200
            fsync = off
            log_min_messages = warning
            """) + "".join(f"{k} = '{v}'\n" for k, v in (self.settings or {}).items()))
        if os.geteuid() == 0:
            shutil.chown(data / "postgresql.auto.conf", "postgres", "postgres")
        (data / "pg_hba.conf").write_text("local all all scram-sha-256\n"
                                          "hostssl all all 127.0.0.1/32 scram-sha-256\n"
                                          "host all all 127.0.0.1/32 scram-sha-256\n")
        try:
            self._run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(d / "postgres.log"),
                       "-w", "-t", "60", "start"])
        except RuntimeError as exc:
            hint = f"PostgreSQL's log: {d / 'postgres.log'}"
            pidfile = data / "postmaster.pid"
            if pidfile.exists():
                pid = pidfile.read_text().split("\n", 1)[0].strip()
                hint += (f"; a server from an earlier run may still hold {data} (PID {pid}, in "
                         f"{pidfile}): stop it (kill {pid}) or use another --dir")
            raise RuntimeError(f"{exc}\n{hint}") from None

    def stop(self) -> None:
        data = self.directory / "data"
        if (data / "postmaster.pid").exists():
            self._run([str(_postgres_bindir() / "pg_ctl"), "-D", str(data), "-m", "immediate",
                       "-w", "stop"])
