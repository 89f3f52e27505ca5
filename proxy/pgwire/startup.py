"""The startup phase: the untyped packets a client sends before typed messages begin.

What it is for: decoding (and encoding) SSLRequest, GSSENCRequest, CancelRequest and StartupMessage
(PostgreSQL 15 docs, Frontend/Backend Protocol, "Message Flow: Start-up", "SSL Session Encryption",
"GSSAPI Session Encryption", "Canceling Requests in Progress", and "Message Formats"), and the
one-byte answers to the two encryption requests. Each packet is Int32 length (including itself),
Int32 code, then a body; lengths outside [8, 10000] are refused as PostgreSQL does
(MAX_STARTUP_PACKET_LENGTH), from the first 4 bytes, before buffering the body.

One ``StartupDecoder`` serves a whole startup phase: after it returns ``SSLRequest`` or
``GSSENCRequest`` the caller answers (``ssl_response``/``gssenc_response``), switches the transport
to TLS if it accepted, and keeps feeding the *same* decoder with the (decrypted) bytes that follow.
It ends with a ``StartupMessage`` or a ``CancelRequest``; bytes after that belong to the typed
phase and are handed over by ``take_remaining()``.

What it must not do: any I/O, TLS, logging, or authentication decisions (which user, which
database) -- it only checks the packets' shape, and that ``user`` is present as PostgreSQL requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

from . import _codec
from .errors import FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION_SPECIFICATION, ProtocolError

MAX_STARTUP_PACKET_LENGTH = 10_000
"""PostgreSQL's bound on a startup packet, length field included (bytes)."""

PROTOCOL_3_0 = 3 << 16  # 196608
CANCEL_REQUEST_CODE = (1234 << 16) | 5678  # 80877102
SSL_REQUEST_CODE = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE = (1234 << 16) | 5680  # 80877104

SSL_ACCEPT = b"S"
SSL_DECLINE = b"N"
GSSENC_ACCEPT = b"G"
GSSENC_DECLINE = b"N"

_HEAD = struct.Struct("!ii")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """SSLRequest: Int32(8) Int32(80877103). The client asks for TLS; answer with ``ssl_response``."""

    def encode(self) -> bytes:
        """The 8 packet bytes."""
        return _HEAD.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """GSSENCRequest: Int32(8) Int32(80877104). The client asks for GSSAPI encryption."""

    def encode(self) -> bytes:
        """The 8 packet bytes."""
        return _HEAD.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """CancelRequest: Int32(16) Int32(80877102) Int32 process_id Int32 secret_key (both signed)."""

    process_id: int
    secret_key: int

    def __repr__(self) -> str:
        return f"CancelRequest(process_id={self.process_id!r}, secret_key=<hidden>)"

    def encode(self) -> bytes:
        """The 16 packet bytes. Raises ProtocolError (remote=False) if a field is not an Int32."""
        return (_HEAD.pack(16, CANCEL_REQUEST_CODE)
                + _codec.put_int32(self.process_id, "CancelRequest process_id")
                + _codec.put_int32(self.secret_key, "CancelRequest secret_key"))


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """StartupMessage: Int32 length, Int32 protocol_version, (String name, String value)*, Byte1(0).

    ``protocol_version`` is ``major << 16 | minor`` (3.0 = 196608); ``parameters`` keeps the order
    sent. ``user`` is always present when decoded; ``database`` defaults to the user (as in PostgreSQL).
    """

    protocol_version: int
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        """The protocol's major version (3)."""
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        """The protocol's minor version (0 is what libpq sends by default)."""
        return self.protocol_version & 0xFFFF

    @property
    def user(self) -> str:
        """The ``user`` parameter ('' if absent)."""
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        """The ``database`` parameter, defaulting to the user name as PostgreSQL does."""
        return self.parameters.get("database") or self.user

    def encode(self) -> bytes:
        """The packet bytes.

        Raises:
            ProtocolError: (remote=False) for what ``StartupDecoder`` would refuse: no ``user``, a
                version other than 3.x, an empty name, a NUL in a name or value, or a packet longer
                than MAX_STARTUP_PACKET_LENGTH bytes.
        """
        version = _codec.put_int32(self.protocol_version, "StartupMessage protocol_version")
        if (self.protocol_version >> 16) != 3:
            raise ProtocolError(f"cannot encode StartupMessage: protocol version {self.protocol_version} "
                                "is not 3.x", remote=False)
        if not isinstance(self.parameters, dict) or not self.parameters.get("user"):
            raise ProtocolError("cannot encode StartupMessage: parameters must include a non-empty "
                                "'user'", remote=False)
        body = [version]
        for name, value in self.parameters.items():
            if name == "":
                raise ProtocolError("cannot encode StartupMessage: empty parameter name", remote=False)
            body.append(_codec.put_cstring(name, "StartupMessage parameter name"))
            body.append(_codec.put_cstring(value, f"StartupMessage parameter {name!r}"))
        body.append(b"\0")
        payload = b"".join(body)
        if len(payload) + 4 > MAX_STARTUP_PACKET_LENGTH:
            raise ProtocolError(f"cannot encode StartupMessage: {len(payload) + 4} bytes is more than "
                                f"{MAX_STARTUP_PACKET_LENGTH}", remote=False)
        return struct.pack("!i", len(payload) + 4) + payload


StartupPacket = Union[SSLRequest, GSSENCRequest, CancelRequest, StartupMessage]


def ssl_response(accept: bool) -> bytes:
    """The one-byte answer to SSLRequest: ``b"S"`` (TLS handshake follows) or ``b"N"`` (declined).

    Spec: Frontend/Backend Protocol, "SSL Session Encryption".
    """
    return SSL_ACCEPT if accept else SSL_DECLINE


def gssenc_response(accept: bool) -> bytes:
    """The one-byte answer to GSSENCRequest: ``b"G"`` (accepted) or ``b"N"`` (declined).

    Spec: Frontend/Backend Protocol, "GSSAPI Session Encryption".
    """
    return GSSENC_ACCEPT if accept else GSSENC_DECLINE


def decode_ssl_response(data: bytes) -> bool:
    """A server's answer to our SSLRequest: ``True`` for ``b"S"``, ``False`` for ``b"N"``.

    Args:
        data: exactly the one byte read after sending SSLRequest.
    Raises:
        ProtocolError: (remote=True, 08P01) for anything else (an old server's ErrorResponse 'E',
            or unencrypted bytes the server must not have sent yet).
    """
    if data == SSL_ACCEPT:
        return True
    if data == SSL_DECLINE:
        return False
    raise ProtocolError(f"invalid response to SSLRequest: {bytes(data[:1])!r} "
                        f"({len(data)} bytes; expected b'S' or b'N')")


class StartupDecoder:
    """Incremental decoder of the startup phase of one client connection.

    Args:
        max_length: bound on a packet's length field (bytes, counting itself); default and maximum
            MAX_STARTUP_PACKET_LENGTH (10000).

    ``feed(data)`` appends bytes; ``next_message()`` returns one ``SSLRequest``, ``GSSENCRequest``,
    ``CancelRequest`` or ``StartupMessage``, or ``None`` while a packet is incomplete and after the
    phase is over (``done``: a StartupMessage or CancelRequest was returned).

    Raises (from ``next_message``), always ``ProtocolError`` with remote=True; the decoder then stays
    broken:
        08P01 when a length field is below 8 or above ``max_length`` (from its 4 bytes alone), when an
            SSLRequest/GSSENCRequest/CancelRequest has the wrong length, when a second request of the
            same encryption kind arrives, when bytes follow an SSLRequest/GSSENCRequest before it was
            answered (they were sent in clear text and may be injected: CVE-2021-23214), and when the
            parameters are not NUL-terminated UTF-8 name/value pairs ended by one extra NUL, or
            repeat a name;
        0A000 for a protocol version other than 3.x, or an unknown 1234.x request code;
        28000 when the StartupMessage has no (or an empty) ``user``.
    Which request may follow which answer (e.g. refusing GSSENCRequest after TLS was accepted, or
    a StartupMessage sent in clear text when TLS is required) is the caller's decision.
    Spec: Frontend/Backend Protocol, "Message Flow: Start-up", "SSL Session Encryption", "GSSAPI
    Session Encryption", "Canceling Requests in Progress"; bounds from PostgreSQL's
    ProcessStartupPacket.
    """

    __slots__ = ("_buf", "_max", "_done", "_error", "_seen_ssl", "_seen_gss")

    def __init__(self, max_length: int = MAX_STARTUP_PACKET_LENGTH):
        if not isinstance(max_length, int) or not 8 <= max_length <= MAX_STARTUP_PACKET_LENGTH:
            raise ValueError(f"max_length must be an int in [8, {MAX_STARTUP_PACKET_LENGTH}]")
        self._buf = bytearray()
        self._max = max_length
        self._done = False
        self._error: ProtocolError | None = None
        self._seen_ssl = False
        self._seen_gss = False

    @property
    def done(self) -> bool:
        """True once a StartupMessage or CancelRequest has been returned."""
        return self._done

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the stream. Never raises; the buffer is bounded by what is fed."""
        self._buf += data

    def take_remaining(self) -> bytes:
        """After ``done``: the bytes fed beyond the last packet (the start of the typed phase).

        Raises:
            ProtocolError: (remote=False) if the startup phase is not over.
        """
        if not self._done:
            raise ProtocolError("startup phase not finished: no StartupMessage yet", remote=False)
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _fail(self, message: str, sqlstate: str = "08P01") -> ProtocolError:
        self._error = ProtocolError(message, sqlstate=sqlstate)
        return self._error

    def next_message(self) -> StartupPacket | None:
        """The next startup packet, or ``None`` (see the class docstring for the errors)."""
        if self._error is not None:
            raise self._error
        if self._done:
            return None
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = struct.unpack_from("!i", buf, 0)
        if length < 8 or length > self._max:
            raise self._fail(f"invalid length of startup packet: {length} "
                             f"(it must be between 8 and {self._max} bytes)")
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        (code,) = struct.unpack_from("!i", packet, 4)
        if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
            ssl = code == SSL_REQUEST_CODE
            name = "SSLRequest" if ssl else "GSSENCRequest"
            if length != 8:
                raise self._fail(f"invalid length of {name}: {length} (it must be 8)")
            if self._seen_ssl if ssl else self._seen_gss:
                raise self._fail(f"duplicate {name} in one startup phase")
            if buf:
                raise self._fail(f"received unencrypted data after {name}")
            if ssl:
                self._seen_ssl = True
                return SSLRequest()
            self._seen_gss = True
            return GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            if length != 16:
                raise self._fail(f"invalid length of CancelRequest: {length} (it must be 16)")
            process_id, secret_key = struct.unpack_from("!ii", packet, 8)
            self._done = True
            return CancelRequest(process_id, secret_key)
        major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
        if major != 3:
            raise self._fail(f"unsupported frontend protocol {major}.{minor}: "
                             "the proxy supports protocol 3", FEATURE_NOT_SUPPORTED)
        message = self._parse_parameters(packet, code)
        self._done = True
        return message

    def _parse_parameters(self, packet: bytes, code: int) -> StartupMessage:
        reader = _codec.Reader(packet, "startup packet", pos=8)
        parameters: dict[str, str] = {}
        try:
            while True:
                if reader.left == 0:
                    raise reader.fail("expected terminator as last byte")
                name = reader.cstring()
                if name == "":
                    break
                if reader.left == 0:
                    raise reader.fail(f"missing value of parameter {name[:64]!r}")
                value = reader.cstring()
                if name in parameters:
                    raise reader.fail(f"parameter {name[:64]!r} given twice")
                parameters[name] = value
            reader.end()
        except ProtocolError as exc:
            self._error = exc
            raise
        if not parameters.get("user"):
            raise self._fail("no PostgreSQL user name specified in startup packet",
                             INVALID_AUTHORIZATION_SPECIFICATION)
        return StartupMessage(code, parameters)
