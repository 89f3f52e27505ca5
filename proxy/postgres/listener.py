"""The PostgreSQL listener: TLS, SCRAM with the grant's one-time secret, relay to the ephemeral role.

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
import logging
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import scramp

from ca.keys import write_secret_file
from ca.x509 import X509CertificateAuthority
from proxy.access.model import Grant
from proxy.config import PostgresTarget
from proxy.pgwire import (ADMIN_SHUTDOWN, CONNECTION_FAILURE, INVALID_AUTHORIZATION_SPECIFICATION,
                          INVALID_PASSWORD, AuthenticationCleartextPassword,
                          AuthenticationMD5Password, AuthenticationOk, AuthenticationSASL,
                          AuthenticationSASLContinue, AuthenticationSASLFinal, BackendKeyData,
                          Bind, CancelRequest, ErrorResponse, Execute, Frame, FunctionCall,
                          GSSENCRequest, MessageDecoder, NoticeResponse, ParameterStatus, Parse,
                          PasswordMessage, ProtocolError, Query, ReadyForQuery,
                          SASLInitialResponse, SASLResponse, SSLRequest, StartupDecoder,
                          StartupMessage, Terminate, decode_backend, decode_frontend,
                          decode_sasl_initial_response, decode_sasl_response, error_response,
                          gssenc_response, ssl_response)
from proxy.postgres.provisioner import upstream_ssl
from proxy.postgres.roles import RoleManager
from proxy.postgres.scram import ScramError, ScramServer
from proxy.postgres.secrets import OneTimeSecrets, dummy_verifier
from proxy.runtime.service import AccessService, LiveSession

log = logging.getLogger("jit_proxy.postgres")

READ_SIZE = 65536
UPSTREAM_TIMEOUT = 15.0
AUDIT_SQL_LIMIT = 65536          # characters of SQL kept in one db.query event
# startup parameters passed on to the target; others (notably ``options``) are dropped
PASSED_PARAMETERS = ("application_name", "client_encoding", "DateStyle", "TimeZone",
                     "extra_float_digits", "search_path")


class FrameBoundaries:
    """Follows message boundaries in a stream of typed messages without buffering their bodies,
    so the proxy can stream server bytes through and still know where it may inject a message.

    ``feed(data)`` returns the offset just after the last boundary inside ``data`` (None if no
    message ended in it); ``at_boundary`` says whether the stream is between messages.

    Raises:
        ProtocolError: a length field below 4 (PostgreSQL docs, "Message Formats").
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes) -> int | None:
        pos, last, n = 0, None, len(data)
        while pos < n:
            if self._remaining:
                step = min(self._remaining, n - pos)
                pos += step
                self._remaining -= step
                if not self._remaining:
                    last = pos
                continue
            take = min(5 - len(self._header), n - pos)
            self._header += data[pos:pos + take]
            pos += take
            if len(self._header) == 5:
                length = int.from_bytes(self._header[1:5], "big")
                if length < 4:
                    raise ProtocolError(f"server message length {length} is below 4")
                self._remaining = length - 4
                self._header.clear()
                if not self._remaining:
                    last = pos
        return last


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
        self.clients.add(client)
        try:
            await client.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass
        except Exception:  # one connection's failure never touches the others
            log.exception("PostgreSQL client connection failed")
        finally:
            self.clients.discard(client)
            client.abort()

    # --- GrantHooks ------------------------------------------------------------------------------

    async def granted(self, grant: Grant) -> None:
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
        self.user = ""
        self.target_name = ""
        self.grant: Grant | None = None
        self.role = ""
        self.session_id: int | None = None
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.statements: dict[str, str] = {}
        self.portals: dict[str, str] = {}
        self.bytes_up = self.bytes_down = 0
        self.ending: str | None = None
        self.ending_reason = "grant ended"
        self.end_reason = "closed"
        self._boundaries = FrameBoundaries()
        self._pump: asyncio.Task | None = None
        self._reading_upstream = False

    # --- plumbing --------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _fatal(self, sqlstate: str, message: str) -> None:
        try:
            await self._send(error_response("FATAL", sqlstate, message))
        except (ConnectionError, RuntimeError):
            pass

    def abort(self) -> None:
        for w in (self.writer, self.up_writer):
            if w is not None and not w.is_closing():
                w.close()

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
                frames = MessageDecoder.for_frontend_messages(cfg.postgres.max_message_length)
                if not await self._authenticate(startup, frames, grace):
                    return
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
            self.end_reason = "timeout"
            await self._fatal(INVALID_AUTHORIZATION_SPECIFICATION, "jit-proxy: login timed out")
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
                if not tls:
                    self.service.auth_failure(self.user, self.peer, method="scram",
                                              target=self.target_name[:256], why="no TLS")
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
        why = None
        verifier = None
        if not isinstance(target, PostgresTarget):
            why = "not a PostgreSQL target"
        else:
            verifier = self.door.secrets.lookup(self.user, self.target_name, now)
            if verifier is None:
                why = "no live one-time secret (db-login)"
            else:
                grant = service.active.get(verifier.grant_id)
                if grant is None or not grant.is_live(now):
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
            self.service.auth_failure(self.user, self.peer, method="scram",
                                      target=self.target_name[:256], why=why)
            await self._fatal(INVALID_PASSWORD,
                              f'password authentication failed for user "{self.user[:63]}"')
            self.grant = None
            return False
        await self._send(AuthenticationSASLFinal(server_final.encode()).encode())
        assert self.grant is not None
        self.service.audit.emit("auth.success", self.user, method="scram",
                                target=self.target_name, grant=self.grant.id, peer=self.peer)
        return True

    async def _connect_upstream(self, startup: StartupMessage) -> bool:
        grant = self.grant
        assert grant is not None
        target = self.service.config.targets[self.target_name]
        assert isinstance(target, PostgresTarget)
        try:
            creds = await self.door.roles.credentials(grant)
            self.role = creds.name
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
                await writer.start_tls(tls, server_hostname=target.tls.server_name
                                       or target.address)
            params = {"user": creds.name, "database": target.database,
                      "application_name": "jit-proxy"}
            params.update({k: v for k, v in startup.parameters.items() if k in PASSED_PARAMETERS})
            writer.write(StartupMessage(startup.protocol_version, params).encode())
            await writer.drain()
            ready = await self._upstream_login(creds.name, creds.password, bool(tls))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError,
                ConnectionError, scramp.ScramException, ProtocolError) as exc:
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
        return True

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
            elif isinstance(msg, (ParameterStatus, NoticeResponse)):
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
        while True:
            out = []
            while (frame := frames.next_frame()) is not None:
                self._audit_frame(frame)
                out.append(frame.encode())
                if frame.type == b"X":
                    self.up_writer.write(b"".join(out))
                    await self.up_writer.drain()
                    return
            if out:
                data = b"".join(out)
                self.bytes_up += len(data)
                self.up_writer.write(data)
                await self.up_writer.drain()
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            frames.feed(data)

    def _audit_frame(self, frame: Frame) -> None:
        if frame.type not in (b"Q", b"P", b"B", b"E", b"F", b"C"):
            return
        msg = decode_frontend(frame)
        if isinstance(msg, Query):
            self._audit_sql("simple", msg.sql, None)
        elif isinstance(msg, Parse):
            self.statements[msg.name] = msg.query
            self._audit_sql("parse", msg.query, msg.name)
        elif isinstance(msg, Bind):
            self.portals[msg.portal] = msg.statement
        elif isinstance(msg, Execute):
            name = self.portals.get(msg.portal, "")
            self._audit_sql("execute", self.statements.get(name, ""), name)
        elif isinstance(msg, FunctionCall):
            self._audit_sql("function_call", f"function oid {msg.function_oid}", None)

    def _audit_sql(self, kind: str, sql: str, statement: str | None) -> None:
        fields = {"session": self.session_id, "target": self.target_name, "role": self.role,
                  "kind": kind, "sql": sql[:AUDIT_SQL_LIMIT]}
        if statement is not None:
            fields["statement"] = statement
        if len(sql) > AUDIT_SQL_LIMIT:
            fields["sql_truncated"] = True
            fields["sql_sha256"] = hashlib.sha256(sql.encode()).hexdigest()
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
        if self.up_writer is not None:
            asyncio.get_running_loop().call_later(2.0, self.abort)

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

