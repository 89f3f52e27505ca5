"""proxy.pgwire backend messages: exact bytes of each, every malformed case, error helpers.

Expected bytes are built by hand with struct, never with the code under test.
"""

from __future__ import annotations

import struct

import pytest

from proxy.pgwire import (
    AuthenticationCleartextPassword,
    AuthenticationGSS,
    AuthenticationGSSContinue,
    AuthenticationKerberosV5,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationSSPI,
    BackendKeyData,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FieldDescription,
    Frame,
    FunctionCallResponse,
    MessageDecoder,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ProtocolError,
    ReadyForQuery,
    RowDescription,
    decode_backend,
    error_response,
    notice_response,
)


def raw(type_: bytes, payload: bytes) -> bytes:
    return type_ + struct.pack("!i", len(payload) + 4) + payload


def h(*values: int) -> bytes:
    return struct.pack(f"!{len(values)}h", *values)


def i(*values: int) -> bytes:
    return struct.pack(f"!{len(values)}i", *values)


ROW_DESCRIPTION = (h(2)
                   + b"id\0" + struct.pack("!IhIhih", 16384, 1, 23, 4, -1, 0)
                   + b"name\0" + struct.pack("!IhIhih", 16384, 2, 1043, -1, 68, 1))

EXAMPLES = [
    (raw(b"R", i(0)), AuthenticationOk()),
    (raw(b"R", i(2)), AuthenticationKerberosV5()),
    (raw(b"R", i(3)), AuthenticationCleartextPassword()),
    (raw(b"R", i(5) + b"\x01\x02\x03\x04"), AuthenticationMD5Password(b"\x01\x02\x03\x04")),
    (raw(b"R", i(7)), AuthenticationGSS()),
    (raw(b"R", i(8) + b"tok"), AuthenticationGSSContinue(b"tok")),
    (raw(b"R", i(9)), AuthenticationSSPI()),
    (raw(b"R", i(10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
     AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))),
    (raw(b"R", i(10) + b"\0"), AuthenticationSASL(())),
    (raw(b"R", i(11) + b"r=abc,s=c2FsdA==,i=4096"), AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096")),
    (raw(b"R", i(12) + b"v=c2lnbmF0dXJl"), AuthenticationSASLFinal(b"v=c2lnbmF0dXJl")),
    (raw(b"S", b"server_version\x0015.4\0"), ParameterStatus("server_version", "15.4")),
    (raw(b"S", b"application_name\0\0"), ParameterStatus("application_name", "")),
    (raw(b"K", i(31337, -12345)), BackendKeyData(31337, -12345)),
    (raw(b"Z", b"I"), ReadyForQuery("I")),
    (raw(b"Z", b"T"), ReadyForQuery("T")),
    (raw(b"Z", b"E"), ReadyForQuery("E")),
    (raw(b"v", i(0, 2) + b"_pq_.a\0_pq_.b\0"), NegotiateProtocolVersion(0, ("_pq_.a", "_pq_.b"))),
    (raw(b"E", b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0P15\0\0"),
     ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42P01", "M": 'relation "x" does not exist',
                    "P": "15"})),
    (raw(b"E", b"\0"), ErrorResponse({})),
    (raw(b"N", b"SNOTICE\0C00000\0Mhello\0\0"), NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hello"})),
    (raw(b"C", b"SELECT 2\0"), CommandComplete("SELECT 2")),
    (raw(b"C", b"INSERT 0 1\0"), CommandComplete("INSERT 0 1")),
    (raw(b"G", b"\0" + h(2, 0, 0)), CopyInResponse(0, (0, 0))),
    (raw(b"H", b"\1" + h(1, 1)), CopyOutResponse(1, (1,))),
    (raw(b"W", b"\0" + h(0)), CopyBothResponse(0, ())),
    (raw(b"T", ROW_DESCRIPTION),
     RowDescription((FieldDescription("id", 16384, 1, 23, 4, -1, 0),
                     FieldDescription("name", 16384, 2, 1043, -1, 68, 1)))),
    (raw(b"T", h(0)), RowDescription(())),
    (raw(b"D", h(3) + i(1) + b"1" + i(-1) + i(0)), DataRow((b"1", None, b""))),
    (raw(b"D", h(0)), DataRow(())),
    (raw(b"I", b""), EmptyQueryResponse()),
    (raw(b"1", b""), ParseComplete()),
    (raw(b"2", b""), BindComplete()),
    (raw(b"3", b""), CloseComplete()),
    (raw(b"n", b""), NoData()),
    (raw(b"s", b""), PortalSuspended()),
    (raw(b"t", h(2) + struct.pack("!II", 23, 25)), ParameterDescription((23, 25))),
    (raw(b"A", i(4242) + b"jobs\0{\"id\": 1}\0"), NotificationResponse(4242, "jobs", '{"id": 1}')),
    (raw(b"V", i(4) + b"\0\0\0\1"), FunctionCallResponse(b"\0\0\0\1")),
    (raw(b"V", i(-1)), FunctionCallResponse(None)),
    (raw(b"d", b"1\tx\n"), CopyData(b"1\tx\n")),
    (raw(b"c", b""), CopyDone()),
]


@pytest.mark.parametrize("wire, message", EXAMPLES,
                         ids=lambda x: "" if isinstance(x, bytes) else type(x).__name__)
def test_decode_and_encode_exact_bytes(wire, message):
    d = MessageDecoder.for_backend_messages()
    d.feed(wire)
    frame = d.next_frame()
    assert decode_backend(frame) == message
    assert message.encode() == wire


def test_error_response_helpers():
    e = decode_backend(Frame(b"E", b"SFEHLER\0VERROR\0C57014\0Mcanceling statement due to user request\0\0"))
    assert (e.severity, e.sqlstate) == ("ERROR", "57014")
    assert e.message == "canceling statement due to user request"
    old = ErrorResponse({"S": "FATAL", "C": "28P01", "M": "x"})  # before 9.6: no 'V'
    assert old.severity == "FATAL"
    assert ErrorResponse({}).severity is None and ErrorResponse({}).sqlstate is None


def test_error_response_function_bytes():
    got = error_response("FATAL", "28P01", 'password authentication failed for user "alice"')
    want = raw(b"E", b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"alice\"\0\0")
    assert got == want
    got = error_response("ERROR", "42601", "syntax error", position=8, hint="check it", detail=None)
    assert got == raw(b"E", b"SERROR\0VERROR\0C42601\0Msyntax error\0P8\0Hcheck it\0\0")


def test_notice_response_function_bytes():
    got = notice_response("WARNING", "01000", "access ends in 5 minutes", detail="grant 17")
    assert got == raw(b"N", b"SWARNING\0VWARNING\0C01000\0Maccess ends in 5 minutes\0Dgrant 17\0\0")


@pytest.mark.parametrize("call, exc", [
    (lambda: error_response("NOTICE", "08P01", "x"), ProtocolError),
    (lambda: error_response("fatal", "08P01", "x"), ProtocolError),
    (lambda: notice_response("ERROR", "00000", "x"), ProtocolError),
    (lambda: error_response("ERROR", "8P01", "x"), ProtocolError),
    (lambda: error_response("ERROR", "08p01", "x"), ProtocolError),
    (lambda: error_response("ERROR", "08P01", "a\0b"), ProtocolError),
    (lambda: error_response("ERROR", "08P01", "x", hint="\ud800"), ProtocolError),
    (lambda: error_response("ERROR", "08P01", "x", colour="red"), TypeError),
])
def test_error_response_function_refusals(call, exc):
    with pytest.raises(exc) as info:
        call()
    if exc is ProtocolError:
        assert info.value.remote is False


def test_protocol_error_to_error_response():
    err = ProtocolError("invalid message length 1073741824", sqlstate="08P01")
    assert err.to_error_response() == raw(
        b"E", b"SFATAL\0VFATAL\0C08P01\0Minvalid message length 1073741824\0\0")
    assert decode_backend(Frame(b"E", err.to_error_response("ERROR")[5:])).severity == "ERROR"
    assert err.remote is True and str(err) == err.message
    assert ProtocolError("x").sqlstate == "08P01"


def test_secret_key_hidden_from_repr():
    assert "-12345" not in repr(BackendKeyData(1, -12345))


MALFORMED = [
    (b"R", b"", "truncated"),
    (b"R", i(0) + b"x", "trailing"),
    (b"R", i(3) + b"x", "trailing"),
    (b"R", i(5) + b"abc", "truncated"),
    (b"R", i(5) + b"abcde", "trailing"),
    (b"R", i(10) + b"SCRAM-SHA-256\0", "NUL"),  # list not ended by an empty string
    (b"R", i(10), "NUL"),
    (b"R", i(10) + b"SCRAM\0\0x", "trailing"),
    (b"R", i(10) + b"\xff\0\0", "UTF-8"),
    (b"R", i(1), "unknown authentication"),
    (b"R", i(6), "unknown authentication"),
    (b"R", i(-1), "unknown authentication"),
    (b"S", b"name\0", "NUL"),
    (b"S", b"name\0value\0x", "trailing"),
    (b"K", i(1), "truncated"),
    (b"K", i(1, 2) + b"x", "trailing"),
    (b"Z", b"", "truncated"),
    (b"Z", b"X", "transaction status"),
    (b"Z", b"II", "trailing"),
    (b"v", i(0, 1), "NUL"),
    (b"v", i(0, -1), "negative"),
    (b"v", i(0), "truncated"),
    (b"E", b"", "truncated"),
    (b"E", b"SERROR\0", "truncated"),      # no final zero byte
    (b"E", b"SERROR", "NUL"),
    (b"E", b"SERROR\0\0x", "trailing"),
    (b"E", b"SERROR\0SFATAL\0\0", "twice"),
    (b"N", b"M\xc3\0\0", "UTF-8"),
    (b"C", b"SELECT 1", "NUL"),
    (b"C", b"SELECT 1\0\0", "trailing"),
    (b"G", b"", "truncated"),
    (b"G", b"\0" + h(2, 0), "truncated"),
    (b"H", b"\0" + h(0) + b"x", "trailing"),
    (b"W", b"\0\0", "truncated"),
    (b"T", h(1) + b"id\0" + struct.pack("!IhIhi", 1, 1, 23, 4, -1), "truncated"),
    (b"T", h(1) + b"id", "NUL"),
    (b"T", h(0) + b"x", "trailing"),
    (b"T", h(-1), "NUL"),
    (b"D", h(1), "truncated"),
    (b"D", h(1) + i(5) + b"abc", "truncated"),
    (b"D", h(1) + i(-2), "negative"),
    (b"D", h(2) + i(-1), "truncated"),
    (b"D", h(0) + b"x", "trailing"),
    (b"D", b"\0", "truncated"),
    (b"I", b"x", "trailing"),
    (b"1", b"x", "trailing"),
    (b"2", b"x", "trailing"),
    (b"3", b"x", "trailing"),
    (b"n", b"x", "trailing"),
    (b"s", b"x", "trailing"),
    (b"c", b"x", "trailing"),
    (b"t", h(2) + i(23), "truncated"),
    (b"A", i(1) + b"chan\0", "NUL"),
    (b"A", i(1) + b"chan\0p\0x", "trailing"),
    (b"A", b"\0\0", "truncated"),
    (b"V", i(3) + b"ab", "truncated"),
    (b"V", i(-3), "negative"),
]


@pytest.mark.parametrize("type_, payload, reason", MALFORMED)
def test_malformed_payloads_raise_protocol_error(type_, payload, reason):
    with pytest.raises(ProtocolError) as info:
        decode_backend(Frame(type_, payload))
    err = info.value
    assert err.remote is True and err.sqlstate == "08P01"
    assert reason in err.message, err.message


@pytest.mark.parametrize("type_", [b"Q", b"P", b"B", b"X", b"p", b"\0", b"F"])
def test_unknown_backend_types(type_):
    with pytest.raises(ProtocolError, match="invalid backend message type"):
        decode_backend(Frame(type_, b""))


@pytest.mark.parametrize("message, reason", [
    (AuthenticationMD5Password(b"abc"), "4 bytes"),
    (AuthenticationSASL(("",)), "non-empty"),
    (AuthenticationSASL("SCRAM-SHA-256"), "non-empty"),
    (AuthenticationSASL(("A\0B",)), "NUL"),
    (ReadyForQuery("X"), "status"),
    (BackendKeyData(2**31, 0), "outside"),
    (ErrorResponse({"SS": "x"}), "field code"),
    (ErrorResponse({"\0": "x"}), "field code"),
    (ErrorResponse({"M": "a\0"}), "NUL"),
    (ErrorResponse([("M", "x")]), "dict"),
    (CopyInResponse(200, ()), "outside"),
    (CopyOutResponse(0, (0,) * 65536), "65535"),
    (RowDescription(("id",)), "FieldDescription"),
    (RowDescription((FieldDescription("id", table_oid=-1),)), "outside"),
    (DataRow((1,)), "bytes"),
    (ParameterDescription((-5,)), "outside"),
    (NotificationResponse(1, "c\0", ""), "NUL"),
    (NegotiateProtocolVersion(0, "_pq_.a"), "sequence"),
])
def test_encoders_refuse_unencodable_values_as_local_errors(message, reason):
    with pytest.raises(ProtocolError) as info:
        message.encode()
    assert info.value.remote is False
    assert reason in info.value.message, info.value.message
