"""The proxy's own SSH server: authentication, the command shell, and direct-tcpip.

What it is for: the front door. Users log in by the chains of ``auth.methods`` (publickey against
the config's keys; keyboard-interactive and password through PAM, see proxy.auth).
``ssh jit-proxy COMMAND`` runs a workflow command as the
authenticated user; ``ssh -J jit-proxy LOGIN@TARGET`` opens a direct-tcpip channel (RFC 4254 §7.2)
that, for a configured target and a user with a live grant on it, is handed to a ``JumpConnection``.
The server presents a host certificate (principals: ``ssh.host_names``) signed by the host CA.

What it must not do: open a channel to anything that is not a configured target (never an open
relay), accept remote forwarding (``-R``), agent or X11 forwarding, or log key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any

import asyncssh
from asyncssh.connection import SSHServerConnection

from proxy.auth import address_of
from proxy.auth.login import KbdIntLogin, known_user, password_login
from proxy.auth.methods import is_complete, next_methods
from proxy.runtime.service import AccessService
from proxy.ssh import tuning
from proxy.ssh.bridge import JumpConnection, batch_writes
from proxy.ssh.commands import HELP, run_command

log = logging.getLogger("jit_proxy.ssh")

MAX_ENV_VARS = 128            # environment variables one session channel may set (as sshd)
MAX_ENV_BYTES = 64 * 1024     # their names and values together, bytes


def _bounded_env_request(self: asyncssh.SSHServerChannel, packet: Any) -> bool:
    """asyncssh's handler of the "env" channel request (RFC 4254 §6.4), with a bound: it kept
    every variable a client sent, so one session that never started grew the proxy by what
    the client sent (found by an attack review: 200 MB). Beyond ``MAX_ENV_VARS`` variables
    (OpenSSH's sshd refuses past 128 too) or ``MAX_ENV_BYTES`` the request fails, which
    OpenSSH's client, sending env without asking for a reply, never notices."""
    name, value = packet.get_string(), packet.get_string()
    packet.check_end()
    env = self._env  # (asyncssh's own store, read by get_environment)
    size = getattr(self, "_jit_env_bytes", 0) + len(name) + len(value)
    if (name not in env and len(env) >= MAX_ENV_VARS) or size > MAX_ENV_BYTES:
        if not getattr(self, "_jit_env_refused", False):
            self._jit_env_refused = True  # type: ignore[attr-defined]
            log.warning("a session channel's environment passed %d variables or %d bytes; "
                        "its further env requests are refused", MAX_ENV_VARS, MAX_ENV_BYTES)
        return False
    self._jit_env_bytes = size  # type: ignore[attr-defined]
    env[name] = value
    return True


DRAIN_LIMIT = 30.0  # seconds a command session's output may wait for its client to read it

PROXY_CERT_NAME = "proxy"
# seconds: stdin that ends this soon after a requests --watch starts had nothing to say (ssh -n,
# cron, </dev/null); a later end is the user's Ctrl-D
NO_INPUT_EOF = 1.0


def _peer(conn: SSHServerConnection) -> str:
    peer = conn.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


class FrontDoor:
    """Owns the listener; builds one ``ProxyServer`` per client connection."""

    def __init__(self, service: AccessService):
        self.service = service
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self._keys_for: dict[str, list[bytes]] = {}
        self._keys_config: Any = None
        self._inner_base: asyncssh.SSHServerConnectionOptions | None = None
        self.connections: set[SSHServerConnection] = set()
        self._shells: dict[SSHServerConnection, int] = {}  # command sessions open per connection

    def user_key_blobs(self, user: str) -> list[bytes]:
        config = self.service.config
        if self._keys_config is not config:  # rebuilt after a reload
            self._keys_for = {name: [asyncssh.import_public_key(k).public_data for k in u.keys]
                              for name, u in config.users.items()}
            self._keys_config = config
        return self._keys_for.get(user, [])

    async def _host_keys(self) -> list[tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]]:
        cert = await self.service.host_certificate(PROXY_CERT_NAME,
                                                   list(self.service.config.ssh.host_names))
        return [(self.service.host_key, cert)]

    async def listen(self) -> tuple[str, int]:
        """Start listening on ``ssh.listen_address:listen_port``; returns the bound address."""
        cfg = self.service.config.ssh
        tuning.apply()  # asyncssh's per-packet work the relay does not need (see the module)
        asyncssh.SSHServerChannel._process_env_request = _bounded_env_request  # type: ignore
        # the inner server bridges bytes: no line editor (asyncssh's default wraps every session
        # in one, a call layer per packet even without a pty; measured ~10% on bulk transfers)
        self._inner_base = await asyncssh.SSHServerConnectionOptions.construct(
            config=None, server_host_keys=await self._host_keys(), agent_forwarding=False,
            encoding=None, line_editor=False,
            x11_forwarding=False, allow_scp=False, encryption_algs=list(cfg.ciphers),
            login_timeout=cfg.login_grace_time, keepalive_interval=60)
        self.acceptor = await asyncssh.listen(
            cfg.listen_address, cfg.listen_port, config=None,
            server_factory=lambda: ProxyServer(self), server_host_keys=await self._host_keys(),
            process_factory=self._process, encoding="utf-8", line_editor=True,
            agent_forwarding=False, x11_forwarding=False, allow_scp=False,
            encryption_algs=list(cfg.ciphers), login_timeout=cfg.login_grace_time,
            keepalive_interval=60, max_pktsize=32768,
            public_key_auth=True, kbdint_auth=True, password_auth=True)  # offered per auth.methods
        sock = self.acceptor.sockets[0].getsockname()
        self.service.ssh_port = sock[1]
        return sock[0], sock[1]

    async def renew_host_certificate(self) -> None:
        """Re-sign the proxy's host certificate when it passed half its life (call periodically)."""
        if self.acceptor is not None:
            self.acceptor.update(server_host_keys=await self._host_keys())

    def stop_accepting(self) -> None:
        """Close the listening sockets; established connections carry on."""
        if self.acceptor is not None:
            self.acceptor.close()

    def close(self) -> None:
        """Close the listener and every connection it accepted."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.close()

    # --- the command shell -----------------------------------------------------------------------

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        user = process.get_extra_info("username")
        conn = process.get_extra_info("connection")
        limit = self.service.config.ssh.max_sessions_per_connection
        if self._shells.get(conn, 0) >= limit:  # (a requests --watch each: bounded, as jumps)
            self.service.audit.emit("ssh.session.refused", user, why=f"more than {limit} "
                                    f"sessions on one connection")
            process.stderr.write(f"jit-proxy: at most {limit} sessions at once on one "
                                 f"connection\n")
            process.exit(1)
            return
        self._shells[conn] = self._shells.get(conn, 0) + 1
        try:
            await self._command_session(process, user)
        finally:
            left = self._shells.pop(conn) - 1
            if left:
                self._shells[conn] = left

    async def _command_session(self, process: asyncssh.SSHServerProcess, user: str) -> None:
        try:
            if process.subsystem:
                process.stderr.write(f"jit-proxy: no subsystem {process.subsystem!r} here\n")
                process.exit(1)
                return
            if process.command is not None:
                process.exit(await self._run(process, user, process.command))
                return
            await self._repl(process, user)
        except (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged):
            process.exit(1)
        except (asyncssh.ConnectionLost, BrokenPipeError):
            pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            process.stderr.write("jit-proxy: line too long\n")
            process.exit(2)

    async def _run(self, process: asyncssh.SSHServerProcess, user: str, line: str,
                   interactive: bool = False) -> int:
        try:
            result = await run_command(self.service, user, line)
        except Exception as exc:  # noqa: BLE001 - e.g. a store error: this command only fails
            log.exception("a command of %s failed", user)
            error = str(exc)[:300] or type(exc).__name__
            self.service.audit.emit("command.failed", user, command=line[:1000], error=error)
            (process.stdout if interactive else process.stderr).write(
                f"jit-proxy: internal error: {error}; try again, or tell the operator if it "
                f"persists\n")
            return 1
        self.service.audit.emit("command.run", user, command=line[:1000], status=result.status)
        process.stdout.write(result.out)
        # at the prompt, errors go in order with the rest (and get the terminal's line endings)
        (process.stdout if interactive else process.stderr).write(result.err)
        if not await _drained(process):
            return result.status
        for delay, text in result.stream or ():  # a recording, at its own pace
            if delay:
                await asyncio.sleep(delay)
            process.stdout.write(text)
            if not await _drained(process):  # a player that does not read is dropped
                return 1
        if result.follow is not None:  # requests --watch: until the client goes away
            async def until_gone() -> None:
                """Returns when the watch should end: the client left, Ctrl-C at a terminal
                (BreakReceived), or Ctrl-D. Input is discarded; a resize or signal is no end.
                Stdin that ends at once (ssh -n, cron, </dev/null) is no goodbye: then only
                the client leaving ends the watch."""
                started = asyncio.get_running_loop().time()
                while True:
                    try:
                        if not await process.stdin.read(4096):
                            break
                    except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                        continue
                    except Exception:  # Ctrl-C at a terminal, the channel gone
                        return
                if asyncio.get_running_loop().time() - started < NO_INPUT_EOF:
                    with contextlib.suppress(Exception):
                        await process.channel.wait_closed()
            gone = asyncio.ensure_future(until_gone())
            try:
                while True:
                    item = asyncio.ensure_future(result.follow.__anext__())
                    done, _ = await asyncio.wait({item, gone},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if item not in done:
                        item.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                            await item  # the generator must stop running before aclose()
                        break
                    try:
                        process.stdout.write(item.result())
                    except StopAsyncIteration:
                        break
                    if not await _drained(process):  # a watcher that does not read is dropped,
                        break                            # not buffered for
            finally:
                gone.cancel()
                await result.follow.aclose()
        return result.status

    async def _repl(self, process: asyncssh.SSHServerProcess, user: str) -> None:
        process.stdout.write(f"jit-proxy: hello {user}.\n" + HELP +
                             "At this prompt: 'exit' or Ctrl-D leaves, Ctrl-C clears the line.\n")
        while True:
            process.stdout.write("jit-proxy> ")
            try:
                line = await process.stdin.readline()
            except asyncssh.BreakReceived:  # Ctrl-C with the line editor
                process.stdout.write("^C\n")
                continue
            except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
                continue
            if not line:
                break
            line = line.strip()
            if line in ("exit", "quit", "logout"):
                break
            if line:
                await self._run(process, user, line, interactive=True)
            if not await _drained(process):  # no next command before the last answer left
                break
        process.exit(0)

    # --- jump connections ------------------------------------------------------------------------

    def open_jump(self, user: str, dest_host: str, dest_port: int, peer: str,
                  client: "ProxyServer | None" = None) -> Any:
        """Check a direct-tcpip request and return the coroutine that builds its inner server;
        ``client`` is the connection it came on (whose socket backing up pauses the target).

        Raises:
            asyncssh.ChannelOpenError: not a configured target/port, or no live grant on it.
        """
        service = self.service
        target = service.config.targets.get(dest_host)
        if target is None or target.kind != "ssh" or dest_port not in (22, target.port):
            if target is not None and target.kind == "ssh":
                why = f"{dest_host} is reached on port 22 through the proxy, not {dest_port}"
            elif target is not None:
                why = f"{dest_host} is a {target.kind} target: use its own client, not ssh -J"
            else:
                why = (f"{dest_host}:{dest_port} is not a target of this proxy; "
                       f"'ssh jit-proxy targets' lists yours")
            service.audit.emit("ssh.forward.refused", user, dest_host=dest_host[:255],
                               dest_port=dest_port, peer=peer, why=why[:300])
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"jit-proxy: {why}")
        if not service.live_grants_on(user, dest_host):
            service.audit.emit("ssh.session.refused", user, target=dest_host, peer=peer,
                               why="no active grant")
            return self._no_grant(user, dest_host)
        return self._inner(user, dest_host, peer, client)

    async def _no_grant(self, user: str, target: str) -> Any:
        """Refuse the channel, saying which grant is missing and how to get it."""
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            " ".join((await self.service.describe_denial(user, target, None)).split()))

    async def _inner(self, user: str, target: str, peer: str,
                     client: "ProxyServer | None" = None) -> "ChannelTransportSession":
        """The inner server for ``ssh -J``, presenting the proxy's host certificate for
        ``target``. Raises ChannelOpenError (that channel fails, audited as
        ``ssh.session.refused``) when the certificate cannot be minted, e.g. a store error."""
        try:
            cert = await self.service.host_certificate(f"target:{target}", [target])
        except Exception as exc:  # noqa: BLE001 - else asyncssh closes the whole connection
            why = f"the proxy could not mint its host certificate for {target}: {exc}"
            self.service.audit.emit("ssh.session.refused", user, target=target, peer=peer,
                                    why=why[:300])
            raise asyncssh.ChannelOpenError(  # (OpenSSH shows about 100 characters of it)
                asyncssh.OPEN_CONNECT_FAILED,
                f"jit-proxy: cannot open a session to {target}: {exc}"[:300]) from None
        jump = JumpConnection(self.service, user, target, peer, client)
        options = asyncssh.SSHServerConnectionOptions(
            self._inner_base, server_factory=lambda: jump,
            server_host_keys=[(self.service.host_key, cert)])
        conn = SSHServerConnection(asyncio.get_running_loop(), options, wait=None)
        return ChannelTransportSession(conn, jump)


async def _drained(process: asyncssh.SSHServerProcess) -> bool:
    """Whether what was written to ``process`` left within ``DRAIN_LIMIT`` seconds: its
    channel's window (drain) and then the client's socket, whose flow control asyncssh ignores
    (ProxyServer.socket_full). A command session waits here so that a client that stops
    reading stops its commands instead of growing the proxy."""
    async def drained() -> None:
        await process.stdout.drain()
        client = process.get_extra_info("connection").get_owner()
        while client.socket_full:
            await client.socket_drained.wait()
    try:
        await asyncio.wait_for(drained(), DRAIN_LIMIT)
    except (asyncio.TimeoutError, ConnectionError, asyncssh.Error):
        return False
    return True


class ChannelTransportSession(asyncssh.SSHTCPSession):
    """Runs the inner SSH server connection on the client's direct-tcpip channel (the channel is
    its transport) and passes the channel's flow control on: asyncssh's connections ignore
    ``pause_writing``, so the jump connection stops reading from the target instead, and the
    channel's send buffer stays bounded whatever window the client announces."""

    def __init__(self, conn: SSHServerConnection, jump: JumpConnection):
        self._conn = conn
        self._jump = jump

    def connection_made(self, chan: Any) -> None:
        self._conn.connection_made(chan)
        # the inner connection's packets (up to the client's 32 KiB plus framing) go into the
        # outer channel once per loop turn, so it sends full 32 KiB packets, not one and a scrap
        batch_writes(self._conn, join=True)

    def session_started(self) -> None:
        self._conn.session_started()

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._conn.data_received(data, datatype)

    def eof_received(self) -> bool:
        self._conn.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self._jump.outer_writing_paused(True)

    def resume_writing(self) -> None:
        self._jump.outer_writing_paused(False)


class ProxyServer(asyncssh.SSHServer):
    """One client connection to the proxy itself."""

    def __init__(self, door: FrontDoor):
        self.door = door
        self.conn: SSHServerConnection | None = None
        self.username: str | None = None
        self.peer = "unknown"
        self.authenticated = False
        self.kbdint: KbdIntLogin | None = None
        self.attempts = 0  # PAM attempts, each audited (and counted) by itself
        self.tries = 0  # failed attempts of any method, for ssh.max_auth_tries
        self._closing = False
        # clear while the client's socket is past its transport's high water mark
        self.socket_drained = asyncio.Event()
        self.socket_drained.set()
        self.jumps: set[JumpConnection] = set()  # the ssh -J connections it carries

    def connection_made(self, conn: SSHServerConnection) -> None:
        self.conn = conn
        batch_writes(conn)
        # asyncssh ignores its transport's flow control: without this, a client that stops
        # reading its socket while announcing huge windows has the proxy buffer all a target
        # sends
        conn.pause_writing = lambda: self._socket_backed_up(True)  # type: ignore[method-assign]
        conn.resume_writing = lambda: self._socket_backed_up(False)  # type: ignore[method-assign]
        self._original_send_success = conn.send_userauth_success
        conn.send_userauth_success = self._send_success  # type: ignore[method-assign]
        self.door.connections.add(conn)
        self.peer = _peer(conn)
        self.address = address_of(self.peer)
        if not self.door.service.admit(self.address):
            # like sshd's MaxStartups: unauthenticated connections are a bounded resource
            asyncio.get_running_loop().call_soon(
                conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS,
                "jit-proxy: too many unauthenticated connections; try again later")
            self.admitted = False
            return
        self.admitted = True

    async def begin_auth(self, username: str) -> bool:
        """A new user name: the chains of ``auth.methods`` start again (RFC 4252 §5). With
        ``auth.identities: system`` a configured user's system groups are looked up now, before
        any method can succeed: a channel the client opens right after its login must see them
        (a lookup after USERAUTH_SUCCESS raced the client's first request and jump)."""
        self.username = username
        self.completed: list[str] = []
        self._succeeding: str | None = None
        if self.kbdint is not None:
            self.kbdint.close()
        self.kbdint = None
        service = self.door.service
        # a user's lockout (failed passwords) holds back passwords and PAM; a key, which nobody
        # can guess, is refused only while the source address is locked out
        locked = service.locked_subjects(username, self.peer, guessable=False) or (
            [] if self._offers("publickey") else service.locked_subjects(username, self.peer))
        self.locked = bool(locked)
        if locked:  # no method offered now can succeed
            service.audit_unauthenticated("auth.locked", username, self.peer, subjects=locked)
            if self.conn is not None:  # say why, whichever method the client tries first
                self.conn.send_auth_banner(service.lockout_text(locked) + "\n")
        if service.config.auth.identities == "system" and username in service.config.users:
            # (a user with keys here; PAM logins look theirs up as they check the password, and
            # names nobody configured are not looked up before they authenticate)
            await known_user(service, username)  # (refreshes its system groups)
        return True

    def _offers(self, method: str) -> bool:
        chains = self.door.service.config.auth.methods
        return method in next_methods(chains, getattr(self, "completed", []))

    def public_key_auth_supported(self) -> bool:
        return self._offers("publickey")

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._succeeding = None
        if self.door.service.locked_out(username, self.peer, guessable=False):
            return False  # the address is locked out (now): even the right key waits for its end
        blob = key.public_data
        # compare against every key so timing does not tell which user has how many keys
        ok = any([hmac.compare_digest(blob, k) for k in self.door.user_key_blobs(username)])
        self._succeeding = "publickey" if ok else None
        if not ok:
            self._failed()
        return ok

    def _failed(self) -> None:
        """One more failed attempt (a key refused, a PAM login failed or left for another)."""
        self.tries += 1
        self._too_many()

    def _too_many(self) -> bool:
        """True, and the connection ends, once ``ssh.max_auth_tries`` attempts failed (like
        sshd's MaxAuthTries), so one connection cannot try without end."""
        if self.tries < self.door.service.config.ssh.max_auth_tries:
            return False
        if self.conn is not None and not self._closing:
            self._closing = True
            self.door.service.audit_unauthenticated("auth.failure", self.username or "",
                                                    self.peer, why="too many attempts",
                                                    tries=self.tries)
            asyncio.get_running_loop().call_soon(
                self.conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "jit-proxy: too many authentication failures")
        return True

    def password_auth_supported(self) -> bool:
        return self._offers("password")

    async def validate_password(self, username: str, password: str) -> bool:
        self._succeeding = None
        if self._too_many():
            return False
        self.attempts += 1
        after_key = "publickey" in self.completed  # a chain's password step: its own count
        ok = await password_login(self.door.service, username, password, self.peer, "password",
                                  after_key=after_key)
        self._succeeding = "password" if ok else None
        if not ok:
            service = self.door.service
            locked = service.locked_subjects(username, self.peer, after_key=after_key)
            if locked and self.conn is not None and not self._closing:
                self.conn.send_auth_banner(service.lockout_text(locked) + "\n")  # the password
                # method has no other way to say why (the banner at begin_auth is held back
                # when a key may do)
            self._failed()
        return ok

    def kbdint_auth_supported(self) -> bool:
        return self._offers("keyboard-interactive")

    async def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        self._succeeding = None
        if self.kbdint is not None and self.kbdint.tx is not None:
            self.kbdint.close()  # a client starting over ends the conversation it left
            self._failed()
        if self._too_many():
            return False
        self.attempts += 1
        grace = float(self.door.service.config.ssh.login_grace_time)
        self.kbdint = KbdIntLogin(self.door.service, username, self.peer, answer_timeout=grace,
                                  after_key="publickey" in self.completed)
        return self._kbdint_result(await self.kbdint.challenge())

    async def validate_kbdint_response(self, username: str, responses: list[str]) -> Any:
        if self.kbdint is None:
            return False
        return self._kbdint_result(await self.kbdint.respond(list(responses)))

    def _kbdint_result(self, challenge: Any) -> Any:
        if challenge is True:
            self._succeeding = "keyboard-interactive"
        elif challenge is False:
            self._failed()
        return challenge

    async def _send_success(self) -> None:
        """Stands in for the connection's ``send_userauth_success``: a method that completes only
        part of a chain answers USERAUTH_FAILURE with partial success (RFC 4252 §5.1), offering
        the chain's next methods; the login succeeds when a whole chain is done."""
        assert self.conn is not None
        method, self._succeeding = self._succeeding, None
        chains = self.door.service.config.auth.methods
        if method is None or method not in next_methods(chains, self.completed):
            self.conn.send_userauth_failure(False)  # only a method the chains offer now counts
            return
        self.completed.append(method)
        if is_complete(chains, self.completed):
            await self._original_send_success()
        else:
            self.door.service.audit.emit("auth.partial", self.username or "", method=method,
                                         peer=self.peer, completed=",".join(self.completed))
            self.conn.send_userauth_failure(True)

    async def auth_completed(self) -> None:
        self.authenticated = True
        self._leave()
        if self.kbdint is not None:
            self.kbdint.close()
        service = self.door.service  # (its system groups: looked up in begin_auth)
        service.auth_succeeded(self.username or "")
        service.audit.emit("auth.success", self.username or "", method=",".join(self.completed),
                           peer=self.peer)

    @property
    def socket_full(self) -> bool:
        """Whether the client's socket is past its transport's high water mark."""
        return not self.socket_drained.is_set()

    def _socket_backed_up(self, full: bool) -> None:
        """The client's socket cannot take more (or has drained): every connection to a
        target this client is fed from stops (or resumes) reading."""
        (self.socket_drained.clear if full else self.socket_drained.set)()
        for jump in list(self.jumps):
            jump.follow_client()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        assert self.username is not None
        return self.door.open_jump(self.username, dest_host, dest_port, self.peer, self)

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.door.service.audit.emit("ssh.forward.refused", self.username or "",
                                     dest_path=dest_path[:255], peer=self.peer,
                                     why="unix socket forwarding")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.door.service.audit.emit("ssh.forward.refused", self.username or "",
                                     listen_host=listen_host, listen_port=listen_port,
                                     peer=self.peer, why="remote forwarding")
        return False

    def _leave(self) -> None:
        if getattr(self, "admitted", False):
            self.admitted = False
            self.door.service.leave(self.address)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self.conn is not None:
            self.door.connections.discard(self.conn)
        audit = self.door.service.audit
        if self.kbdint is not None:
            self.kbdint.close()
        if not self.authenticated and self.username is not None and not self.attempts:
            # (no password tried: no guess at the user's.) ``why`` is how far the login got;
            # ``ended`` how the connection ended (OpenSSH just closes it after a refusal)
            why = ("locked out" if self.locked else
                   f"left after {','.join(self.completed)} of a chain" if self.completed else
                   "no valid key" if self.tries else "no key offered")
            self.door.service.auth_failure(
                self.username, self.peer, guessable=False,
                method="publickey" if self._offers("publickey") else "none", why=why,
                ended=str(exc)[:512] if exc else "the client disconnected")
        elif isinstance(exc, asyncssh.ProtocolError):  # malformed input ends this connection only
            audit.emit("ssh.protocol.error", self.username or "", peer=self.peer,
                       error=str(exc)[:512])
