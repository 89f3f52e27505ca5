"""Framing of the typed messages that follow the startup packet, in both directions.

What it is for: cutting a byte stream into ``Frame(type, payload)`` (Byte1 type, Int32 length that
counts itself but not the type byte, then ``length - 4`` payload bytes; PostgreSQL 15 docs,
Frontend/Backend Protocol, "Messaging Overview" and "Message Formats"), and the reverse.
Invariants of ``MessageDecoder``:
  - memory is bounded: a frame longer than its limit is refused from its 5-byte header, before any
    of its body is waited for; the decoder holds only what the caller fed and has not taken out,
    so a caller that drains ``next_frame()`` before reading more holds at most one frame plus one
    read (``buffered`` says how much);
  - work is linear in the bytes fed: bytes are appended to one ``bytearray`` read from an offset,
    each payload is copied out exactly once, and the consumed prefix is dropped only when it is at
    least as long as what remains (so each byte moves at most once more);
  - the same bytes give the same frames however they are split between ``feed`` calls;
  - after a ``ProtocolError`` the decoder is broken and raises that same error again.
``FrameBoundaries`` follows the same framing without keeping bodies, for a relay that streams
bytes through as they come and must still know where one message ends.

What it must not do: any I/O, logging, or interpretation of payloads (``frontend``/``backend`` do).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Iterable, Mapping

from . import _codec
from .errors import ProtocolError

DEFAULT_MAX_MESSAGE_LENGTH = 64 * 1024 * 1024
"""Default bound on a message's length field (bytes, including the 4 of the field itself)."""

SMALL_MESSAGE_LIMIT = 10_000
"""PostgreSQL's PQ_SMALL_MESSAGE_LIMIT: bound for messages that carry no data (Sync, Execute...)."""

AUTH_MESSAGE_LIMIT = 65_535
"""PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: bound for the password-family 'p' messages."""

FRONTEND_TYPES = frozenset(b"QPBDESHCdcfXFp")
"""Type bytes (as ints) a frontend may send after the startup packet ('p' only while authenticating)."""

BACKEND_TYPES = frozenset(b"RSKZENCGHWTDI123ntsAdcvV")
"""Type bytes (as ints) a backend may send."""

FRONTEND_TYPE_LIMITS: Mapping[bytes, int] = MappingProxyType({
    **{bytes((t,)): SMALL_MESSAGE_LIMIT for t in b"CDEHScfX"},
    b"p": AUTH_MESSAGE_LIMIT,
})
"""Per-type bounds PostgreSQL itself applies to frontend messages (postgres.c, SocketBackend)."""

BACKEND_TYPE_LIMITS: Mapping[bytes, int] = MappingProxyType({
    **{bytes((t,)): SMALL_MESSAGE_LIMIT for t in b"KZ123nsIc"},
    b"R": AUTH_MESSAGE_LIMIT,
})
"""Per-type bounds for backend messages whose format is fixed-size or empty (defensive)."""

_LENGTH = struct.Struct("!i")
_TYPE_BYTES = tuple(bytes((i,)) for i in range(256))


@dataclass(frozen=True, slots=True)
class Frame:
    """One typed message: ``type`` is one byte (e.g. ``b"Q"``), ``payload`` the bytes after the length.

    The same type byte means different messages per direction ('D' is Describe from a frontend and
    DataRow from a backend): decode with ``decode_frontend`` or ``decode_backend``.
    """

    type: bytes
    payload: bytes

    def encode(self) -> bytes:
        """This frame as bytes on the wire (see ``encode_frame``)."""
        return encode_frame(self.type, self.payload)

    def __repr__(self) -> str:
        return f"Frame(type={self.type!r}, payload=<{len(self.payload)} bytes>)"


class Message:
    """Base of every typed message class: ``TYPE`` is its type byte, ``encode()`` its wire bytes.

    Subclasses are frozen dataclasses named as in the PostgreSQL docs' "Message Formats".
    """

    __slots__ = ()
    TYPE: ClassVar[bytes] = b""

    def _payload(self) -> bytes:
        """The message body after the length field (bytes); overridden by each message class.

        Raises ProtocolError (remote=False) when a field cannot be encoded.
        """
        return b""

    def to_frame(self) -> Frame:
        """This message as a ``Frame``. Raises ProtocolError (remote=False) if unencodable."""
        return Frame(self.TYPE, self._payload())

    def encode(self) -> bytes:
        """This message as bytes on the wire. Raises ProtocolError (remote=False) if unencodable."""
        return _codec.frame(self.TYPE, self._payload())


def encode_frame(type_: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """Encode one typed message: Byte1 ``type_``, Int32 ``len(payload) + 4``, ``payload``.

    Args:
        type_: exactly one byte, not NUL.
        payload: the message body (bytes); at most 2**31 - 5 bytes.
    Returns:
        the message bytes.
    Raises:
        ProtocolError: (remote=False) for a bad type or an oversized payload.
    Spec: Frontend/Backend Protocol, "Messaging Overview".
    """
    if not isinstance(type_, bytes) or len(type_) != 1 or type_ == b"\0":
        raise ProtocolError(f"cannot encode message: type must be one non-NUL byte, got {type_!r}",
                            remote=False)
    return _codec.frame(type_, _codec.put_bytes(payload, "message payload"))


class MessageDecoder:
    """Incremental decoder of typed frames from one direction of one connection.

    Args:
        max_length: bound on every message's length field (bytes, counting the field's own 4 bytes;
            PostgreSQL's rule). Default 64 MiB. A header announcing more raises ``ProtocolError``
            (08P01) as soon as its 5 bytes are present, without waiting for the body.
        type_limits: tighter bounds for particular types, ``{b"S": 10000, ...}`` (each capped by
            ``max_length``). ``FRONTEND_TYPE_LIMITS`` / ``BACKEND_TYPE_LIMITS`` mirror PostgreSQL.
        allowed_types: if given, type bytes (ints or 1-byte ``bytes``) accepted; any other type byte
            raises ``ProtocolError`` (08P01) as soon as it is seen.

    Use ``MessageDecoder.for_frontend_messages()`` on bytes from a client and
    ``MessageDecoder.for_backend_messages()`` on bytes from a server.

    Raises (from ``next_frame``):
        ProtocolError: remote=True, sqlstate 08P01, for a length field below 4, above the limit, or a
            type byte not allowed. The decoder then stays broken.
        ValueError: (from the constructor) for a ``max_length`` outside [4, 2**31-1] or a
            ``type_limits`` key that is not one byte.
    Spec: Frontend/Backend Protocol, "Messaging Overview"; the limits follow PostgreSQL's
    pq_getmessage (length < 4 or > limit is "invalid message length", 08P01).
    """

    __slots__ = ("_buf", "_pos", "_max", "_limits", "_allowed", "_error")

    def __init__(self, max_length: int = DEFAULT_MAX_MESSAGE_LENGTH, *,
                 type_limits: Mapping[bytes, int] | None = None,
                 allowed_types: Iterable[int | bytes] | None = None):
        if not isinstance(max_length, int) or not 4 <= max_length <= _codec.INT32_MAX:
            raise ValueError(f"max_length must be an int in [4, 2**31-1], got {max_length!r}")
        self._buf = bytearray()
        self._pos = 0
        self._max = max_length
        limits = [max_length] * 256
        for t, n in (type_limits or {}).items():
            if not isinstance(t, bytes) or len(t) != 1:
                raise ValueError(f"type_limits keys must be one byte, got {t!r}")
            limits[t[0]] = max(4, min(int(n), max_length))
        self._limits = limits
        if allowed_types is None:
            self._allowed = None
        else:
            self._allowed = frozenset(t if isinstance(t, int) else t[0] for t in allowed_types)
        self._error: ProtocolError | None = None

    @classmethod
    def for_frontend_messages(cls, max_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> "MessageDecoder":
        """A decoder for bytes sent by a client: frontend types only, PostgreSQL's per-type bounds."""
        return cls(max_length, type_limits=FRONTEND_TYPE_LIMITS, allowed_types=FRONTEND_TYPES)

    @classmethod
    def for_backend_messages(cls, max_length: int = DEFAULT_MAX_MESSAGE_LENGTH) -> "MessageDecoder":
        """A decoder for bytes sent by a server: backend types only, bounds on fixed-size types."""
        return cls(max_length, type_limits=BACKEND_TYPE_LIMITS, allowed_types=BACKEND_TYPES)

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned in a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (any length, including 0) to the stream. Never raises ProtocolError."""
        if not data:
            return
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos * 2 >= len(buf):
                del buf[:pos]
                self._pos = 0
        buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` until more bytes are fed.

        Raises:
            ProtocolError: see the class docstring.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 1:
            return None
        t = buf[pos]
        if self._allowed is not None and t not in self._allowed:
            self._error = ProtocolError(f"invalid message type {bytes((t,))!r} (0x{t:02x})")
            raise self._error
        if avail < 5:
            return None
        (length,) = _LENGTH.unpack_from(buf, pos + 1)
        limit = self._limits[t]
        if length < 4 or length > limit:
            self._error = ProtocolError(
                f"invalid message length {length} for message type {bytes((t,))!r}: "
                f"it must be between 4 and {limit} bytes")
            raise self._error
        end = pos + 1 + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos + 5:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return Frame(_TYPE_BYTES[t], payload)


class FrameBoundaries:
    """Follows message boundaries in a stream of typed messages without buffering their bodies,
    so a relay can stream bytes through as they come and still know where it may inject a message
    of its own; messages of the ``watch`` types (at most ``WATCH_LIMIT`` body bytes) are collected
    whole into ``watched``, for the caller to read and clear, and messages of the ``mark`` types
    (any length) go there too with an empty body, in stream order: only that they came counts.

    ``feed(data)`` returns the offset just after the last message that ends inside ``data`` (None
    if none does); ``at_boundary`` says whether the stream is between messages. The same bytes
    give the same boundaries and watched messages however they are split between ``feed`` calls.
    Work is linear in the bytes fed and a message's body is never copied unless it is watched.

    Raises (from ``feed``):
        ProtocolError: a length field below 4 (PostgreSQL docs, "Message Formats"), or a watched
            message longer than ``WATCH_LIMIT``; after it the tracker is broken: ``feed`` raises
            the same error again and ``at_boundary`` is False.
    """

    WATCH_LIMIT = 10000  # bytes of a watched message body

    def __init__(self, watch: bytes = b"S", mark: bytes = b"") -> None:
        self._watch = frozenset(watch)
        self._mark = frozenset(mark) - self._watch
        self._header = bytearray()  # a header split across feeds
        self._remaining = 0         # body bytes of the current message not yet fed
        self._type = b""
        self._body: bytearray | None = None  # the watched message being collected
        self.watched: list[Frame] = []
        self._error: ProtocolError | None = None

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header and self._error is None

    def feed(self, data: bytes) -> int | None:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes) -> int | None:
        pos, last, n = 0, None, len(data)
        while pos < n:
            if self._remaining:  # the rest of a message begun in an earlier feed
                step = min(self._remaining, n - pos)
                if self._body is not None:
                    self._body += data[pos:pos + step]
                pos += step
                self._remaining -= step
                if not self._remaining:
                    last = pos
                    if self._body is not None:
                        self.watched.append(Frame(self._type, bytes(self._body)))
                        self._body = None
                continue
            if not self._header and n - pos >= 5:  # the usual case: a whole header in ``data``
                t = data[pos]
                (length,) = _LENGTH.unpack_from(data, pos + 1)
                pos += 5
            else:
                take = min(5 - len(self._header), n - pos)
                self._header += data[pos:pos + take]
                pos += take
                if len(self._header) < 5:
                    break
                t = self._header[0]
                (length,) = _LENGTH.unpack_from(self._header, 1)
                self._header.clear()
            if length < 4:
                raise ProtocolError(f"server message length {length} is below 4")
            end = pos + length - 4
            if t in self._watch:
                if length - 4 > self.WATCH_LIMIT:
                    raise ProtocolError(f"server message {_TYPE_BYTES[t]!r} is too long")
                if end <= n:
                    self.watched.append(Frame(_TYPE_BYTES[t], bytes(data[pos:end])))
                else:
                    self._body = bytearray(data[pos:])
            elif t in self._mark:
                self.watched.append(Frame(_TYPE_BYTES[t], b""))
            if end <= n:
                pos = last = end
            else:
                self._type = _TYPE_BYTES[t]
                self._remaining = end - n
                pos = n
        return last
