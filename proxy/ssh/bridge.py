"""The jump bridge: terminate ``ssh -J jit-proxy LOGIN@TARGET`` and relay it to the real target.

What it is for: one ``JumpConnection`` per direct-tcpip channel to a configured target. The proxy
runs an SSH server (asyncssh) directly on that channel, presenting a host certificate for TARGET; it
lets the user in as LOGIN only under a live grant, opens its own connection to the target with a
freshly minted user certificate (host key verified: pinned key or host CA; begun when the channel
opens if the user holds one grant there, authenticated once the login is known), and bridges each
session channel to a target channel: shell, exec, subsystem (sftp), pty and resizes, environment,
signals, break, EOF, exit status or signal, with flow control in both directions. Terminal sessions
are recorded as asciicast v2; every session's start and end (with byte counts, recording path and
SHA-256) are audited. ``BatchedWrites`` sends what asyncssh writes to a client connection (its
socket, or for an inner connection the outer channel) during one event-loop iteration as one write:
the bulk path's packets cost one system call, or full outer packets, per loop turn.

What it must not do: connect anywhere but the configured target, skip host key verification, mint a
certificate for a login the user has not logged in as, forward agents or X11, relay port forwardings
the grant's policy does not allow, or record keystrokes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.connection import SSHServerConnection

from proxy.access import policy
from proxy.audit.log import cut_text
from proxy.audit.recording import AsciicastRecorder
from proxy.config import SSHTarget
from proxy.runtime.service import AccessService, LiveSession
from proxy.store import SessionRecord

log = logging.getLogger("jit_proxy.bridge")

# AES-GCM runs inside OpenSSL; chacha20-poly1305 costs Python work per packet in asyncssh.
PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]

UPSTREAM_CONNECT_TIMEOUT = 15.0
UPSTREAM_KEEPALIVE = 60  # seconds between keepalives to a target while it is read
# a connection to a target begun when the channel opened (JumpConnection.connect_early) is
# dropped unless the inner login claims it within this many seconds (clients take milliseconds;
# one at a prompt gets a fresh connection at its login), and at most this many wait at once
EARLY_CLAIM_WITHIN = 5.0
EARLY_UPSTREAMS_MAX = 32
# after one was dropped unclaimed, none begins for that user and target for this many seconds
# (their logins connect at the login meanwhile): opening and closing channels over and over must
# not make the target accept a stream of connections nobody logs in on
EARLY_COOLDOWN = 30.0
# the target-side session channel: a bigger window and packets than asyncssh's defaults (2 MiB,
# 32 KiB) mean fewer packets to decrypt and fewer window adjustments per byte from the target;
# the client side stays bounded by the client's own window (flow control pauses reading here;
# what the target already sent, at most one window, then waits in the proxy). Measured with
# `python -m bench` (bulk down): about a quarter less proxy CPU per GiB than the defaults.
UPSTREAM_WINDOW = 8 * 1024 * 1024
UPSTREAM_MAX_PKTSIZE = 128 * 1024
CLOSE_GRACE = 1.0
AUDIT_COMMAND_LIMIT = 65536  # characters of an exec command kept in ssh.session.start (as SQL)


class BatchedWrites:
    """Stands in for a connection's transport: what asyncssh writes during one event-loop
    iteration (one SSH packet per write) goes to the socket (or the outer channel) as one
    write: one system call, or full-size outer packets, instead of one per packet. Order is
    kept; ``close`` sends what is pending first; everything else is the wrapped transport's.
    ``join``: one joined write (for a channel, whose writes become packets), or else the pieces
    as they are in one ``writelines`` (for a socket: one gathering system call, no copy)."""

    gathers = True  # proxy.ssh.tuning hands packets over as header and body, unjoined

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 join: bool):
        self._transport, self._loop, self._join = transport, loop, join
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        elif self._join:
            self._transport.write(b"".join(pending))
        else:
            self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def batch_writes(conn: asyncssh.SSHConnection, join: bool = False) -> None:
    """Put ``BatchedWrites`` between ``conn`` and its transport; call from the owner's
    ``connection_made`` (asyncssh sets the transport before calling it). ``join``: the
    transport is a channel (see ``BatchedWrites``)."""
    transport = getattr(conn, "_transport", None)
    if transport is not None and hasattr(transport, "write"):  # (uvloop's is no subclass)
        conn._transport = BatchedWrites(transport, asyncio.get_running_loop(), join)


def upstream_known_hosts(target: SSHTarget) -> tuple[list, list, list]:
    """asyncssh's (trusted host keys, trusted host CA keys, revoked keys) for ``target``."""
    if target.host_key:
        return ([asyncssh.import_public_key(target.host_key)], [], [])
    assert target.host_ca is not None
    return ([], [asyncssh.import_public_key(target.host_ca)], [])


def unreachable(target: str, login: str | None, exc: BaseException) -> str:
    """The line a user gets when the proxy could not log in to ``target``; a refused login is
    the target's setup (or a missing account), which the user can only pass on."""
    text = f"jit-proxy: cannot reach {target}: {exc}"
    if isinstance(exc, asyncssh.PermissionDenied):
        text += (f" (the target refused the proxy's certificate for {login}: its sshd must "
                 f"trust the proxy's user CA, TrustedUserCAKeys with the key 'ssh jit-proxy ca' "
                 f"prints, and have an account {login}; tell its operator)")
    return text


class JumpConnection(asyncssh.SSHServer):
    """The inner SSH server of one jump connection, and the upstream connection it owns."""

    def __init__(self, service: AccessService, user: str, target_name: str, peer: str,
                 client: Any = None):
        self.service = service
        self.client = client  # the client's connection (server.ProxyServer), if known
        self.user = user
        self.target_name = target_name
        self.target: SSHTarget = service.config.targets[target_name]
        self.peer = peer
        self.login: str | None = None
        self.grant = None
        self.conn: SSHServerConnection | None = None
        self.sessions: set[BridgeSession] = set()
        self._upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._upstream_login: str | None = None  # the login _upstream logs in as
        self._credentials: asyncio.Future | None = None  # its key and certificate, once known
        self._asked: asyncio.Future | None = None  # done once the target asked for the login
        self._claimed = False  # begin_auth took _upstream for the login (else connect_early's)
        self._early: asyncio.TimerHandle | None = None  # connect_early's, until claimed
        self._closed = False
        self.outer_paused = False  # the client's direct-tcpip channel has too much unsent data
        self._forwarded = False  # a port forwarding was opened on this connection

    def outer_writing_paused(self, paused: bool) -> None:
        """The outer channel's send buffer crossed its high (or low) water mark: stop (or
        resume) reading from the target, so nothing piles up in the proxy (sessions stop
        reading their channel; port forwardings, which asyncssh bridges itself, only stop
        when the connection to the target stops reading altogether)."""
        self.outer_paused = paused
        for session in list(self.sessions):
            session.update_reading()
        if self._forwarded:  # (sessions alone need not pay for it: bulk transfers toggle often)
            self.follow_client()

    # --- asyncssh.SSHServer ----------------------------------------------------------------------

    def connection_made(self, conn: SSHServerConnection) -> None:
        self.conn = conn
        if self.client is not None:
            self.client.jumps.add(self)
        self.connect_early()  # (the channel is open: connection_lost will come)

    def _client_backed_up(self) -> bool:
        return ((self.outer_paused and self._forwarded)
                or (self.client is not None and self.client.socket_full))

    def follow_client(self, upstream: asyncssh.SSHClientConnection | None = None) -> None:
        """Read from the target (``upstream``, by default the connection made) only while the
        client takes what it sends: its socket, and its outer channel once a port forwarding
        was opened (asyncssh bridges those itself), whatever the channels' windows allow. The
        keepalive pauses meanwhile: unanswered while nothing is read, it would end the
        connection."""
        if upstream is None:
            task = self._upstream
            if task is None or not task.done() or task.cancelled() or task.exception():
                return
            upstream = task.result()
        transport = getattr(upstream, "_transport", None)  # (asyncssh never pauses it itself)
        if transport is None or transport.is_closing():
            return
        if self._client_backed_up():
            transport.pause_reading()
            upstream.set_keepalive(0)
        else:
            transport.resume_reading()
            upstream.set_keepalive(UPSTREAM_KEEPALIVE)

    async def begin_auth(self, username: str) -> bool:
        grant = self.service.live_grant(self.user, self.target_name, username)
        if grant is None:
            self.service.audit.emit("ssh.session.refused", self.user, target=self.target_name,
                                    login=username[:256], peer=self.peer, why="no active grant")
            assert self.conn is not None
            self._drop_upstream()  # (connect_early's, for the login of the user's grant)
            text = await self.service.describe_denial(self.user, self.target_name, username)
            if not self._closed:
                self.conn.send_auth_banner(text + "\n")
            return True  # every method then fails: "Permission denied"
        self.login, self.grant = username, grant
        self.service.attach(grant.id, self)
        self.service.audit.emit("ssh.connection.start", self.user, target=self.target_name,
                                login=username, grant=grant.id, peer=self.peer)
        early = self._upstream  # connect_early's: kept if for this login and still going (it
        if early is None or self._upstream_login != username or early.done():  # cannot be done
            self._start_upstream(username)  # before it has a certificate: it failed)
        self._claim()
        assert self._credentials is not None and self._asked is not None
        self.service.spawn(self._mint_credentials(grant, self._credentials, self._asked),
                           drain=False)
        return False  # the outer connection already authenticated the user

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False

    def live(self) -> bool:
        """Whether this connection's grant still covers new sessions and channels, now (as it
        stands now: extended, or its first-use window started, since the login; and still
        allowed by the configuration, which a reload may have changed)."""
        return self.grant is not None and self.service.usable(self.grant.id) is not None

    def session_requested(self) -> "BridgeSession | bool":
        if not self.live():
            return False
        limit = self.service.config.ssh.max_sessions_per_connection
        if len(self.sessions) >= limit:
            self.service.audit.emit("ssh.session.refused", self.user, target=self.target_name,
                                    login=self.login, why=f"more than {limit} sessions on one "
                                                          f"connection")
            return False
        return BridgeSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        allowed = (self.live() and self.grant is not None and
                   policy.permissions(self.service.config, self.grant).port_forwarding)
        self.service.audit.emit("ssh.forward." + ("opened" if allowed else "refused"), self.user,
                                target=self.target_name, login=self.login, dest_host=dest_host,
                                dest_port=dest_port)
        if not allowed:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "jit-proxy: port forwarding is not allowed by this grant's policy")
        return self._forward(dest_host, dest_port)

    async def _forward(self, dest_host: str, dest_port: int) -> asyncssh.SSHForwarder:
        """A direct-tcpip channel on the upstream connection, bridged to the client's channel
        (the target's sshd decides, by the certificate's permit-port-forwarding). Raises
        ChannelOpenError when the target cannot be reached (the channel fails, not the
        connection)."""
        assert self.conn is not None
        try:
            upstream = await self.upstream()
        except Exception as exc:  # noqa: BLE001 - e.g. the certificate could not be minted
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                unreachable(self.target_name, self.login, exc)) from None
        self._forwarded = True
        return await self.conn.forward_tunneled_connection(upstream, dest_host, dest_port)

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.service.audit.emit("ssh.forward.refused", self.user, target=self.target_name,
                                login=self.login, dest_path=dest_path[:255],
                                why="unix socket forwarding")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.service.audit.emit("ssh.forward.refused", self.user, target=self.target_name,
                                login=self.login, listen_host=listen_host,
                                listen_port=listen_port, why="remote forwarding")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.client is not None:
            self.client.jumps.discard(self)
        if self.grant is not None:
            self.service.detach(self.grant.id, self)
            self.service.audit.emit("ssh.connection.end", self.user, target=self.target_name,
                                    login=self.login, grant=self.grant.id)
        self._drop_upstream()

    # --- upstream ---------------------------------------------------------------------------------

    async def upstream(self) -> asyncssh.SSHClientConnection:
        """The connection to the target. Raises ConnectionError once it has been dropped (the
        client left, the grant ended), or what connecting raised."""
        if self._upstream is None:
            raise ConnectionError("the connection to the target has been closed")
        return await asyncio.shield(self._upstream)

    def connect_early(self) -> None:
        """Begin the connection to the target as the channel opens, if the user holds one live
        grant on it (whose login the inner login will almost surely name) and has no such early
        connection waiting already: TCP and the key exchange with the target, the slowest part
        of ``ssh -J``'s setup, then overlap the inner handshake. It authenticates only once
        ``begin_auth`` claims it for that login (the certificate is minted then), and is dropped
        for any other login or unclaimed after ``EARLY_CLAIM_WITHIN``; none begins while
        ``EARLY_UPSTREAMS_MAX`` wait (each holds one of the target's unauthenticated connection
        slots, MaxStartups, meanwhile: opening channels must not fill them), nor for
        ``EARLY_COOLDOWN`` after the user's last one on the target went unclaimed."""
        waiting, cooldown = self.service.early_upstreams, self.service.early_cooldown
        key = (self.user, self.target_name)
        now = asyncio.get_running_loop().time()
        if cooldown.get(key, 0.0) > now:
            return
        grants = self.service.live_grants_on(self.user, self.target_name)
        if (len(grants) != 1 or grants[0].awaiting_first_use or key in waiting
                or len(waiting) >= EARLY_UPSTREAMS_MAX):
            return
        self._start_upstream(grants[0].login)
        waiting.add(key)
        self._early = asyncio.get_running_loop().call_later(EARLY_CLAIM_WITHIN,
                                                            self._drop_upstream)

    def _claim(self) -> None:
        """The upstream connection is now the login's own (no longer connect_early's)."""
        self._release_early()
        self._claimed = True

    def _release_early(self) -> None:
        if self._early is not None:
            self._early.cancel()
            self._early = None
            self.service.early_upstreams.discard((self.user, self.target_name))

    def _start_upstream(self, login: str) -> None:
        self._drop_upstream()
        self._upstream_login = login
        loop = asyncio.get_running_loop()
        self._credentials, self._asked = loop.create_future(), loop.create_future()
        self._upstream = loop.create_task(
            self._connect_upstream(login, self._credentials, self._asked))

    async def _mint_credentials(self, grant: Any, credentials: asyncio.Future,
                                asked: asyncio.Future) -> None:
        """A fresh key and its certificate for ``grant``, handed to the waiting connection;
        none once the connection is dropped or failed (``credentials`` cancelled) or the grant
        has ended meanwhile (the connection then fails with that). A first-use grant's window
        starts here, once the target has been reached and ``asked`` for the login: an attempt
        that never gets there (the target down) leaves the window unstarted."""
        if grant.awaiting_first_use:
            await asyncio.wait({credentials, asked}, return_when=asyncio.FIRST_COMPLETED)
            if credentials.done():
                return
            try:
                grant = await self.service.use_grant(grant)
            except Exception as exc:  # noqa: BLE001 - e.g. a store error: the connection fails
                if not credentials.done():
                    credentials.set_exception(exc)
                return
        if credentials.done():
            return
        if not self.live():
            credentials.set_exception(ConnectionError(f"grant {grant.id} has ended"))
            return
        try:
            key = asyncssh.generate_private_key("ssh-ed25519")
            result = (key, await self.service.user_certificate(grant, key))
        except Exception as exc:  # noqa: BLE001 - the connection fails with it
            if not credentials.done():
                credentials.set_exception(exc)
        else:
            if not credentials.done():
                credentials.set_result(result)

    async def _connect_upstream(self, login: str, credentials: asyncio.Future,
                                asked: asyncio.Future) -> asyncssh.SSHClientConnection:
        """Log in to the target as ``login`` with the key and certificate that ``credentials``
        gets (``_mint_credentials``); until then the connection waits. A failure is audited
        once the login has claimed the connection (connect_early's are dropped silently)."""
        try:
            upstream = await asyncssh.connect(
                self.target.address, self.target.port, username=login,
                client_factory=lambda: _UpstreamClient(credentials, asked), client_keys=[],
                known_hosts=upstream_known_hosts(self.target),
                config=None, agent_path=None, preferred_auth="publickey",
                encryption_algs=PREFERRED_CIPHERS, connect_timeout=UPSTREAM_CONNECT_TIMEOUT,
                keepalive_interval=UPSTREAM_KEEPALIVE)
            if self._client_backed_up():
                self.follow_client(upstream)
            return upstream
        except Exception as exc:  # the connection, or minting its certificate (a store error)
            if not credentials.done():  # none is minted for a connection that failed
                credentials.cancel()
            if self._claimed and asyncio.current_task() is self._upstream:
                self.service.audit.emit("ssh.upstream.failed", self.user,
                                        target=self.target_name, login=login,
                                        grant=self.grant.id if self.grant else None,
                                        error=str(exc) or type(exc).__name__)
            raise

    # --- teardown (AccessService.Terminable) ------------------------------------------------------

    async def terminate(self, line: str, reason: str = "grant ended") -> None:
        """End every session with ``line`` on its stderr, then the connection itself."""
        for session in list(self.sessions):
            try:
                session.end_with(line, reason)
            except Exception:  # one session's failure never keeps the others open
                log.exception("ending a session of %s failed", self.user)
        self._drop_upstream()
        if self.conn is not None:
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.conn.close)

    def _drop_upstream(self) -> None:
        if self._early is not None:  # connect_early's, never claimed
            cooldown, now = self.service.early_cooldown, asyncio.get_running_loop().time()
            for key in [k for k, until in cooldown.items() if until <= now]:
                del cooldown[key]
            cooldown[(self.user, self.target_name)] = now + EARLY_COOLDOWN
        self._release_early()
        task, self._upstream = self._upstream, None
        if self._credentials is not None and not self._credentials.done():
            self._credentials.cancel()  # (a mint not begun yet then mints nothing)
        self._upstream_login = self._credentials = self._asked = None
        self._claimed = False
        if task is None:
            return
        if task.done():
            if not task.cancelled() and task.exception() is None:
                task.result().close()
        else:
            task.cancel()


class _UpstreamClient(asyncssh.SSHClient):
    """The proxy's side of a connection to a target: offers the one key and certificate
    ``credentials`` gets, when it gets them (``JumpConnection.connect_early``), and no other."""

    def __init__(self, credentials: asyncio.Future, asked: asyncio.Future):
        self._credentials: asyncio.Future | None = credentials
        self._asked = asked  # set once the target asks for the login (it has been reached)

    async def public_key_auth_requested(self) -> Any:
        credentials, self._credentials = self._credentials, None
        if not self._asked.done():
            self._asked.set_result(None)
        return [await credentials] if credentials is not None else None


class BridgeSession(asyncssh.SSHServerSession):
    """One client session channel bridged to one target session channel."""

    def __init__(self, jump: JumpConnection):
        self.jump = jump
        self.chan: asyncssh.SSHServerChannel | None = None
        self.up: asyncssh.SSHClientChannel | None = None
        self.kind, self.detail = "shell", None
        self.term: tuple[str, tuple[int, int, int, int], dict] | None = None
        self.recorder: AsciicastRecorder | None = None
        self.record: SessionRecord | None = None
        self.bytes_up = self.bytes_down = 0
        self.exit_status: int | None = None
        self.exit_signal: tuple | None = None
        self.end_reason = "closed"
        self._finished = False
        self._recorded_end = False
        self._inner_paused = False  # the client's session channel window is full
        # what the client sent before the target side was open (at most one packet: reading
        # is paused on the first one)
        self._early: list[tuple[bytes, int | None]] = []
        self._early_eof = False

    # --- client side (asyncssh.SSHServerSession) -------------------------------------------------

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: dict) -> bool:
        self.term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.detail = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.kind, self.detail = "subsystem", subsystem
        return True

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan
        self.jump.sessions.add(self)

    def session_started(self) -> None:
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        """Open the target side; whatever happens, a session that got a record gets its end."""
        try:
            await self._open_target()
        except Exception as exc:  # e.g. no file descriptor left for the recording, a store error
            log.exception("opening a session of %s failed", self.jump.user)
            self.end_reason = f"proxy error: {exc}"[:200]
            if self.record is None:  # (one with a record gets its end, with this reason)
                jump = self.jump
                jump.service.audit.emit("ssh.session.failed", jump.user, target=jump.target_name,
                                        login=jump.login, grant=jump.grant.id if jump.grant
                                        else None, kind=self.kind,
                                        error=(str(exc) or type(exc).__name__)[:300],
                                        **self._command_fields())
            self._fail_client("jit-proxy: the proxy could not open this session")
        finally:
            if self._finished:  # the client left while we were opening
                if self.up is not None:
                    self.up.close()
                self._record_end()

    def _fail_client(self, message: str) -> None:
        chan = self.chan
        if chan is None:
            return
        try:
            chan.write_stderr((message + "\r\n").encode())
        except (OSError, asyncssh.Error):
            pass
        try:
            chan.exit(255)
        except (OSError, asyncssh.Error):
            pass

    def _command_fields(self) -> dict[str, Any]:
        """The exec command (or subsystem) for an audit event, cut at ``AUDIT_COMMAND_LIMIT``
        characters (``cut_text``)."""
        if self.detail is None:
            return {"command": None}
        return cut_text("command", self.detail, AUDIT_COMMAND_LIMIT)

    async def _open_target(self) -> None:
        chan, jump, service = self.chan, self.jump, self.jump.service
        assert chan is not None and jump.grant is not None
        try:
            upstream = await jump.upstream()
        except Exception as exc:  # noqa: BLE001 - shown to the user, audited by _connect_upstream
            self.end_reason = "upstream failed"
            self._fail_client(unreachable(jump.target_name, jump.login, exc))
            return
        if self._finished:
            return
        now = service.clock.now()
        self.record = await service.store.create_session(
            user=jump.user, target=jump.target_name, login=jump.login or "", grant_id=jump.grant.id,
            kind=self.kind, detail=self.detail, now=now)
        service.live_sessions[self.record.id] = LiveSession(self.record, self.kill)
        if service.config.recording.terminal and (self.term is not None or self.kind == "shell"):
            # terminals, and shells without one (ssh -T): both are interactive work
            term_type, (cols, rows, _, _), _ = self.term or ("dumb", (80, 24, 0, 0), {})
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            path = (Path(service.config.recording_dir) / day /
                    f"session-{self.record.id}-{jump.user}-{jump.target_name}.cast")
            self.recorder = AsciicastRecorder(
                path, width=cols, height=rows, clock=service.clock,
                title=f"{jump.user} as {jump.login}@{jump.target_name} (grant {jump.grant.id})",
                env={"TERM": term_type},
                meta={"user": jump.user, "target": jump.target_name, "login": jump.login,
                      "grant": jump.grant.id, "session": self.record.id})
        service.audit.emit("ssh.session.start", jump.user, session=self.record.id,
                           target=jump.target_name, login=jump.login, grant=jump.grant.id,
                           kind=self.kind, pty=self.term is not None,
                           recording=str(self.recorder.path) if self.recorder else None,
                           **self._command_fields())
        if self._finished:
            return
        if not jump.live():  # the grant ended while this session was being set up
            self.end_reason = "grant ended"
            self._fail_client(f"jit-proxy: access to {jump.login}@{jump.target_name} has ended")
            return
        kwargs: dict[str, Any] = {"env": chan.get_environment(), "encoding": None,
                                  "window": UPSTREAM_WINDOW, "max_pktsize": UPSTREAM_MAX_PKTSIZE}
        if self.term is not None:
            term_type, term_size, term_modes = self.term
            kwargs.update(request_pty="force", term_type=term_type, term_size=term_size,
                          term_modes=term_modes)
        else:
            kwargs["request_pty"] = False
        if self.kind == "subsystem":
            kwargs["subsystem"] = self.detail
        elif self.kind == "exec":
            kwargs["command"] = self.detail
        try:
            self.up, _ = await upstream.create_session(lambda: UpstreamSession(self), **kwargs)
        except (asyncssh.Error, OSError) as exc:
            self.end_reason = "target refused"
            self._fail_client(f"jit-proxy: {jump.target_name} refused the session: {exc}")
            return
        if self._finished:
            return
        self.update_reading()
        for data, datatype in self._early:
            self.up.write(data, datatype)
        self._early.clear()
        if self._early_eof:
            self.up.write_eof()
        chan.resume_reading()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.bytes_up += len(data)
        if self.up is not None:
            self.up.write(data, datatype)
        else:
            self._early.append((data, datatype))
            assert self.chan is not None
            self.chan.pause_reading()  # until the target side is open

    def eof_received(self) -> bool:
        if self.up is not None:
            self.up.write_eof()
        else:
            self._early_eof = True
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if self.term is not None:
            self.term = (self.term[0], (width, height, pixwidth, pixheight), self.term[2])
        if self.up is not None:
            self.up.change_terminal_size(width, height, pixwidth, pixheight)
        if self.recorder is not None:
            self.recorder.resize(width, height)

    def signal_received(self, signal: str) -> None:
        if self.up is not None:
            self.up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.up is not None:
            self.up.send_break(msec)
            return True
        return False

    def pause_writing(self) -> None:
        self._inner_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._inner_paused = False
        self.update_reading()

    def update_reading(self) -> None:
        """Read from the target only while both the session channel and the client's outer
        channel have room: every buffer between target and client stays bounded."""
        if self.up is None:
            return
        if self._inner_paused or self.jump.outer_paused:
            self.up.pause_reading()
        else:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()
        self._finish()

    # --- target side (called by UpstreamSession) -------------------------------------------------

    def upstream_data(self, data: bytes, datatype: int | None) -> None:
        self.bytes_down += len(data)
        if self.recorder is not None:
            self.recorder.output(data)
        assert self.chan is not None
        self.chan.write(data, datatype)

    def upstream_closed(self) -> None:
        chan = self.chan
        if chan is None:
            return
        try:  # the channel may be half-closed (EOF sent); exit() still sends status and CLOSE
            if self.exit_signal is not None:
                signal, core_dumped, msg, lang = self.exit_signal
                chan.exit_with_signal(signal, core_dumped, msg, lang)
            elif self.exit_status is not None:
                chan.exit(self.exit_status)
            else:
                chan.close()
        except OSError:  # already closed by the client
            pass

    async def kill(self, line: str, reason: str) -> None:
        """End this one session (an operator's ``sessions kill``)."""
        self.end_with(line, reason)

    def end_with(self, line: str, reason: str = "grant ended") -> None:
        """Close this session (its grant ended, or the proxy stops): one line on stderr, then
        exit 255."""
        self.end_reason = reason
        chan = self.chan
        if chan is not None:
            nl = b"\r\n" if self.term else b"\n"
            try:
                chan.write_stderr((nl if self.term else b"") + line.encode() + nl)
            except (OSError, asyncssh.Error):
                pass  # EOF already sent: the exit status still goes out
            try:
                chan.exit(255)
            except OSError:
                pass
        if self.up is not None:
            self.up.close()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.jump.sessions.discard(self)
        self._record_end()

    def _record_end(self) -> None:
        """Close the recording and audit and store the end; once, and only after a start."""
        if self.record is None or self._recorded_end:
            return
        self._recorded_end = True
        service, jump = self.jump.service, self.jump
        service.live_sessions.pop(self.record.id, None)
        sha = None
        if self.recorder is not None:
            try:
                sha = self.recorder.close()
            except OSError as exc:
                log.error("closing recording %s failed: %s", self.recorder.path, exc)
        recording = str(self.recorder.path) if self.recorder else None
        service.audit.emit("ssh.session.end", jump.user, session=self.record.id,
                           target=jump.target_name, login=jump.login, grant=self.record.grant_id,
                           kind=self.kind, reason=self.end_reason, exit_status=self.exit_status,
                           bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                           recording=recording, recording_sha256=sha)
        service.spawn(service.store.end_session(
            self.record.id, now=service.clock.now(), reason=self.end_reason,
            recording=recording, recording_sha256=sha, bytes_up=self.bytes_up,
            bytes_down=self.bytes_down))


class UpstreamSession(asyncssh.SSHClientSession):
    """The target side of a ``BridgeSession``."""

    def __init__(self, bridge: BridgeSession):
        self.bridge = bridge

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.bridge.upstream_data(data, datatype)

    def eof_received(self) -> bool:
        chan = self.bridge.chan
        if chan is not None:
            try:
                chan.write_eof()
            except OSError:
                pass
        return True

    def exit_status_received(self, status: int) -> None:
        self.bridge.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.bridge.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.bridge.end_reason == "closed" and exc is not None:
            self.bridge.end_reason = f"target connection lost: {exc}"
        self.bridge.upstream_closed()
