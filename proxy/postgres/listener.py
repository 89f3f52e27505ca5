"""The PostgreSQL listener: TLS, SCRAM with the grant's one-time secret (or a PAM password), relay to
the ephemeral role.

What it is for: one asyncio server speaking the PostgreSQL v3 protocol (PostgreSQL docs, "Message
Flow") through ``proxy.pgwire``. Per client: SSLRequest is answered with TLS (certificate from the
internal X.509 CA), GSSENCRequest is declined, CancelRequest is mapped to the right upstream
backend, and a StartupMessage whose ``database`` names a PostgreSQL target starts SCRAM-SHA-256
against the user's one-time secret (``db-login``). Then the proxy logs in upstream as the grant's
ephemeral role (TLS verified per the target's settings), hands the client its own BackendKeyData,
and relays both ways with backpressure, auditing every Query, Parse and Execute. At the grant's end
the client gets a FATAL naming the access that ended.

What it must not do: accept a StartupMessage without TLS, tell a client which part of its login
was wrong, show the role's password, buffer a whole result (server-to-client bytes stream through
as they come), or cut a server message in half when it injects its own FATAL.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import scramp

from ca.keys import write_secret_file
from ca.x509 import X509CertificateAuthority
from proxy.access.duration import format_duration
from proxy.access.model import Grant
from proxy.config import NAME_PATTERN, PostgresTarget
from proxy.pgwire import (ADMIN_SHUTDOWN, AUTH_MESSAGE_LIMIT, CONNECTION_FAILURE,
                          INTERNAL_ERROR, INVALID_AUTHORIZATION_SPECIFICATION, INVALID_PASSWORD,
                          AuthenticationCleartextPassword, AuthenticationMD5Password,
                          AuthenticationOk, AuthenticationSASL, AuthenticationSASLContinue,
                          AuthenticationSASLFinal, BackendKeyData, Bind, CancelRequest, Close,
                          ErrorResponse, Execute, Frame, FrameBoundaries, FunctionCall,
                          GSSENCRequest, MessageDecoder, NegotiateProtocolVersion, NoticeResponse,
                          ParameterStatus, Parse, PasswordMessage, ProtocolError, Query,
                          ReadyForQuery, SASLInitialResponse, SASLResponse, SSLRequest,
                          StartupDecoder, StartupMessage, Terminate, decode_backend,
                          decode_frontend, decode_password_message, decode_sasl_initial_response,
                          decode_sasl_response, error_response, gssenc_response, ssl_response)
from proxy.audit.log import cut_text
from proxy.auth.login import password_login
from proxy.postgres.provisioner import upstream_ssl
from proxy.postgres.roles import RoleManager
from proxy.postgres.scram import ScramError, ScramServer
from proxy.postgres.secrets import OneTimeSecrets, dummy_verifier
from proxy.postgres.sql import redact_passwords
from proxy.postgres.statements import (MAX_ALTERNATIVES, PORTAL, STATEMENT, PreparedStatements,
                                       TooManyPending)
from proxy.runtime.service import AccessService, LiveSession

log = logging.getLogger("jit_proxy.postgres")

READ_SIZE = 65536
UPSTREAM_TIMEOUT = 15.0
AUDIT_SQL_LIMIT = 65536          # characters of SQL kept in one db.query event
# startup parameters passed on to the target; others (notably ``options``) are dropped
PASSED_PARAMETERS = ("DateStyle", "TimeZone", "extra_float_digits", "search_path")
# client encodings whose bytes read the same as UTF-8 for SQL syntax (no multibyte sequence can
# hide a quote or a backslash); anything else would let the audited text differ from what runs
SAFE_CLIENT_ENCODINGS = {"UTF8", "UNICODE", "SQLASCII", "AUTO"}


# the extended-query messages a Sync ends (PostgreSQL protocol, "Extended Query"); COPY data
EXTENDED_QUERY = frozenset((b"P", b"B", b"E", b"D", b"C", b"H"))
COPY_DATA = frozenset((b"d", b"c", b"f"))
# SQL that makes or drops statements or portals under names the protocol uses too, or may do
# so unseen: dynamic SQL (a DO block, a function's EXECUTE) can spell PREPARE from pieces
SQL_LEVEL_NAMES = re.compile(
    r"\b(prepare|deallocate|discard|declare|close|fetch|move|do|execute)\b", re.IGNORECASE)
# statements that change the client encoding are refused before they reach the server (the
# ParameterStatus watch ends the session if one gets there by another route, e.g. dynamic SQL)
ENCODING_CHANGE = re.compile(r"client_encoding|\bset\s+names\b", re.I)


def safe_encoding(name: str) -> bool:
    """Whether a client_encoding name (any spelling: 'utf-8', UTF8, "'UTF8'") is one of them."""
    return name.strip(" '\"").upper().replace("-", "").replace("_", "") in SAFE_CLIENT_ENCODINGS


PARAMS_AUDITED = 50        # Bind parameters kept in one db.query event
PARAM_AUDIT_LIMIT = 256    # characters of one parameter kept


def _params(bind: Bind) -> list[str | None]:
    """Bind parameter values for the audit: text as text, binary as hex, NULL as None, each cut
    to PARAM_AUDIT_LIMIT characters."""
    out: list[str | None] = []
    for i, value in enumerate(bind.params[:PARAMS_AUDITED]):
        if value is None:
            out.append(None)
        elif bind.param_format(i) == 1:
            out.append("\\x" + value[:PARAM_AUDIT_LIMIT // 2].hex())
        else:
            out.append(value.decode("utf-8", "replace")[:PARAM_AUDIT_LIMIT])
    return out


@dataclass
class _CancelTarget:
    address: str
    port: int
    process_id: int
    secret_key: int


class PostgresFrontDoor:
    """Owns the PostgreSQL listener, the one-time secrets and the cancel key map."""

    def __init__(self, service: AccessService, roles: RoleManager, x509: X509CertificateAuthority):
        self.service = service
        self.roles = roles
        self.x509 = x509
        self.secrets = OneTimeSecrets()
        dummy_verifier()  # derived now, not during the first failed login
        self.cancel_keys: dict[tuple[int, int], _CancelTarget] = {}
        self.server: asyncio.base_events.Server | None = None
        self.tls: ssl.SSLContext | None = None
        self.port = 0
        self.clients: set[PgClient] = set()

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.service.config
        assert cfg.postgres is not None
        cert = self.x509.issue_server_certificate(
            list(cfg.postgres.host_names), now=self.service.clock.now(),
            validity=cfg.ca.host_certificate_validity)
        directory = Path(cfg.state_dir) / "pg_tls"
        directory.mkdir(mode=0o700, exist_ok=True)
        chain, key = directory / "server.pem", directory / "server.key"
        for path, data in ((chain, cert.chain_pem), (key, cert.key_pem)):
            tmp = path.with_name(path.name + ".new")
            tmp.unlink(missing_ok=True)
            write_secret_file(tmp, data)
            os.replace(tmp, path)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(chain, key)
        return ctx

    async def listen(self) -> tuple[str, int]:
        cfg = self.service.config.postgres
        assert cfg is not None
        self.tls = self._tls_context()
        self.server = await asyncio.start_server(self._accept, cfg.listen_address,
                                                 cfg.listen_port, limit=READ_SIZE)
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        return sock[0], sock[1]

    def renew_certificate(self) -> None:
        """A fresh server certificate for new connections (call at the host certificate half-life)."""
        self.tls = self._tls_context()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = PgClient(self, reader, writer)
        if not self.service.admit(client.address):
            writer.write(error_response("FATAL", "53300", "jit-proxy: too many unauthenticated "
                                                          "connections; try again later"))
            writer.close()
            return
        client.admitted = True
        self.clients.add(client)
        try:
            await client.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass
        except Exception:  # one connection's failure never touches the others
            log.exception("PostgreSQL client connection failed")
        finally:
            client.leave_preauth()
            self.clients.discard(client)
            client.abort()

    # --- GrantHooks ------------------------------------------------------------------------------

    async def granted(self, grant: Grant) -> None:
        pass

    async def window_started(self, grant: Grant) -> None:
        pass

    def ended(self, grant: Grant) -> None:
        self.secrets.forget_grant(grant.id)

    # --- one-time secrets (db-login) -------------------------------------------------------------

    def mint_secret(self, grant: Grant) -> str:
        cfg = self.service.config.postgres
        assert cfg is not None
        return self.secrets.mint(grant.user, grant.target, grant.id, self.service.clock.now(),
                                 cfg.secret_ttl)

    # --- CancelRequest ---------------------------------------------------------------------------

    async def cancel(self, request: CancelRequest, peer: str) -> None:
        """Forward a CancelRequest for one of our BackendKeyData to the upstream backend; unknown
        keys are ignored (PostgreSQL answers a CancelRequest with nothing either way)."""
        target = self.cancel_keys.get((request.process_id, request.secret_key))
        if target is None:  # PostgreSQL ignores unknown keys silently; the audit is rate-limited
            self.service.audit_unauthenticated("db.cancel", "", peer, known=False)
            return
        self.service.audit.emit("db.cancel", "", peer=peer, known=True)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.address, target.port), UPSTREAM_TIMEOUT)
        try:
            writer.write(CancelRequest(target.process_id, target.secret_key).encode())
            await writer.drain()
            await asyncio.wait_for(reader.read(1), 5)  # the server closes when done
        finally:
            writer.close()


class _Binding(NamedTuple):
    """What a Bind made a portal mean, as audited for its Executes."""
    statement: str
    sql: str
    instead: list[str]  # its SQL if unanswered messages of earlier batches fail
    more: bool          # and there are more such than ``instead`` lists
    params: list


class PgClient:
    """One client connection, from the first byte to the last."""

    def __init__(self, door: PostgresFrontDoor, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.door = door
        self.service = door.service
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        self.address = peer[0] if peer else "unknown"
        self.admitted = False
        self.user = ""
        self.target_name = ""
        self.grant: Grant | None = None
        self.role = ""
        self.session_id: int | None = None
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.statements = PreparedStatements()  # statements: their SQL; portals: _Binding
        self._extended_open = False  # extended-query messages sent since the last Sync
        self._syncs_since_start = 0  # Syncs sent since the last Query or Execute
        self._copy_announced = False  # the server sent CopyInResponse since then
        self._copy_in = False         # the client is sending COPY data
        self._sql_level_names = False  # SQL-level PREPARE, DEALLOCATE, DISCARD or cursors seen
        self._standard_strings = True  # the server's standard_conforming_strings (redaction)
        self.bytes_up = self.bytes_down = 0
        self.ending: str | None = None
        self.ending_reason = "grant ended"
        self.end_reason = "closed"
        # ParameterStatus and ReadyForQuery read; Parse/Bind/CloseComplete, ErrorResponse and
        # CopyInResponse counted
        self._boundaries = FrameBoundaries(watch=b"SZ", mark=b"123EG")
        self._pump: asyncio.Task | None = None
        self._reading_upstream = False

    # --- plumbing --------------------------------------------------------------------------------

    def leave_preauth(self) -> None:
        if self.admitted:
            self.admitted = False
            self.service.leave(self.address)

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _fatal(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        try:
            self.writer.write(error_response("FATAL", sqlstate, message, hint=hint))
            await asyncio.wait_for(self.writer.drain(), 5)  # a client that does not read
        except (ConnectionError, RuntimeError, OSError, asyncio.TimeoutError):
            pass

    def abort(self) -> None:
        """Drop both connections now (no TLS goodbye a stalled peer could hold up)."""
        for w in (self.writer, self.up_writer):
            if w is not None:
                w.transport.abort()

    async def _read_frame(self, frames: MessageDecoder, reader: asyncio.StreamReader,
                          timeout: float) -> Frame:
        while (frame := frames.next_frame()) is None:
            data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
            if not data:
                raise ConnectionError("peer closed the connection")
            frames.feed(data)
        return frame

    # --- the connection --------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.service.config
        assert cfg.postgres is not None
        grace = cfg.ssh.login_grace_time
        try:
            async with asyncio.timeout(grace):  # one deadline for the whole login, not per read
                startup = await self._startup(grace)
                if startup is None:
                    return
                # until authenticated a client may only send password messages (64 KiB at most)
                auth_frames = MessageDecoder(AUTH_MESSAGE_LIMIT, allowed_types=frozenset({b"p"}))
                if not await self._authenticate(startup, auth_frames, grace):
                    return
                if auth_frames.buffered:
                    raise ProtocolError("the client sent messages before authentication ended")
            frames = MessageDecoder.for_frontend_messages(cfg.postgres.max_message_length)
            if not await self._connect_upstream(startup):
                return
            await self._relay(frames)
        except ProtocolError as exc:
            self.service.audit.emit("db.protocol.error", self.user or "", peer=self.peer,
                                    target=self.target_name or None, sqlstate=exc.sqlstate,
                                    error=exc.message[:500])
            self.end_reason = f"protocol error: {exc.message[:200]}"
            await self._fatal(exc.sqlstate, exc.message)
        except asyncio.TimeoutError:
            if self.session_id is None:
                self.end_reason = "login timed out"
                await self._fatal(INVALID_AUTHORIZATION_SPECIFICATION,
                                  "jit-proxy: login timed out")
            else:
                self.end_reason = self.ending_reason if self.ending else "timeout"
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            raise  # the client or the server went away
        except Exception as exc:  # e.g. a store error: this connection only, said and audited
            log.exception("PostgreSQL connection from %s failed", self.peer)
            error = str(exc)[:500] or type(exc).__name__
            self.service.audit.emit("db.session.failed", self.user or "", peer=self.peer,
                                    target=self.target_name or None,
                                    grant=self.grant.id if self.grant else None,
                                    session=self.session_id, error=error)
            self.end_reason = f"proxy error: {error}"[:200]
            await self._fatal(INTERNAL_ERROR, f"jit-proxy: internal error: {error}")
        finally:
            await self._finish()

    async def _startup(self, grace: float) -> StartupMessage | None:
        decoder = StartupDecoder()
        tls = False
        while True:
            packet = decoder.next_message()
            if packet is None:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), grace)
                if not data:
                    return None
                decoder.feed(data)
                continue
            if isinstance(packet, SSLRequest):
                await self._send(ssl_response(True))
                assert self.door.tls is not None
                await self.writer.start_tls(self.door.tls)
                tls = True
            elif isinstance(packet, GSSENCRequest):
                await self._send(gssenc_response(False))
            elif isinstance(packet, CancelRequest):
                await self.door.cancel(packet, self.peer)
                return None
            else:
                assert isinstance(packet, StartupMessage)
                self._startup_rest = decoder.take_remaining()
                self.user = packet.parameters.get("user", "")
                self.target_name = packet.parameters.get("database") or self.user
                encoding = packet.parameters.get("client_encoding", "UTF8")
                if not safe_encoding(encoding):
                    self.service.audit_unauthenticated(
                        "db.login.refused", self.user, self.peer, target=self.target_name[:256],
                        why=f"client_encoding {encoding[:32]}")
                    await self._fatal("22023", "jit-proxy requires client_encoding UTF8 (the "
                                               "proxy audits statements as UTF-8)")
                    return None
                if not tls:  # a client's TLS setting, not a guess at a secret: no lockout
                    wanted = self.service.config.targets.get(self.target_name)
                    method = "pam" if getattr(wanted, "client_auth", "") == "pam" else "scram"
                    self.service.audit_unauthenticated("auth.failure", self.user, self.peer,
                                                       method=method,
                                                       target=self.target_name[:256],
                                                       why="no TLS")
                    await self._fatal(INVALID_AUTHORIZATION_SPECIFICATION,
                                      "jit-proxy requires TLS: connect with sslmode=require or "
                                      "stricter (verify-full with the CA from 'ssh jit-proxy ca "
                                      "--pg')")
                    return None
                return packet

    async def _authenticate(self, startup: StartupMessage, frames: MessageDecoder,
                            grace: float) -> bool:
        """SCRAM-SHA-256 (RFC 5802/7677) against the one-time secret; the same exchange and the
        same FATAL whether the grant, the target or the secret is what is wrong."""
        frames.feed(self._startup_rest)
        service, now = self.service, self.service.clock.now()
        target = service.config.targets.get(self.target_name)
        if isinstance(target, PostgresTarget) and target.client_auth == "pam":
            return await self._authenticate_pam(frames, grace)
        why = None
        verifier = None
        # a one-time secret cannot be guessed: only the source address's lockout holds it back,
        # and its failures count only against the address (see AccessService.auth_failure)
        if locked := service.locked_subjects(self.user, self.peer, guessable=False):
            why = "locked out"
            service.audit_unauthenticated("auth.locked", self.user, self.peer, method="scram",
                                          subjects=locked)
        elif not isinstance(target, PostgresTarget):
            why = "not a PostgreSQL target"
        else:
            verifier = self.door.secrets.lookup(self.user, self.target_name, now)
            if verifier is None:
                why = "no live one-time secret (db-login)"
            else:
                grant = service.usable(verifier.grant_id)
                if grant is None:
                    why = "grant not live"
                else:
                    self.grant = grant
        used = verifier if why is None and verifier is not None else dummy_verifier()
        server = ScramServer(used.auth_info())
        await self._send(AuthenticationSASL((ScramServer.MECHANISM,)).encode())
        server_final = ""
        try:
            first = decode_sasl_initial_response(await self._read_frame(frames, self.reader, grace))
            if first.mechanism != ScramServer.MECHANISM or first.data is None:
                raise ScramError("unsupported mechanism")
            challenge = server.server_first(first.data.decode("utf-8", "replace"))
            await self._send(AuthenticationSASLContinue(challenge.encode()).encode())
            final = decode_sasl_response(await self._read_frame(frames, self.reader, grace))
            server_final = server.server_final(final.data.decode("utf-8", "replace"))
            proof_ok = True
        except ScramError:
            proof_ok = False
        if why is None and not proof_ok:
            why = "wrong secret"
        if why is None and not self.door.secrets.consume(self.user, self.target_name, used):
            why = "secret already used"
        if why is not None:
            self.service.auth_failure(self.user, self.peer, method="scram", guessable=False,
                                      target=self.target_name[:256], why=why)
            # the same hint whatever was wrong (the database name is the client's own)
            named = re.fullmatch(NAME_PATTERN, self.target_name) and self.target_name
            ttl = format_duration(int(service.config.postgres.secret_ttl)) \
                if service.config.postgres else "minutes"
            await self._fatal(INVALID_PASSWORD, self._refusal(guessable=False), hint=(
                f"jit-proxy takes a one-time secret from db-login: it works once, within "
                f"{ttl}, while its grant is live. Get a new one with: ssh jit-proxy db-login "
                f"{named or 'TARGET'} (the database name you connect to is the target's name; "
                f"ssh jit-proxy targets lists yours)"))
            self.grant = None
            return False
        await self._send(AuthenticationSASLFinal(server_final.encode()).encode())
        assert self.grant is not None
        self.grant = await self.service.use_grant(self.grant)
        self.leave_preauth()
        self.service.auth_succeeded(self.user)
        self.service.audit.emit("auth.success", self.user, method="scram",
                                target=self.target_name, grant=self.grant.id, peer=self.peer)
        return True

    def _refusal(self, guessable: bool = True) -> str:
        """The FATAL text of a refused login: the same whatever was wrong, but saying so when
        the lockout that holds this kind of secret back is on (as the SSH side does)."""
        text = f'password authentication failed for user "{self.user[:63]}"'
        if locked := self.service.locked_subjects(self.user, self.peer, guessable):
            text += f" ({self.service.lockout_text(locked)})"
        return text

    async def _authenticate_pam(self, frames: MessageDecoder, grace: float) -> bool:
        """A target with ``client_auth: pam``: the user's password in cleartext (we only get here
        inside TLS) checked by PAM, then one of the user's live grants on the target. The same
        FATAL whether the password, the account or the grant is what is wrong."""
        await self._send(AuthenticationCleartextPassword().encode())
        password = decode_password_message(await self._read_frame(frames, self.reader, grace))
        target = self.service.config.targets[self.target_name]
        assert isinstance(target, PostgresTarget)
        ok = await password_login(self.service, self.user, password.password, self.peer, "pam",
                                  pam_service=target.pam_service, target=self.target_name[:256])
        grants = self.service.live_grants_on(self.user, self.target_name) if ok else []
        if ok and not grants:
            self.service.auth_failure(self.user, self.peer, method="pam",
                                      target=self.target_name[:256], why="no live grant")
        if not grants:
            await self._fatal(INVALID_PASSWORD, self._refusal())
            return False
        self.grant = await self.service.use_grant(max(grants, key=lambda g: g.ends_at))
        self.leave_preauth()
        self.service.auth_succeeded(self.user)
        self.service.audit.emit("auth.success", self.user, method="pam",
                                target=self.target_name, grant=self.grant.id, peer=self.peer)
        return True

    async def _connect_upstream(self, startup: StartupMessage) -> bool:
        grant = self.grant
        assert grant is not None
        target = self.service.config.targets.get(self.target_name)
        if not isinstance(target, PostgresTarget):  # a reload removed it during the login
            self.end_reason = "target removed"
            self.service.audit.emit("db.session.refused", self.user, target=self.target_name,
                                    grant=grant.id, why="the target is no longer configured")
            await self._fatal(CONNECTION_FAILURE, f"jit-proxy: {self.target_name} is no longer "
                                                  f"a configured PostgreSQL target")
            return False
        try:
            async with self.door.roles.login_window(grant) as creds:
                self.role = creds.name
                ready = await self._login_as(target, startup, creds.name, creds.password)
        except LookupError:
            self.end_reason = "grant ended"
            await self._fatal(ADMIN_SHUTDOWN, f"jit-proxy: access to {grant.login}@"
                                              f"{self.target_name} has ended")
            return False
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError,
                ConnectionError, scramp.ScramException, ProtocolError,
                asyncpg.PostgresError) as exc:
            self.service.audit.emit("db.upstream.failed", self.user, target=self.target_name,
                                    grant=grant.id, error=str(exc)[:500])
            await self._fatal(CONNECTION_FAILURE,
                              f"jit-proxy: cannot connect to {self.target_name}: {exc}")
            return False
        if ready is None:
            return False
        record = await self.service.store.create_session(
            user=self.user, target=self.target_name, login=grant.login, grant_id=grant.id,
            kind="postgres", detail=self.role, now=self.service.clock.now())
        self.session_id = record.id
        self.service.attach(grant.id, self)
        self.service.live_sessions[record.id] = LiveSession(record, self.terminate)
        self.service.audit.emit("db.session.start", self.user, session=record.id,
                                target=self.target_name, role=self.role, grant=grant.id,
                                peer=self.peer)
        if grant.id not in self.service.active:  # ended while we were logging in
            await self.terminate(f"access to {grant.login}@{self.target_name} has ended")
        return True

    async def _login_as(self, target: PostgresTarget, startup: StartupMessage, role: str,
                        password: str) -> bool | None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.address, target.port, limit=READ_SIZE),
            UPSTREAM_TIMEOUT)
        self.up_reader, self.up_writer = reader, writer
        tls = upstream_ssl(target)
        if tls:
            writer.write(SSLRequest().encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.readexactly(1), UPSTREAM_TIMEOUT)
            if answer != b"S":
                raise ConnectionError(f"{self.target_name} does not offer TLS")
            await writer.start_tls(tls, server_hostname=target.tls.server_name or target.address)
        params = {k: v for k, v in startup.parameters.items() if k in PASSED_PARAMETERS}
        # the proxy audits SQL as UTF-8, so the server must read it as UTF-8 too; and
        # pg_stat_activity says who is behind the role
        params.update({"user": role, "database": target.database, "client_encoding": "UTF8",
                       "application_name": f"jit-proxy {self.user}"[:63]})
        writer.write(StartupMessage(startup.protocol_version, params).encode())
        await writer.drain()
        return await self._upstream_login(role, password, bool(tls))

    async def _upstream_login(self, role: str, password: str, tls: bool) -> bool | None:
        """Authenticate upstream, pass ParameterStatus and notices on, hand the client our own
        BackendKeyData. Returns True when ready, None when the target refused (client told)."""
        assert self.up_reader is not None and self.up_writer is not None
        frames = MessageDecoder.for_backend_messages()
        client_scram: scramp.ScramClient | None = None
        to_client = [AuthenticationOk().encode()]
        while True:
            frame = await self._read_frame(frames, self.up_reader, UPSTREAM_TIMEOUT)
            msg = decode_backend(frame)
            out: bytes | None = None
            if isinstance(msg, AuthenticationSASL):
                if "SCRAM-SHA-256" not in msg.mechanisms:
                    raise ConnectionError("target offers no SCRAM-SHA-256")
                client_scram = scramp.ScramClient(["SCRAM-SHA-256"], role, password)
                out = SASLInitialResponse("SCRAM-SHA-256",
                                          client_scram.get_client_first().encode()).encode()
            elif isinstance(msg, AuthenticationSASLContinue):
                assert client_scram is not None
                client_scram.set_server_first(msg.data.decode())
                out = SASLResponse(client_scram.get_client_final().encode()).encode()
            elif isinstance(msg, AuthenticationSASLFinal):
                assert client_scram is not None
                client_scram.set_server_final(msg.data.decode())  # verifies the server
            elif isinstance(msg, AuthenticationCleartextPassword):
                if not tls:
                    raise ConnectionError("target asks for a cleartext password without TLS")
                out = PasswordMessage(password).encode()
            elif isinstance(msg, AuthenticationMD5Password):
                inner = hashlib.md5((password + role).encode()).hexdigest()
                out = PasswordMessage(
                    "md5" + hashlib.md5(inner.encode() + msg.salt).hexdigest()).encode()
            elif isinstance(msg, AuthenticationOk):
                pass
            elif isinstance(msg, (ParameterStatus, NoticeResponse, NegotiateProtocolVersion)):
                if isinstance(msg, ParameterStatus):
                    self._follow_parameter(msg)
                to_client.append(frame.encode())
            elif isinstance(msg, BackendKeyData):
                ours = (secrets.randbits(31) or 1, secrets.randbits(32) - 2**31)
                target = self.service.config.targets[self.target_name]
                self.door.cancel_keys[ours] = _CancelTarget(target.address, target.port,
                                                            msg.process_id, msg.secret_key)
                self.cancel_key = ours
                to_client.append(BackendKeyData(*ours).encode())
            elif isinstance(msg, ErrorResponse):
                self.service.audit.emit("db.upstream.failed", self.user, target=self.target_name,
                                        error=msg.fields.get("M", "")[:500],
                                        sqlstate=msg.fields.get("C"))
                await self._fatal(msg.fields.get("C", CONNECTION_FAILURE),
                                  f"jit-proxy: {self.target_name} refused the connection: "
                                  f"{msg.fields.get('M', '')}")
                return None
            elif isinstance(msg, ReadyForQuery):
                to_client.append(frame.encode())
                while (extra := frames.next_frame()) is not None:  # e.g. a NotificationResponse
                    to_client.append(extra.encode())
                if frames.buffered:  # from here on server bytes stream through unparsed
                    raise ProtocolError("the target sent a partial message right after login")
                await self._send(b"".join(to_client))
                return True
            else:
                raise ProtocolError(f"unexpected message {frame.type!r} from the target during "
                                    f"login", remote=True)
            if out is not None:
                self.up_writer.write(out)
                await self.up_writer.drain()

    # --- relaying --------------------------------------------------------------------------------

    async def _relay(self, frames: MessageDecoder) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._upstream_to_client())
        c2u = asyncio.get_running_loop().create_task(self._client_to_upstream(frames))
        done, pending = await asyncio.wait({self._pump, c2u},
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:  # a cancelled pump means terminate() cut an idle session
            if not task.cancelled() and isinstance(task.exception(), ProtocolError):
                raise task.exception()  # type: ignore[misc]
        if self.ending is not None:
            await self._fatal(ADMIN_SHUTDOWN, self.ending)
            self.end_reason = self.ending_reason

    async def _client_to_upstream(self, frames: MessageDecoder) -> None:
        assert self.up_writer is not None
        data = b""      # the last read; relayed as it came when it held whole messages only
        carried = True  # the decoder held bytes of an earlier read when ``data`` was fed
        while True:
            out = []
            while (frame := frames.next_frame()) is not None:
                self._audit_frame(frame)  # audited before a byte of it goes upstream
                out.append(frame)
                if frame.type == b"X":
                    self.up_writer.write(b"".join(f.encode() for f in out))
                    await self.up_writer.drain()
                    return
            if out:
                if not carried and not frames.buffered:
                    chunk = data  # exactly the frames above: no re-encoding
                else:
                    chunk = b"".join(f.encode() for f in out)
                self.bytes_up += len(chunk)
                self.up_writer.write(chunk)
                await self.up_writer.drain()
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            carried = frames.buffered > 0
            frames.feed(data)

    def _audit_frame(self, frame: Frame) -> None:
        """Audit what will run, as the server will see it: Execute reports the SQL its portal
        was bound to and the Bind parameters (what each Parse, Bind and Close did is learnt from
        the server's replies, see PreparedStatements)."""
        kind = frame.type
        if kind in COPY_DATA:  # CopyData, CopyDone, CopyFail
            if not self._copy_in:
                if self._syncs_since_start and not self._copy_announced:
                    # did the server ignore those Syncs (COPY mode) or answer them (the COPY
                    # failed at once)? Unknowable until CopyInResponse (libpq waits for it)
                    raise ProtocolError("jit-proxy relays COPY data sent after a Sync only "
                                        "once the server's CopyInResponse came")
                if self._syncs_since_start:  # they reached a server in COPY mode: ignored
                    self.statements.copy_started(self._syncs_since_start)
                self._copy_in = True
            if kind != b"d":
                self._copy_in = self._copy_announced = False
            return
        if self._copy_in and kind in (b"S", b"H"):
            # ignored by the server, unless a bad row ended the COPY already: unknowable here
            raise ProtocolError("jit-proxy does not relay Sync or Flush inside COPY data")
        if kind == b"S":
            self.statements.sync()
            self._extended_open = False
            self._syncs_since_start += 1
            return
        if kind in EXTENDED_QUERY:
            self._extended_open = True
            if kind in (b"D", b"H"):  # Describe, Flush
                return
        elif kind not in (b"Q", b"F"):  # Terminate
            return
        if kind in (b"Q", b"E"):  # either may start a COPY
            self._syncs_since_start = 0
            self._copy_announced = False
        msg = decode_frontend(frame)
        sql = msg.sql if isinstance(msg, Query) else msg.query if isinstance(msg, Parse) else None
        if sql is not None and ENCODING_CHANGE.search(sql):
            self._audit_sql("simple" if isinstance(msg, Query) else "parse", sql, None,
                            refused="changes the client encoding")
            raise ProtocolError("jit-proxy requires client_encoding UTF8 (the proxy audits "
                                "statements as UTF-8): statements that change it are refused",
                                sqlstate="0A000")
        if sql is not None and not self._sql_level_names and SQL_LEVEL_NAMES.search(sql):
            self._sql_level_names = True
        try:
            self._track(msg)
        except TooManyPending as exc:
            raise ProtocolError(f"jit-proxy: {exc}", sqlstate="54000") from None

    def _track(self, msg: Any) -> None:
        if isinstance(msg, Query):
            self._audit_sql("simple", msg.sql, None)
            self.statements.sync(query=True, unsynced=self._extended_open)
            self._extended_open = False
        elif isinstance(msg, Parse):
            self.statements.parse(msg.name, msg.query)
            self._audit_sql("parse", msg.query, msg.name)
        elif isinstance(msg, Bind):
            sql, instead, more = self.statements.lookup(STATEMENT, msg.statement)
            self.statements.bind(msg.portal, _Binding(msg.statement, sql or "", instead, more,
                                                      _params(msg)))
        elif isinstance(msg, Execute):
            bound, other_bindings, more = self.statements.lookup(PORTAL, msg.portal)
            name, sql, instead, more_sql, params = bound or _Binding("", "", [], False, [])
            more = more or more_sql
            for other in other_bindings:  # an earlier batch's Bind of the portal may fail
                instead = [*instead, other.sql, *other.instead]
                more = more or other.more
            instead = [s for s in dict.fromkeys(instead) if s != sql]
            self._audit_sql("execute", sql, name, params=params, instead=instead,
                            more=more or len(instead) > MAX_ALTERNATIVES)
        elif isinstance(msg, Close):
            self.statements.close(STATEMENT if msg.kind == "S" else PORTAL, msg.name)
        elif isinstance(msg, FunctionCall):
            self._audit_sql("function_call", f"function oid {msg.function_oid}", None,
                            refused="the fast-path interface is not relayed")
            raise ProtocolError("jit-proxy does not relay the fast-path function call "
                                "interface; call the function with SELECT",
                                sqlstate="0A000")

    def _follow_parameter(self, status: ParameterStatus) -> None:
        """Settings the server reports that change how the proxy reads SQL."""
        if status.name == "standard_conforming_strings":
            self._standard_strings = status.value != "off"

    def _audit_sql(self, kind: str, sql: str, statement: str | None,
                   params: list | None = None, refused: str | None = None,
                   instead: list[str] | None = None, more: bool = False) -> None:
        shown = redact_passwords(sql, self._standard_strings)  # no secret in the audit log
        fields: dict = {"session": self.session_id, "target": self.target_name,
                        "role": self.role, "kind": kind,
                        # (the hash of what is shown: never of a password)
                        **cut_text("sql", shown, AUDIT_SQL_LIMIT)}
        if shown is not sql:
            fields["sql_redacted"] = "password literals"
        if statement is not None:
            fields["statement"] = statement
        if params:
            fields["params"] = params
        if refused:
            fields["refused"] = refused
        if instead:  # messages of earlier batches are still unanswered
            fields["sql_if_earlier_failed"] = [
                redact_passwords(s, self._standard_strings)[:AUDIT_SQL_LIMIT]
                for s in instead[:MAX_ALTERNATIVES]]
        if more:  # and yet more alternatives than those listed
            fields["sql_if_earlier_failed_truncated"] = True
        if kind == "execute" and (self._sql_level_names or self.statements.uncertain):
            fields["sql_may_differ"] = (
                "the session used SQL-level PREPARE, DEALLOCATE, DISCARD, cursors or dynamic "
                "SQL (DO, EXECUTE), whose names the proxy does not follow"
                if self._sql_level_names else
                "a simple Query after unsynced extended-query messages met an error, so "
                "the server may have skipped it")
        self.service.audit.emit("db.query", self.user, **fields)

    async def _upstream_to_client(self) -> None:
        """Server bytes stream through as they come (bounded by the socket buffers), message
        boundaries tracked so a FATAL of ours never lands inside a server message."""
        assert self.up_reader is not None
        while True:
            self._reading_upstream = True
            try:
                data = await self.up_reader.read(READ_SIZE)
            finally:
                self._reading_upstream = False
            if not data:
                return
            last = self._boundaries.feed(data)
            for frame in self._boundaries.watched:
                if frame.type == b"Z":
                    self.statements.ready(idle=frame.payload == b"I")
                    continue
                if frame.type in (b"1", b"2", b"3"):
                    self.statements.completed()
                    continue
                if frame.type == b"E":
                    self.statements.error()
                    continue
                if frame.type == b"G":
                    self._copy_announced = True
                    continue
                status = decode_backend(frame)
                if isinstance(status, ParameterStatus):
                    self._follow_parameter(status)
                if (isinstance(status, ParameterStatus) and status.name == "client_encoding"
                        and not safe_encoding(status.value)):
                    self.service.audit.emit("db.session.refused", self.user,
                                            session=self.session_id, target=self.target_name,
                                            why=f"client_encoding set to {status.value[:32]}")
                    self.ending = ("terminating connection: jit-proxy requires client_encoding "
                                   "UTF8 (the proxy audits statements as UTF-8)")
                    self.ending_reason = "client_encoding changed"
            self._boundaries.watched.clear()
            if self.ending is not None and last is not None:
                data = data[:last]  # up to the end of the last whole message, then our FATAL
                self.bytes_down += len(data)
                self.writer.write(data)
                await self.writer.drain()
                return
            self.bytes_down += len(data)
            self.writer.write(data)
            await self.writer.drain()

    # --- teardown (AccessService.Terminable) ------------------------------------------------------

    async def terminate(self, line: str, reason: str = "grant ended") -> None:
        """Close this connection (its grant ended, or the proxy stops): a FATAL with ``line``
        (57P01 admin_shutdown), at a message boundary."""
        self.ending = f"terminating connection: {line.removeprefix('jit-proxy: ')}"
        self.ending_reason = reason
        if self._pump is not None and self._reading_upstream and self._boundaries.at_boundary:
            self._pump.cancel()  # idle between messages: our FATAL can go at once
        asyncio.get_running_loop().call_later(2.0, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.ending is not None and not self.writer.transport.is_closing():
            self.end_reason = self.ending_reason
            self.abort()

    async def _finish(self) -> None:
        if self.session_id is not None:
            self.service.live_sessions.pop(self.session_id, None)
        if self.cancel_key is not None:
            self.door.cancel_keys.pop(self.cancel_key, None)
        if self.grant is not None:
            self.service.detach(self.grant.id, self)
        if self.session_id is not None:
            self.service.audit.emit("db.session.end", self.user, session=self.session_id,
                                    target=self.target_name, role=self.role,
                                    grant=self.grant.id if self.grant else None,
                                    reason=self.end_reason, bytes_up=self.bytes_up,
                                    bytes_down=self.bytes_down)
            await self.service.store.end_session(
                self.session_id, now=self.service.clock.now(), reason=self.end_reason,
                recording=None, recording_sha256=None, bytes_up=self.bytes_up,
                bytes_down=self.bytes_down)
        self.abort()

