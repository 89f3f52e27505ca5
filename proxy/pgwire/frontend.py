"""Messages a frontend (client) sends after the startup packet: typed decoding and encoding.

What it is for: turning a ``Frame`` from a client into the typed message the proxy must understand
to relay, audit or refuse it (``decode_frontend``), the password-family 'p' messages whose meaning
depends on what the server asked (``decode_password_message``, ``decode_sasl_initial_response``,
``decode_sasl_response``), and encoding each of them (``Message.encode``) for the proxy's own
upstream connections and for tests. Formats follow the PostgreSQL 15 docs, Frontend/Backend
Protocol, "Message Formats"; text is UTF-8 (the proxy requires client_encoding UTF8).

Every malformed payload (a string without its NUL, a count or length that overruns the payload, a
negative length other than -1 for NULL, trailing bytes, invalid UTF-8, an unknown Describe/Close
kind, format-code counts that do not match the values) raises ``ProtocolError`` (remote=True, 08P01)
and nothing else. Format-code *values* are not checked: the server answers a bad one with an ERROR.
Counts (Int16) are read unsigned, 0..65535, as PostgreSQL's pq_getmsgint does; OIDs are unsigned.

What it must not do: any I/O, logging, or policy (whether a statement is allowed is not decided here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from . import _codec
from ._codec import Reader, as_bytes, tuple_fields
from .errors import ProtocolError
from .framing import Frame, Message


def _check_format_count(formats: tuple[int, ...], values: tuple[object, ...], what: str) -> None:
    if not isinstance(formats, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise ProtocolError(f"cannot encode {what}: formats and values must be sequences", remote=False)
    if len(formats) > 1 and len(formats) != len(values):
        raise ProtocolError(f"cannot encode {what}: {len(formats)} format codes for {len(values)} values "
                            "(give 0, 1 or one per value)", remote=False)


def _formats_payload(formats: tuple[int, ...], what: str) -> bytes:
    return (_codec.put_uint16(_codec.put_count(formats, what), what)
            + b"".join(_codec.put_int16(f, what) for f in formats))


def _values_payload(values: tuple[bytes | None, ...], what: str) -> bytes:
    return (_codec.put_uint16(_codec.put_count(values, what), what)
            + b"".join(_codec.put_value(v, what) for v in values))


def _read_formats(r: Reader) -> tuple[int, ...]:
    return tuple([r.int16() for _ in range(r.uint16())])


def _read_values(r: Reader) -> tuple[bytes | None, ...]:
    return tuple([r.value() for _ in range(r.uint16())])


def _kind(r: Reader) -> str:
    b = r.byte()
    if b not in (0x53, 0x50):  # 'S', 'P'
        raise r.fail(f"invalid {r.what} kind {bytes((b,))!r} (expected 'S' or 'P')")
    return chr(b)


def _put_kind(kind: str, what: str) -> bytes:
    if kind not in ("S", "P"):
        raise ProtocolError(f"cannot encode {what}: kind must be 'S' or 'P', got {kind!r}", remote=False)
    return kind.encode()


@dataclass(frozen=True, slots=True)
class Query(Message):
    """Query ('Q'): String sql. Simple query protocol; the text may hold several statements."""

    TYPE = b"Q"
    sql: str

    def _payload(self) -> bytes:
        return _codec.put_cstring(self.sql, "Query sql")


@dataclass(frozen=True, slots=True)
class Parse(Message):
    """Parse ('P'): String statement name ('' = unnamed), String query, Int16 n, Int32[n] type OIDs."""

    TYPE = b"P"
    name: str
    query: str
    param_types: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "param_types")

    def _payload(self) -> bytes:
        what = "Parse param_types"
        return (_codec.put_cstring(self.name, "Parse name") + _codec.put_cstring(self.query, "Parse query")
                + _codec.put_uint16(_codec.put_count(self.param_types, what), what)
                + b"".join(_codec.put_uint32(t, what) for t in self.param_types))


@dataclass(frozen=True, slots=True)
class Bind(Message):
    """Bind ('B'): String portal, String statement, Int16 C + Int16[C] parameter format codes,
    Int16 N + N x (Int32 length, -1 = NULL, Byten value), Int16 R + Int16[R] result format codes.

    ``params`` holds ``bytes`` (text or binary per format) or ``None`` for NULL. C is 0 (all text),
    1 (one code for all) or N.
    """

    TYPE = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "param_formats", "params", "result_formats")

    def param_format(self, index: int) -> int:
        """The format code (0 text, 1 binary) of parameter ``index`` (0-based)."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]

    def _payload(self) -> bytes:
        _check_format_count(self.param_formats, self.params, "Bind")
        return (_codec.put_cstring(self.portal, "Bind portal")
                + _codec.put_cstring(self.statement, "Bind statement")
                + _formats_payload(self.param_formats, "Bind param_formats")
                + _values_payload(self.params, "Bind params")
                + _formats_payload(self.result_formats, "Bind result_formats"))


@dataclass(frozen=True, slots=True)
class Describe(Message):
    """Describe ('D'): Byte1 kind ('S' statement, 'P' portal), String name."""

    TYPE = b"D"
    kind: str
    name: str

    def _payload(self) -> bytes:
        return _put_kind(self.kind, "Describe") + _codec.put_cstring(self.name, "Describe name")


@dataclass(frozen=True, slots=True)
class Execute(Message):
    """Execute ('E'): String portal, Int32 max_rows (0, or negative as PostgreSQL reads it, = all)."""

    TYPE = b"E"
    portal: str
    max_rows: int = 0

    def _payload(self) -> bytes:
        return (_codec.put_cstring(self.portal, "Execute portal")
                + _codec.put_int32(self.max_rows, "Execute max_rows"))


@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Sync ('S'): empty. Ends an extended-query batch; the server answers ReadyForQuery."""

    TYPE = b"S"


@dataclass(frozen=True, slots=True)
class Flush(Message):
    """Flush ('H'): empty. Asks the server to send what it has buffered."""

    TYPE = b"H"


@dataclass(frozen=True, slots=True)
class Close(Message):
    """Close ('C' from a frontend): Byte1 kind ('S' statement, 'P' portal), String name."""

    TYPE = b"C"
    kind: str
    name: str

    def _payload(self) -> bytes:
        return _put_kind(self.kind, "Close") + _codec.put_cstring(self.name, "Close name")


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    """CopyData ('d', both directions): Byten data, an uninterpreted piece of the COPY stream."""

    TYPE = b"d"
    data: bytes

    def _payload(self) -> bytes:
        return _codec.put_bytes(self.data, "CopyData data")


@dataclass(frozen=True, slots=True)
class CopyDone(Message):
    """CopyDone ('c', both directions): empty."""

    TYPE = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    """CopyFail ('f'): String message, the reason the client aborts COPY FROM STDIN."""

    TYPE = b"f"
    message: str

    def _payload(self) -> bytes:
        return _codec.put_cstring(self.message, "CopyFail message")


@dataclass(frozen=True, slots=True)
class Terminate(Message):
    """Terminate ('X'): empty. The client is closing the connection."""

    TYPE = b"X"


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    """FunctionCall ('F'), the legacy fast-path interface: Int32 function OID, Int16 C + Int16[C]
    argument format codes, Int16 N + N x (Int32 length, -1 = NULL, Byten), Int16 result format.

    Decoded so that the proxy can refuse it with a clear error (it cannot be audited as SQL).
    """

    TYPE = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def __post_init__(self) -> None:
        tuple_fields(self, "arg_formats", "args")

    def _payload(self) -> bytes:
        _check_format_count(self.arg_formats, self.args, "FunctionCall")
        return (_codec.put_uint32(self.function_oid, "FunctionCall function_oid")
                + _formats_payload(self.arg_formats, "FunctionCall arg_formats")
                + _values_payload(self.args, "FunctionCall args")
                + _codec.put_int16(self.result_format, "FunctionCall result_format"))


# --- the password family: type 'p', meaning chosen by the server's authentication request ---

@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """PasswordMessage ('p'): String password (cleartext, or "md5" + 32 hex digits).

    Its ``repr`` hides the password.
    """

    TYPE = b"p"
    password: str

    def __repr__(self) -> str:
        return "PasswordMessage(password=<hidden>)"

    def _payload(self) -> bytes:
        return _codec.put_cstring(self.password, "PasswordMessage password")


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    """SASLInitialResponse ('p'): String mechanism, Int32 length (-1 = no initial response), Byten.

    ``data`` is ``None`` when the length is -1. Its ``repr`` hides ``data``.
    """

    TYPE = b"p"
    mechanism: str
    data: bytes | None = None

    def __repr__(self) -> str:
        shown = "None" if self.data is None else f"<{len(self.data)} bytes>"
        return f"SASLInitialResponse(mechanism={self.mechanism!r}, data={shown})"

    def _payload(self) -> bytes:
        return (_codec.put_cstring(self.mechanism, "SASLInitialResponse mechanism")
                + _codec.put_value(self.data, "SASLInitialResponse data"))


@dataclass(frozen=True, slots=True)
class SASLResponse(Message):
    """SASLResponse ('p'): Byten data, the rest of the message. Its ``repr`` hides ``data``."""

    TYPE = b"p"
    data: bytes

    def __repr__(self) -> str:
        return f"SASLResponse(data=<{len(self.data)} bytes>)"

    def _payload(self) -> bytes:
        return _codec.put_bytes(self.data, "SASLResponse data")


FrontendMessage = Union[Query, Parse, Bind, Describe, Execute, Sync, Flush, Close, CopyData, CopyDone,
                        CopyFail, Terminate, FunctionCall]
PasswordFamily = Union[PasswordMessage, SASLInitialResponse, SASLResponse]


def _password_payload(data: bytes | bytearray | memoryview | Frame, what: str) -> bytes:
    if isinstance(data, Frame):
        if data.type != b"p":
            raise ProtocolError(f"expected a password message ('p') as {what}, got type {data.type!r}")
        return data.payload
    return as_bytes(data)


def decode_password_message(payload: bytes | bytearray | memoryview | Frame) -> PasswordMessage:
    """Decode a 'p' message sent after AuthenticationCleartextPassword or AuthenticationMD5Password.

    Args:
        payload: the frame's payload (bytes after the length), or the ``Frame`` itself.
    Returns:
        ``PasswordMessage(password)``.
    Raises:
        ProtocolError: (remote=True, 08P01) if the payload is not exactly one NUL-terminated UTF-8
            string, or a Frame of another type is given.
    Spec: "Message Formats", PasswordMessage.
    """
    r = Reader(_password_payload(payload, "PasswordMessage"), "PasswordMessage")
    password = r.cstring()
    r.end()
    return PasswordMessage(password)


def decode_sasl_initial_response(payload: bytes | bytearray | memoryview | Frame) -> SASLInitialResponse:
    """Decode the first 'p' message after AuthenticationSASL.

    Args:
        payload: the frame's payload, or the ``Frame`` itself.
    Returns:
        ``SASLInitialResponse(mechanism, data)``; ``data`` is ``None`` for length -1.
    Raises:
        ProtocolError: (remote=True, 08P01) for a missing NUL, a length other than -1 that is
            negative or overruns the payload, or trailing bytes.
    Spec: "Message Formats", SASLInitialResponse; "SASL Authentication".
    """
    r = Reader(_password_payload(payload, "SASLInitialResponse"), "SASLInitialResponse")
    mechanism = r.cstring()
    data = r.value()
    r.end()
    return SASLInitialResponse(mechanism, data)


def decode_sasl_response(payload: bytes | bytearray | memoryview | Frame) -> SASLResponse:
    """Decode a later 'p' message of a SASL exchange (after AuthenticationSASLContinue).

    Args:
        payload: the frame's payload (all of it is the SASL data), or the ``Frame`` itself.
    Raises:
        ProtocolError: (remote=True) only if a Frame of another type is given.
    Spec: "Message Formats", SASLResponse.
    """
    return SASLResponse(_password_payload(payload, "SASLResponse"))


def _query(r: Reader) -> Query:
    return Query(r.cstring())


def _parse(r: Reader) -> Parse:
    name = r.cstring()
    query = r.cstring()
    types = tuple([r.uint32() for _ in range(r.uint16())])
    return Parse(name, query, types)


def _check_formats(r: Reader, formats: int, values: int, noun: str) -> None:
    if formats > 1 and formats != values:
        raise r.fail(f"{formats} {noun} format codes for {values} {noun}s")


def _bind(r: Reader) -> Bind:
    portal = r.cstring()
    statement = r.cstring()
    formats = _read_formats(r)
    params = _read_values(r)
    results = _read_formats(r)
    _check_formats(r, len(formats), len(params), "parameter")
    return Bind(portal, statement, formats, params, results)


def _describe(r: Reader) -> Describe:
    kind = _kind(r)
    return Describe(kind, r.cstring())


def _execute(r: Reader) -> Execute:
    portal = r.cstring()
    return Execute(portal, r.int32())


def _close(r: Reader) -> Close:
    kind = _kind(r)
    return Close(kind, r.cstring())


def _function_call(r: Reader) -> FunctionCall:
    oid = r.uint32()
    formats = _read_formats(r)
    args = _read_values(r)
    result_format = r.int16()
    _check_formats(r, len(formats), len(args), "argument")
    return FunctionCall(oid, formats, args, result_format)


def _password_family(r: Reader) -> Message:
    raise ProtocolError("a password message ('p') is only valid while authenticating; decode it with "
                        "decode_password_message / decode_sasl_initial_response / decode_sasl_response")


_SYNC, _FLUSH, _COPY_DONE, _TERMINATE = Sync(), Flush(), CopyDone(), Terminate()

_FRONTEND: dict[bytes, tuple[str, Callable[[Reader], Message]]] = {
    b"Q": ("Query", _query),
    b"P": ("Parse", _parse),
    b"B": ("Bind", _bind),
    b"D": ("Describe", _describe),
    b"E": ("Execute", _execute),
    b"S": ("Sync", lambda r: _SYNC),
    b"H": ("Flush", lambda r: _FLUSH),
    b"C": ("Close", _close),
    b"d": ("CopyData", lambda r: CopyData(r.rest())),
    b"c": ("CopyDone", lambda r: _COPY_DONE),
    b"f": ("CopyFail", lambda r: CopyFail(r.cstring())),
    b"X": ("Terminate", lambda r: _TERMINATE),
    b"F": ("FunctionCall", _function_call),
    b"p": ("password", _password_family),
}


def decode_frontend(frame: Frame) -> FrontendMessage:
    """Decode one frame a client sent after startup (any type but the password family 'p').

    Args:
        frame: from ``MessageDecoder.next_frame()`` on the client's bytes.
    Returns:
        one of Query, Parse, Bind, Describe, Execute, Sync, Flush, Close, CopyData, CopyDone,
        CopyFail, Terminate, FunctionCall.
    Raises:
        ProtocolError: (remote=True, 08P01) for an unknown type, a 'p' message (use the password
            decoders), or a malformed payload (see the module docstring).
    Spec: "Message Formats" (the messages marked F).
    """
    entry = _FRONTEND.get(frame.type)
    if entry is None:
        raise ProtocolError(f"invalid frontend message type {frame.type!r}")
    what, decode = entry
    r = Reader(as_bytes(frame.payload), what)
    message = decode(r)
    r.end()
    return message  # type: ignore[return-value]
