"""The daemon's lifecycle: open the CA, store and audit log, listen, sweep expiries, stop cleanly.

What it is for: ``jit-proxy serve``, and the in-process proxy of ``jit-proxy sandbox``.
What it must not do: start when a CA key is too open or the configuration is invalid (it says which
file or key, and exits non-zero), or leave the audit log unflushed on a normal stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any

from ca import SSHCertificateAuthority, load_or_create_key
from proxy.audit.log import AuditLog
from proxy.auth.login import pam_problems
from proxy.clock import Clock, SystemClock
from proxy.config import Config
from proxy.runtime.notify import Notifier
from proxy.runtime.service import AccessService
from proxy.ssh.server import FrontDoor
from proxy.store.sqlite import SQLiteStore

log = logging.getLogger("jit_proxy.daemon")

SWEEP_INTERVAL = 0.25   # seconds between expiry checks (sessions close within this of the end)
PENDING_SWEEP_TICKS = 4  # pending requests are checked for their TTL every second
RENEW_INTERVAL = 600.0  # seconds between host certificate renewal checks


CREDENTIAL = "ca-passphrase"  # systemd LoadCredential= name of the CA passphrase


def systemd_credential(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` when systemd passed that credential, else None."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def read_passphrase(path: Path | None) -> bytes | None:
    """The CA passphrase from ``path`` (first line, without its newline), or None."""
    if path is None:
        return None
    data = Path(path).read_bytes().split(b"\n", 1)[0].rstrip(b"\r")
    if not data:
        raise ValueError(f"{path}: passphrase file is empty")
    return data


class Daemon:
    def __init__(self, config: Config, clock: Clock | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        self.service: AccessService | None = None
        self.door: FrontDoor | None = None
        self.address: tuple[str, int] | None = None
        self.roles = None  # RoleManager when PostgreSQL is configured
        self.admin = None  # the admin socket
        self.metrics = None  # the Prometheus endpoint when configured
        self.pg = None     # PostgresFrontDoor when PostgreSQL is configured
        self._tasks: list[asyncio.Task] = []
        self._state_lock: int | None = None  # fd of STATE/lock while this process owns it

    async def start(self) -> tuple[str, int]:
        """Open everything and listen; returns the SSH listener's (address, port).

        Raises:
            ca.CAKeyError: a CA or host key file is too open or cannot be read.
            OSError: the state directory or the listen address is unusable, or another
                jit-proxy process uses the same state directory.
        """
        cfg = self.config
        for key, problem in pam_problems(cfg):
            if key == "auth.pam.library":  # every PAM login would fail: say so now
                raise OSError(f"{key}: {problem}")
            log.warning("%s: %s", key, problem)
        state = Path(cfg.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state_lock = lock_state_dir(state)
        try:
            return await self._start(cfg, state)
        except BaseException:  # a failed start gives the directory back (what it opened
            os.close(self._state_lock)  # is left to the process's exit)
            self._state_lock = None
            raise

    async def _start(self, cfg: Config, state: Path) -> tuple[str, int]:
        passphrase = read_passphrase(cfg.ca.passphrase_file or systemd_credential(CREDENTIAL))
        ca = SSHCertificateAuthority.open(state / "ca", passphrase)
        host_key = load_or_create_key(state / "host_key", passphrase)
        store = await SQLiteStore.open(state / "jit-proxy.db")
        audit = AuditLog(cfg.audit_log_path, self.clock)
        self.service = AccessService(cfg, store, audit, self.clock, ca, host_key)
        audit.observers.append(_log_event)
        if audit.repaired is not None:  # emitted while the log opened, before any observer
            _log_event(audit.repaired)
        from proxy.runtime.webhook import Webhook
        self.service.webhook = Webhook(self.service)
        if cfg.postgres is not None:
            from ca.x509 import X509CertificateAuthority
            from proxy.postgres.listener import PostgresFrontDoor
            from proxy.postgres.roles import RoleManager
            x509 = X509CertificateAuthority.open(state / "ca", self.clock.now(), passphrase)
            self.roles = RoleManager(self.service)
            self.pg = PostgresFrontDoor(self.service, self.roles, x509)
            self.service.hooks += [self.roles, self.pg]
            self.service.postgres = self.pg
        await self.service.start()
        if self.roles is not None:
            await self.roles.reconcile()
        self.door = FrontDoor(self.service)
        self.address = await _listening("ssh", cfg.ssh, self.door.listen())
        listening = {"ssh_listen": f"{self.address[0]}:{self.address[1]}"}
        if self.pg is not None:
            pg_address = await _listening("postgres", cfg.postgres, self.pg.listen())
            listening["postgres_listen"] = f"{pg_address[0]}:{pg_address[1]}"
            log.info("listening for PostgreSQL on %s:%d", *pg_address)
        self._tasks = [asyncio.get_running_loop().create_task(self._sweep()),
                       asyncio.get_running_loop().create_task(self._renew())]
        from proxy.runtime.admin import AdminServer
        self.admin = AdminServer(self.service, self)
        try:
            await self.admin.start()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"daemon.admin_socket {cfg.admin_socket_path}: {why} (its "
                                     f"directory must exist, or the proxy's account must be "
                                     f"able to make it)") from None
        if cfg.daemon.metrics_listen:
            from proxy.runtime.metrics import start_metrics
            self.metrics = start_metrics(self.service, self, cfg.daemon.metrics_listen)
            log.info("metrics on http://%s/metrics", self.metrics.address)
            self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_metrics()))
        audit.emit("proxy.started", "system", pid=os.getpid(), **listening)  # (all of it up)
        log.info("listening for SSH on %s:%d", *self.address)
        return self.address

    def listeners(self) -> dict[str, str]:
        out = {}
        if self.address is not None:
            out["ssh"] = f"{self.address[0]}:{self.address[1]}"
        if self.pg is not None and self.pg.server is not None:
            sock = self.pg.server.sockets[0].getsockname() if self.pg.server.sockets else None
            if sock:
                out["postgres"] = f"{sock[0]}:{sock[1]}"
        if self.admin is not None and self.admin.path is not None:
            out["admin"] = str(self.admin.path)
        if self.metrics is not None:
            out["metrics"] = self.metrics.address
        return out

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what listens where."""
        parts = []
        if self.address is not None:
            parts.append(f"SSH on {self.address[0]}:{self.address[1]}")
        if self.pg is not None:
            parts.append(f"PostgreSQL on port {self.pg.port}")
        if self.service is not None:
            parts.append(f"{len(self.service.active)} active grants")
        return "; ".join(parts)

    async def _sweep(self) -> None:
        assert self.service is not None
        ticks = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            ticks += 1
            try:
                self.service.spawn(self.service.expire_due())  # a storm never delays the next
                if ticks % PENDING_SWEEP_TICKS == 0:
                    await self.service.expire_pending()
            except Exception:  # keep sweeping; the failure is logged with its grant
                log.exception("expiry sweep failed")

    async def _refresh_metrics(self) -> None:
        from proxy.access.model import RequestStatus
        while True:
            if self.metrics is not None and self.service is not None:
                pending = await self.service.store.list_requests(status=RequestStatus.PENDING,
                                                                 limit=1_000_000)
                self.metrics.state.pending = len(pending)
            await asyncio.sleep(2)

    async def _renew(self) -> None:
        assert self.door is not None
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            try:
                await self.door.renew_host_certificate()
                if self.pg is not None:
                    self.pg.renew_certificate()
            except Exception:
                log.exception("host certificate renewal failed")

    async def stop(self, drain: float = 0.0) -> None:
        """Stop: accept nothing new, let live sessions finish for up to ``drain`` seconds, close
        the rest with a reason (their grants stay valid), flush recordings, the store and the
        audit log."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.door is not None:
            self.door.stop_accepting()
        if self.pg is not None and self.pg.server is not None:
            self.pg.server.close()
        service = self.service
        if service is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain
            while service.connections and loop.time() < deadline:
                await asyncio.sleep(0.1)
            closed = await service.terminate_all(
                "jit-proxy: the proxy is shutting down; your grant stays valid, connect again "
                "when it is back", "proxy stopped")
            deadline = loop.time() + 5
            while service.connections and loop.time() < deadline:  # let the reasons go out
                await asyncio.sleep(0.05)
            if closed:
                service.audit.emit("proxy.sessions_closed", "system", connections=closed,
                                   why="proxy stopped")
        if self.door is not None:
            self.door.close()
        if self.pg is not None:
            self.pg.close()
        if self.admin is not None:
            self.admin.close()
        if self.metrics is not None:
            self.metrics.shutdown()
        if self.roles is not None:
            await self.roles.close()
        if service is not None and service.webhook is not None:
            service.webhook.close()
        if service is not None:
            await asyncio.sleep(0)  # connection_lost callbacks of what close() just ended
            await service.drain()
            service.audit.emit("proxy.stopped", "system", pid=os.getpid())
            service.audit.close()
            await service.store.close()
        if self._state_lock is not None:
            os.close(self._state_lock)  # (the kernel releases it too if the process dies)
            self._state_lock = None

    async def reload(self, path: Path) -> bool:
        """SIGHUP: load ``path``; if valid, users, groups, targets and policies apply to new
        requests and sessions (live sessions carry on). If not, the running configuration stays
        and every problem is logged with its key and line. Returns whether it was applied."""
        from proxy.config import ConfigError, load_config
        assert self.service is not None
        try:
            new = load_config(path)
            unusable = [f"{path}: {key}: {problem}" for key, problem in pam_problems(new)
                        if key == "auth.pam.library"]
            if unusable:
                raise ConfigError(unusable)
        except ConfigError as exc:
            for message in exc.messages:
                log.error("reload refused, keeping the running configuration: %s", message)
            self.service.audit.emit("proxy.reload.refused", "system", config=str(path),
                                    errors=exc.messages[:20])
            return False
        old = self.config
        for field in ("state_dir",):
            if getattr(new, field) != getattr(old, field):
                log.warning("reload: %s changes only after a restart", field)
        for section in ("ssh", "postgres"):
            a, b = getattr(old, section), getattr(new, section)
            if (a and b and (a.listen_address, a.listen_port) != (b.listen_address,
                                                                   b.listen_port)) \
                    or (a is None) != (b is None):
                log.warning("reload: the %s listener changes only after a restart", section)
        self.config = new
        self.service.use_config(new)
        if self.roles is not None:  # roles of a removed target are still dropped at their end
            self.roles.reloaded()
        self.service.clear_host_certificates()
        if self.door is not None:
            await self.door.renew_host_certificate()
        if self.pg is not None:
            self.pg.renew_certificate()
        self.service.audit.emit("proxy.reloaded", "system", config=str(path),
                                users=len(new.users), targets=len(new.targets),
                                policies=len(new.policies))
        log.info("configuration reloaded from %s", path)
        return True


async def serve(config: Config, config_path: Path | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status. Under systemd (Type=notify) it
    sends READY=1 once every listener accepts connections, pings the watchdog from the event loop
    (a stuck loop stops pinging and gets restarted), reloads on SIGHUP (RELOADING=1, then
    READY=1), and sends STOPPING=1 when asked to stop, then drains live sessions for
    ``daemon.drain_time`` seconds."""
    notifier = Notifier()
    daemon = Daemon(config)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloading: set[asyncio.Task] = set()

    async def reload() -> None:
        notifier.notify(RELOADING=1, STATUS="reloading")
        try:
            await daemon.reload(config_path)
        finally:
            notifier.notify(READY=1, STATUS=daemon.status_line())

    def on_hup() -> None:
        if config_path is not None:
            task = loop.create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watchdog = None
    if notifier.watchdog_interval:
        watchdog = loop.create_task(_watchdog(notifier, notifier.watchdog_interval))
    notifier.notify(READY=1, STATUS=daemon.status_line(), MAINPID=os.getpid())
    await stop.wait()
    log.info("stopping: draining live sessions for up to %ss", daemon.config.daemon.drain_time)
    notifier.notify(STOPPING=1, STATUS="stopping: draining live sessions")
    await daemon.stop(drain=daemon.config.daemon.drain_time)
    if watchdog is not None:
        watchdog.cancel()
    notifier.close()
    return 0


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.notify(WATCHDOG=1)
        await asyncio.sleep(interval)


def lock_state_dir(state: Path, name: str = "state_dir") -> int:
    """Take ``state`` for this process: an exclusive flock(2) on ``STATE/lock`` (0600, holding
    the owner's pid), released when the returned fd is closed or the process ends. A second
    proxy on the same state directory would replace the first one's admin socket and TLS key,
    and close its sessions as orphans in the shared database. ``name`` is what the message
    calls the directory (``state_dir``, or the sandbox's ``--dir``).

    Raises:
        OSError: another process holds the lock (the message names its pid), or ``STATE/lock``
            is a symlink or not a regular file, or cannot be opened.
    """
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{state / 'lock'} is not a regular file; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OSError(f"{name} {state} is in use by another jit-proxy (pid {owner}); stop "
                      f"it first, or give this one a {name} of its own") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


_audit_log = logging.getLogger("jit_proxy.audit")
# refusals, failures, errors, what was left behind, lockouts: the events an operator must see
_WARNING_EVENT = re.compile(
    r"[._](refused|failed|failure|orphaned|unusable|suppressed|repaired)$|error|^auth\.lockout$")


def _log_event(event: dict) -> None:
    """Every audit event also goes to the operator's log (journald), as one line; the audit log
    never holds secrets, so neither does this. Refusals and failures are warnings; a statement
    (``db.query``) is a debug line unless refused: one line per SQL statement would flood
    journald, which rate-limits a unit that does so and then drops the lines that matter too. The
    audit log keeps every statement."""
    kind = event["type"]
    if _WARNING_EVENT.search(kind) or (kind == "db.query" and "refused" in event):
        level = logging.WARNING
    else:
        level = logging.DEBUG if kind == "db.query" else logging.INFO
    if not _audit_log.isEnabledFor(level):  # e.g. --log-level warning: no JSON for nobody
        return
    fields = {k: v for k, v in event.items() if k not in ("prev", "hash", "ts")}
    _audit_log.log(level, json.dumps(fields, ensure_ascii=False, separators=(",", ":")))


async def _listening(section: str, listener: Any, start: Any) -> tuple[str, int]:
    """Await ``start`` (a listener's ``listen()``); an address in use or not ours is said with
    the configuration keys that chose it.

    Raises:
        OSError: naming ``SECTION.listen_address`` and ``listen_port``."""
    try:
        return await start
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"{section}.listen_address/listen_port "
                                 f"{listener.listen_address}:{listener.listen_port}: "
                                 f"{why}") from None


def run(coro):
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop; returns
    what ``coro`` returns."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
