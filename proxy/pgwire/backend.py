"""Messages a backend (server) sends: typed decoding and encoding, and ErrorResponse helpers.

What it is for: turning a ``Frame`` from a PostgreSQL server into the typed message the proxy must
watch (authentication requests, ReadyForQuery and its transaction status, errors, COPY mode,
results) with ``decode_backend``; encoding every backend message (``Message.encode``) for what the
proxy itself answers to clients (AuthenticationSASL..., ParameterStatus, BackendKeyData,
ReadyForQuery, ErrorResponse, NoticeResponse); and ``error_response``/``notice_response`` to build
error frames from a severity, a SQLSTATE and a message. Formats follow the PostgreSQL 15 docs,
Frontend/Backend Protocol, "Message Formats" and "Error and Notice Message Fields"; text is UTF-8.

Every malformed payload raises ``ProtocolError`` (remote=True, 08P01) and nothing else: a string
without its NUL, a count or length that overruns, a negative length other than -1, trailing bytes,
invalid UTF-8, an unknown authentication code, a ReadyForQuery status other than I/T/E, a repeated
error field code. Counts (Int16) are read unsigned, OIDs unsigned, other integers as the docs type
them (Int16/Int32 signed).

What it must not do: any I/O, logging, or protocol-state decisions (what the proxy does with a
message lives in ``proxy/postgres``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Union

from . import _codec
from ._codec import Reader, as_bytes, tuple_fields
from .errors import ProtocolError
from .framing import Frame, Message
from .frontend import CopyData, CopyDone

# --- authentication requests ('R'): Int32 code, then a code-specific body ---

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Message):
    """AuthenticationOk ('R', Int32(0)): authentication succeeded."""

    TYPE = b"R"

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_OK, "code")


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5(Message):
    """AuthenticationKerberosV5 ('R', Int32(2)): obsolete; decoded only to be refused."""

    TYPE = b"R"

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_KERBEROS_V5, "code")


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Message):
    """AuthenticationCleartextPassword ('R', Int32(3)): send a PasswordMessage in clear text."""

    TYPE = b"R"

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_CLEARTEXT_PASSWORD, "code")


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Message):
    """AuthenticationMD5Password ('R', Int32(5), Byte4 salt).

    The client answers "md5" + hex(md5(hex(md5(password + user)) + salt)).
    """

    TYPE = b"R"
    salt: bytes

    def _payload(self) -> bytes:
        salt = _codec.put_bytes(self.salt, "AuthenticationMD5Password salt")
        if len(salt) != 4:
            raise ProtocolError("cannot encode AuthenticationMD5Password: salt must be 4 bytes",
                                remote=False)
        return _codec.put_int32(AUTH_MD5_PASSWORD, "code") + salt


@dataclass(frozen=True, slots=True)
class AuthenticationGSS(Message):
    """AuthenticationGSS ('R', Int32(7)): GSSAPI authentication; decoded only to be refused."""

    TYPE = b"R"

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_GSS, "code")


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue(Message):
    """AuthenticationGSSContinue ('R', Int32(8), Byten data); decoded only to be refused."""

    TYPE = b"R"
    data: bytes

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_GSS_CONTINUE, "code") + _codec.put_bytes(self.data, "data")


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI(Message):
    """AuthenticationSSPI ('R', Int32(9)): SSPI authentication; decoded only to be refused."""

    TYPE = b"R"

    def _payload(self) -> bytes:
        return _codec.put_int32(AUTH_SSPI, "code")


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Message):
    """AuthenticationSASL ('R', Int32(10), String mechanism..., Byte1(0)): start a SASL exchange.

    ``mechanisms`` in the server's order of preference, e.g. ``("SCRAM-SHA-256",)``.
    """

    TYPE = b"R"
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256",)

    def __post_init__(self) -> None:
        tuple_fields(self, "mechanisms")

    def _payload(self) -> bytes:
        what = "AuthenticationSASL mechanism"
        if isinstance(self.mechanisms, str) or any(m == "" for m in self.mechanisms):
            raise ProtocolError(f"cannot encode {what}: mechanisms must be non-empty names",
                                remote=False)
        return (_codec.put_int32(AUTH_SASL, "code")
                + b"".join(_codec.put_cstring(m, what) for m in self.mechanisms) + b"\0")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Message):
    """AuthenticationSASLContinue ('R', Int32(11), Byten data): a server challenge (SCRAM server-first)."""

    TYPE = b"R"
    data: bytes

    def _payload(self) -> bytes:
        return (_codec.put_int32(AUTH_SASL_CONTINUE, "code")
                + _codec.put_bytes(self.data, "AuthenticationSASLContinue data"))


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Message):
    """AuthenticationSASLFinal ('R', Int32(12), Byten data): the outcome (SCRAM server-final)."""

    TYPE = b"R"
    data: bytes

    def _payload(self) -> bytes:
        return (_codec.put_int32(AUTH_SASL_FINAL, "code")
                + _codec.put_bytes(self.data, "AuthenticationSASLFinal data"))


AuthenticationRequest = Union[AuthenticationOk, AuthenticationKerberosV5, AuthenticationCleartextPassword,
                              AuthenticationMD5Password, AuthenticationGSS, AuthenticationGSSContinue,
                              AuthenticationSSPI, AuthenticationSASL, AuthenticationSASLContinue,
                              AuthenticationSASLFinal]


# --- session status ---

@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    """ParameterStatus ('S' from a backend): String name, String value (e.g. server_version)."""

    TYPE = b"S"
    name: str
    value: str

    def _payload(self) -> bytes:
        return (_codec.put_cstring(self.name, "ParameterStatus name")
                + _codec.put_cstring(self.value, "ParameterStatus value"))


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    """BackendKeyData ('K'): Int32 process_id, Int32 secret_key (both signed), for CancelRequest."""

    TYPE = b"K"
    process_id: int
    secret_key: int

    def __repr__(self) -> str:
        return f"BackendKeyData(process_id={self.process_id!r}, secret_key=<hidden>)"

    def _payload(self) -> bytes:
        return (_codec.put_int32(self.process_id, "BackendKeyData process_id")
                + _codec.put_int32(self.secret_key, "BackendKeyData secret_key"))


TRANSACTION_IDLE = "I"
TRANSACTION_IN_BLOCK = "T"
TRANSACTION_FAILED = "E"


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    """ReadyForQuery ('Z'): Byte1 status: 'I' idle, 'T' in a transaction block, 'E' in a failed one."""

    TYPE = b"Z"
    status: str = TRANSACTION_IDLE

    def _payload(self) -> bytes:
        if self.status not in ("I", "T", "E"):
            raise ProtocolError(f"cannot encode ReadyForQuery: status {self.status!r} is not I, T or E",
                                remote=False)
        return self.status.encode()


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    """NegotiateProtocolVersion ('v'): Int32 newest minor version supported, Int32 n, String[n]
    protocol options (``_pq_.*``) the server did not recognize."""

    TYPE = b"v"
    newest_minor: int
    unrecognized_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "unrecognized_options")

    def _payload(self) -> bytes:
        what = "NegotiateProtocolVersion unrecognized_options"
        options = self.unrecognized_options
        if isinstance(options, str) or not isinstance(options, tuple):
            raise ProtocolError(f"cannot encode {what}: expected a sequence of names", remote=False)
        return (_codec.put_int32(self.newest_minor, "NegotiateProtocolVersion newest_minor")
                + _codec.put_int32(len(options), what)
                + b"".join(_codec.put_cstring(o, what) for o in options))


# --- errors and notices ---

ERROR_SEVERITIES = frozenset({"ERROR", "FATAL", "PANIC"})
NOTICE_SEVERITIES = frozenset({"WARNING", "NOTICE", "DEBUG", "INFO", "LOG"})

FIELD_CODES: Mapping[str, str] = MappingProxyType({
    "detail": "D",
    "hint": "H",
    "position": "P",
    "internal_position": "p",
    "internal_query": "q",
    "where": "W",
    "schema_name": "s",
    "table_name": "t",
    "column_name": "c",
    "data_type_name": "d",
    "constraint_name": "n",
    "file": "F",
    "line": "L",
    "routine": "R",
})
"""Keyword names accepted by ``error_response``/``notice_response`` and their one-letter field codes
("Error and Notice Message Fields"); S, V, C and M come from the positional arguments."""

_SQLSTATE = re.compile(r"[0-9A-Z]{5}")


def _fields_payload(fields: dict[str, str], what: str) -> bytes:
    if not isinstance(fields, dict):
        raise ProtocolError(f"cannot encode {what}: fields must be a dict", remote=False)
    out = []
    for code, value in fields.items():
        if not isinstance(code, str) or len(code) != 1 or not 0 < ord(code) < 256:
            raise ProtocolError(f"cannot encode {what}: field code {code!r} is not one non-NUL "
                                "Latin-1 character", remote=False)
        out.append(code.encode("latin-1"))
        out.append(_codec.put_cstring(value, f"{what} field {code!r}"))
    out.append(b"\0")
    return b"".join(out)


class _FieldsMessage(Message):
    """ErrorResponse and NoticeResponse: (Byte1 code, String value)* then Byte1(0)."""

    __slots__ = ()
    fields: dict[str, str]

    @property
    def severity(self) -> str | None:
        """The non-localized severity 'V' (PostgreSQL 9.6+), else the localized 'S'."""
        return self.fields.get("V") or self.fields.get("S")

    @property
    def sqlstate(self) -> str | None:
        """The SQLSTATE code, field 'C'."""
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        """The primary human-readable message, field 'M'."""
        return self.fields.get("M")

    def _payload(self) -> bytes:
        return _fields_payload(self.fields, type(self).__name__)


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsMessage):
    """ErrorResponse ('E'): ``fields`` keyed by one-letter codes ('S', 'V', 'C', 'M', 'D', 'H'...)."""

    TYPE = b"E"
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsMessage):
    """NoticeResponse ('N'): ``fields`` keyed by one-letter codes, as in ErrorResponse."""

    TYPE = b"N"
    fields: dict[str, str] = field(default_factory=dict)


def _build_fields(severity: str, sqlstate: str, message: str, extra: dict[str, object],
                  allowed: frozenset[str], what: str) -> dict[str, str]:
    if severity not in allowed:
        raise ProtocolError(f"cannot encode {what}: severity {severity!r} is not one of "
                            f"{', '.join(sorted(allowed))}", remote=False)
    if not isinstance(sqlstate, str) or not _SQLSTATE.fullmatch(sqlstate):
        raise ProtocolError(f"cannot encode {what}: SQLSTATE {sqlstate!r} is not 5 characters "
                            "from 0-9A-Z", remote=False)
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    for name, value in extra.items():
        code = FIELD_CODES.get(name)
        if code is None:
            raise TypeError(f"{what}: unknown field {name!r} (known: {', '.join(FIELD_CODES)})")
        if value is None:
            continue
        fields[code] = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return fields  # type: ignore[return-value]


def error_response(severity: str, sqlstate: str, message: str, **fields: object) -> bytes:
    """Encode an ErrorResponse ('E') frame.

    Args:
        severity: "ERROR", "FATAL" or "PANIC" (sent as both 'S' and the non-localized 'V').
        sqlstate: five characters from 0-9A-Z, e.g. "08P01", "28P01" (field 'C').
        message: the primary message (field 'M').
        **fields: optional ``detail``, ``hint``, ``position``, ``where``... (see ``FIELD_CODES``);
            str values, or int for positions/lines; ``None`` leaves the field out.
    Returns:
        the complete message bytes.
    Raises:
        ProtocolError: (remote=False) for a bad severity or SQLSTATE, a NUL or lone surrogate in text.
        TypeError: for an unknown keyword.
    Spec: "Message Formats", ErrorResponse; "Error and Notice Message Fields".
    """
    return ErrorResponse(_build_fields(severity, sqlstate, message, fields, ERROR_SEVERITIES,
                                       "ErrorResponse")).encode()


def notice_response(severity: str, sqlstate: str, message: str, **fields: object) -> bytes:
    """Encode a NoticeResponse ('N') frame; as ``error_response`` but ``severity`` is one of
    "WARNING", "NOTICE", "DEBUG", "INFO", "LOG" (a notice's SQLSTATE is often "00000" or "01000").

    Spec: "Message Formats", NoticeResponse; "Error and Notice Message Fields".
    """
    return NoticeResponse(_build_fields(severity, sqlstate, message, fields, NOTICE_SEVERITIES,
                                        "NoticeResponse")).encode()


# --- query results ---

@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    """CommandComplete ('C' from a backend): String tag, e.g. "SELECT 3", "INSERT 0 1", "COPY 10"."""

    TYPE = b"C"
    tag: str

    def _payload(self) -> bytes:
        return _codec.put_cstring(self.tag, "CommandComplete tag")


class _CopyResponse(Message):
    """CopyIn/Out/BothResponse: Int8 overall format (0 text, 1 binary), Int16 n, Int16[n] formats."""

    __slots__ = ()
    format: int
    column_formats: tuple[int, ...]

    def _payload(self) -> bytes:
        what = f"{type(self).__name__} column_formats"
        formats = self.column_formats
        return (_codec.put_int8(self.format, f"{type(self).__name__} format")
                + _codec.put_uint16(_codec.put_count(formats, what), what)
                + b"".join(_codec.put_int16(f, what) for f in formats))


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    """CopyInResponse ('G'): the server awaits CopyData from the client (COPY ... FROM STDIN)."""

    TYPE = b"G"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "column_formats")


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    """CopyOutResponse ('H' from a backend): CopyData follows from the server (COPY ... TO STDOUT)."""

    TYPE = b"H"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "column_formats")


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    """CopyBothResponse ('W'): CopyData both ways (streaming replication only)."""

    TYPE = b"W"
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "column_formats")


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription: String name, Int32 table OID (0 if none), Int16 column
    attribute number (0 if none), Int32 type OID, Int16 type size (negative = variable),
    Int32 type modifier, Int16 format code (0 text, 1 binary)."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0

    def encode(self) -> bytes:
        """The 18 + len(name) + 1 bytes of this column. Raises ProtocolError (remote=False)."""
        return (_codec.put_cstring(self.name, "FieldDescription name")
                + _codec.put_uint32(self.table_oid, "FieldDescription table_oid")
                + _codec.put_int16(self.column_number, "FieldDescription column_number")
                + _codec.put_uint32(self.type_oid, "FieldDescription type_oid")
                + _codec.put_int16(self.type_size, "FieldDescription type_size")
                + _codec.put_int32(self.type_modifier, "FieldDescription type_modifier")
                + _codec.put_int16(self.format, "FieldDescription format"))


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    """RowDescription ('T'): Int16 n, then n column descriptions (``FieldDescription``)."""

    TYPE = b"T"
    fields: tuple[FieldDescription, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "fields")

    def _payload(self) -> bytes:
        what = "RowDescription fields"
        for f in self.fields:
            if not isinstance(f, FieldDescription):
                raise ProtocolError(f"cannot encode {what}: expected FieldDescription items", remote=False)
        return (_codec.put_uint16(_codec.put_count(self.fields, what), what)
                + b"".join(f.encode() for f in self.fields))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """DataRow ('D' from a backend): Int16 n, n x (Int32 length, -1 = NULL, Byten value)."""

    TYPE = b"D"
    values: tuple[bytes | None, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "values")

    def _payload(self) -> bytes:
        what = "DataRow values"
        return (_codec.put_uint16(_codec.put_count(self.values, what), what)
                + b"".join(_codec.put_value(v, what) for v in self.values))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(Message):
    """EmptyQueryResponse ('I'): the query string was empty (replaces CommandComplete)."""

    TYPE = b"I"


@dataclass(frozen=True, slots=True)
class ParseComplete(Message):
    """ParseComplete ('1'): empty."""

    TYPE = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(Message):
    """BindComplete ('2'): empty."""

    TYPE = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(Message):
    """CloseComplete ('3'): empty."""

    TYPE = b"3"


@dataclass(frozen=True, slots=True)
class NoData(Message):
    """NoData ('n'): the described statement or portal returns no rows."""

    TYPE = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended(Message):
    """PortalSuspended ('s'): Execute's row limit was reached."""

    TYPE = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    """ParameterDescription ('t'): Int16 n, Int32[n] parameter type OIDs."""

    TYPE = b"t"
    type_oids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "type_oids")

    def _payload(self) -> bytes:
        what = "ParameterDescription type_oids"
        return (_codec.put_uint16(_codec.put_count(self.type_oids, what), what)
                + b"".join(_codec.put_uint32(t, what) for t in self.type_oids))


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    """NotificationResponse ('A'): Int32 notifying process id, String channel, String payload."""

    TYPE = b"A"
    process_id: int
    channel: str
    payload: str = ""

    def _payload(self) -> bytes:
        return (_codec.put_int32(self.process_id, "NotificationResponse process_id")
                + _codec.put_cstring(self.channel, "NotificationResponse channel")
                + _codec.put_cstring(self.payload, "NotificationResponse payload"))


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    """FunctionCallResponse ('V'): Int32 length (-1 = NULL), Byten result."""

    TYPE = b"V"
    result: bytes | None = None

    def _payload(self) -> bytes:
        return _codec.put_value(self.result, "FunctionCallResponse result")


BackendMessage = Union[AuthenticationRequest, ParameterStatus, BackendKeyData, ReadyForQuery,
                       NegotiateProtocolVersion, ErrorResponse, NoticeResponse, CommandComplete,
                       CopyInResponse, CopyOutResponse, CopyBothResponse, RowDescription, DataRow,
                       EmptyQueryResponse, ParseComplete, BindComplete, CloseComplete, NoData,
                       PortalSuspended, ParameterDescription, NotificationResponse,
                       FunctionCallResponse, CopyData, CopyDone]


# --- decoding ---

_AUTH_SINGLETONS = {
    AUTH_OK: AuthenticationOk(),
    AUTH_KERBEROS_V5: AuthenticationKerberosV5(),
    AUTH_CLEARTEXT_PASSWORD: AuthenticationCleartextPassword(),
    AUTH_GSS: AuthenticationGSS(),
    AUTH_SSPI: AuthenticationSSPI(),
}


def _authentication(r: Reader) -> Message:
    code = r.int32()
    single = _AUTH_SINGLETONS.get(code)
    if single is not None:
        return single
    if code == AUTH_MD5_PASSWORD:
        return AuthenticationMD5Password(r.take(4))
    if code == AUTH_SASL:
        mechanisms = []
        while True:
            name = r.cstring()
            if name == "":
                break
            mechanisms.append(name)
        return AuthenticationSASL(tuple(mechanisms))
    if code == AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(r.rest())
    if code == AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(r.rest())
    if code == AUTH_GSS_CONTINUE:
        return AuthenticationGSSContinue(r.rest())
    raise r.fail(f"unknown authentication request code {code}")


def _ready_for_query(r: Reader) -> ReadyForQuery:
    b = r.byte()
    if b not in (0x49, 0x54, 0x45):  # I T E
        raise r.fail(f"invalid transaction status {bytes((b,))!r} (expected 'I', 'T' or 'E')")
    return _READY[b]


_READY = {0x49: ReadyForQuery("I"), 0x54: ReadyForQuery("T"), 0x45: ReadyForQuery("E")}


def _fields(r: Reader) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = r.byte()
        if code == 0:
            return fields
        key = chr(code)
        value = r.cstring()
        if key in fields:
            raise r.fail(f"field {key!r} given twice")
        fields[key] = value


def _negotiate(r: Reader) -> NegotiateProtocolVersion:
    newest = r.int32()
    n = r.int32()
    if n < 0:
        raise r.fail(f"negative option count {n}")
    options = []
    for _ in range(n):
        options.append(r.cstring())
    return NegotiateProtocolVersion(newest, tuple(options))


def _copy_response(cls: type) -> Callable[[Reader], Message]:
    def decode(r: Reader) -> Message:
        b = r.byte()
        overall = b - 256 if b > 127 else b
        formats = tuple([r.int16() for _ in range(r.uint16())])
        return cls(overall, formats)
    return decode


def _row_description(r: Reader) -> RowDescription:
    fields = []
    for _ in range(r.uint16()):
        name = r.cstring()
        fields.append(FieldDescription(name, r.uint32(), r.int16(), r.uint32(), r.int16(), r.int32(),
                                       r.int16()))
    return RowDescription(tuple(fields))


def _data_row(r: Reader) -> DataRow:
    return DataRow(tuple([r.value() for _ in range(r.uint16())]))


def _parameter_description(r: Reader) -> ParameterDescription:
    return ParameterDescription(tuple([r.uint32() for _ in range(r.uint16())]))


def _notification(r: Reader) -> NotificationResponse:
    pid = r.int32()
    channel = r.cstring()
    return NotificationResponse(pid, channel, r.cstring())


def _const(message: Message) -> Callable[[Reader], Message]:
    return lambda r: message


_BACKEND: dict[bytes, tuple[str, Callable[[Reader], Message]]] = {
    b"R": ("Authentication", _authentication),
    b"S": ("ParameterStatus", lambda r: ParameterStatus(r.cstring(), r.cstring())),
    b"K": ("BackendKeyData", lambda r: BackendKeyData(r.int32(), r.int32())),
    b"Z": ("ReadyForQuery", _ready_for_query),
    b"v": ("NegotiateProtocolVersion", _negotiate),
    b"E": ("ErrorResponse", lambda r: ErrorResponse(_fields(r))),
    b"N": ("NoticeResponse", lambda r: NoticeResponse(_fields(r))),
    b"C": ("CommandComplete", lambda r: CommandComplete(r.cstring())),
    b"G": ("CopyInResponse", _copy_response(CopyInResponse)),
    b"H": ("CopyOutResponse", _copy_response(CopyOutResponse)),
    b"W": ("CopyBothResponse", _copy_response(CopyBothResponse)),
    b"T": ("RowDescription", _row_description),
    b"D": ("DataRow", _data_row),
    b"I": ("EmptyQueryResponse", _const(EmptyQueryResponse())),
    b"1": ("ParseComplete", _const(ParseComplete())),
    b"2": ("BindComplete", _const(BindComplete())),
    b"3": ("CloseComplete", _const(CloseComplete())),
    b"n": ("NoData", _const(NoData())),
    b"s": ("PortalSuspended", _const(PortalSuspended())),
    b"t": ("ParameterDescription", _parameter_description),
    b"A": ("NotificationResponse", _notification),
    b"V": ("FunctionCallResponse", lambda r: FunctionCallResponse(r.value())),
    b"d": ("CopyData", lambda r: CopyData(r.rest())),
    b"c": ("CopyDone", _const(CopyDone())),
}


def decode_backend(frame: Frame) -> BackendMessage:
    """Decode one frame a server sent (after its answer to SSLRequest, if any).

    Args:
        frame: from ``MessageDecoder.next_frame()`` on the server's bytes.
    Returns:
        the typed message (see ``BackendMessage``); authentication requests decode to their own
        classes (``AuthenticationOk``, ``AuthenticationSASL``...).
    Raises:
        ProtocolError: (remote=True, 08P01) for an unknown type or a malformed payload (see the
            module docstring).
    Spec: "Message Formats" (the messages marked B).
    """
    entry = _BACKEND.get(frame.type)
    if entry is None:
        raise ProtocolError(f"invalid backend message type {frame.type!r}")
    what, decode = entry
    r = Reader(as_bytes(frame.payload), what)
    message = decode(r)
    r.end()
    return message  # type: ignore[return-value]
