"""proxy.pgwire frontend messages: exact bytes of each, every malformed case, the 'p' family.

Expected bytes are built by hand with struct, never with the code under test.
"""

from __future__ import annotations

import struct

import pytest

from proxy.pgwire import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    Frame,
    FunctionCall,
    MessageDecoder,
    Parse,
    PasswordMessage,
    ProtocolError,
    Query,
    SASLInitialResponse,
    SASLResponse,
    Sync,
    Terminate,
    decode_frontend,
    decode_password_message,
    decode_sasl_initial_response,
    decode_sasl_response,
)


def raw(type_: bytes, payload: bytes) -> bytes:
    return type_ + struct.pack("!i", len(payload) + 4) + payload


def h(*counts: int) -> bytes:
    return struct.pack(f"!{len(counts)}h", *counts)


def i(*values: int) -> bytes:
    return struct.pack(f"!{len(values)}i", *values)


BIND_PAYLOAD = (b"portal\0stmt\0" + h(2, 0, 1) + h(2) + i(3) + b"abc" + i(-1) + h(1, 1))

EXAMPLES = [
    (raw(b"Q", b"SELECT 1;\0"), Query("SELECT 1;")),
    (raw(b"Q", b"SELECT '\xc3\xa9'\0"), Query("SELECT 'é'")),
    (raw(b"Q", b"\0"), Query("")),
    (raw(b"P", b"s1\0SELECT $1, $2\0" + h(2) + struct.pack("!II", 23, 4294967295)),
     Parse("s1", "SELECT $1, $2", (23, 4294967295))),
    (raw(b"P", b"\0SELECT 1\0" + h(0)), Parse("", "SELECT 1")),
    (raw(b"B", BIND_PAYLOAD), Bind("portal", "stmt", (0, 1), (b"abc", None), (1,))),
    (raw(b"B", b"\0\0" + h(0, 0, 0)), Bind("", "")),
    (raw(b"B", b"\0\0" + h(1, 1, 1) + i(0) + h(0)), Bind("", "", (1,), (b"",), ())),
    (raw(b"D", b"Sstmt\0"), Describe("S", "stmt")),
    (raw(b"D", b"P\0"), Describe("P", "")),
    (raw(b"E", b"portal\0" + i(0)), Execute("portal", 0)),
    (raw(b"E", b"\0" + i(100)), Execute("", 100)),
    (raw(b"S", b""), Sync()),
    (raw(b"H", b""), Flush()),
    (raw(b"C", b"Sstmt\0"), Close("S", "stmt")),
    (raw(b"C", b"P\0"), Close("P", "")),
    (raw(b"d", b"1\t2\n"), CopyData(b"1\t2\n")),
    (raw(b"d", b""), CopyData(b"")),
    (raw(b"c", b""), CopyDone()),
    (raw(b"f", b"aborted by user\0"), CopyFail("aborted by user")),
    (raw(b"X", b""), Terminate()),
    (raw(b"F", struct.pack("!I", 1598) + h(1, 1) + h(2) + i(4) + b"\0\0\0\x2a" + i(-1) + h(1)),
     FunctionCall(1598, (1,), (b"\0\0\0\x2a", None), 1)),
]


@pytest.mark.parametrize("wire, message", EXAMPLES,
                         ids=lambda x: "" if isinstance(x, bytes) else type(x).__name__)
def test_decode_and_encode_exact_bytes(wire, message):
    d = MessageDecoder.for_frontend_messages()
    d.feed(wire)
    frame = d.next_frame()
    assert decode_frontend(frame) == message
    assert message.encode() == wire
    assert message.to_frame() == frame


def test_bind_param_format_helper():
    assert Bind("", "", (), (b"1", b"2")).param_format(1) == 0
    assert Bind("", "", (1,), (b"1", b"2")).param_format(1) == 1
    assert Bind("", "", (0, 1), (b"1", b"2")).param_format(1) == 1


def test_lists_are_stored_as_tuples():
    assert Parse("", "x", [23]) == Parse("", "x", (23,))
    assert Bind("", "", [0], [b"x"], [1]).params == (b"x",)


MALFORMED = [
    # strings without their NUL
    (b"Q", b"SELECT 1", "NUL"),
    (b"P", b"s1\0SELECT", "NUL"),
    (b"B", b"portal", "NUL"),
    (b"D", b"Sstmt", "NUL"),
    (b"E", b"portal", "NUL"),
    (b"C", b"S", "NUL"),
    (b"f", b"oops", "NUL"),
    # trailing bytes
    (b"Q", b"SELECT 1\0x", "trailing"),
    (b"Q", b"SELECT 1\0\0", "trailing"),
    (b"P", b"\0x\0" + h(0) + b"!", "trailing"),
    (b"B", b"\0\0" + h(0, 0, 0) + b"!", "trailing"),
    (b"D", b"Sx\0y", "trailing"),
    (b"E", b"\0" + i(0) + b"!", "trailing"),
    (b"S", b"x", "trailing"),
    (b"H", b"\0", "trailing"),
    (b"X", b"x", "trailing"),
    (b"c", b"x", "trailing"),
    (b"C", b"Sx\0y", "trailing"),
    (b"f", b"x\0y", "trailing"),
    (b"F", struct.pack("!I", 1) + h(0, 0, 0) + b"!", "trailing"),
    # counts and lengths that overrun
    (b"P", b"\0x\0" + h(2) + i(23), "truncated"),
    (b"P", b"\0x\0" + h(-1), "truncated"),  # 65535 as PostgreSQL reads it
    (b"B", b"\0\0" + h(3, 0, 0), "truncated"),
    (b"B", b"\0\0" + h(0, 1) + i(10) + b"abc", "truncated"),
    (b"B", b"\0\0" + h(0, 2) + i(0), "truncated"),
    (b"B", b"\0\0" + h(0, 0), "truncated"),  # result format count missing
    (b"B", b"\0\0" + h(0, 0, 2, 0), "truncated"),
    (b"B", b"\0\0" + h(0, 1) + b"\0\0", "truncated"),
    (b"E", b"\0" + b"\0\0", "truncated"),
    (b"E", b"\0", "truncated"),
    (b"F", b"\0\0", "truncated"),
    (b"F", struct.pack("!I", 1) + h(0, 1) + i(5) + b"ab", "truncated"),
    (b"F", struct.pack("!I", 1) + h(0, 0), "truncated"),
    (b"D", b"", "truncated"),
    (b"C", b"", "truncated"),
    # negative lengths other than -1
    (b"B", b"\0\0" + h(0, 1) + i(-2) + h(0), "negative"),
    (b"B", b"\0\0" + h(0, 1) + i(-2**31) + h(0), "negative"),
    (b"F", struct.pack("!I", 1) + h(0, 1) + i(-5) + h(0), "negative"),
    # format counts that match neither 0, 1 nor the value count
    (b"B", b"\0\0" + h(2, 0, 0, 3) + i(-1, -1, -1) + h(0), "format codes"),
    (b"F", struct.pack("!I", 1) + h(2, 0, 0, 1) + i(-1) + h(0), "format codes"),
    # kinds
    (b"D", b"Xstmt\0", "kind"),
    (b"C", b"s\0", "kind"),
    # invalid UTF-8
    (b"Q", b"SELECT '\xff'\0", "UTF-8"),
    (b"Q", b"SELECT '\xc3'\0", "UTF-8"),
    (b"Q", b"SELECT '\xed\xa0\x80'\0", "UTF-8"),  # an encoded surrogate
    (b"Q", b"SELECT '\xc0\xaf'\0", "UTF-8"),      # overlong
    (b"P", b"\0\xfe\0" + h(0), "UTF-8"),
    (b"B", b"\xff\0\0" + h(0, 0, 0), "UTF-8"),
    (b"f", b"\x80\0", "UTF-8"),
]


@pytest.mark.parametrize("type_, payload, reason", MALFORMED)
def test_malformed_payloads_raise_protocol_error(type_, payload, reason):
    with pytest.raises(ProtocolError) as info:
        decode_frontend(Frame(type_, payload))
    err = info.value
    assert err.remote is True and err.sqlstate == "08P01"
    assert reason in err.message, err.message


@pytest.mark.parametrize("type_", [b"Z", b"T", b"\0", b"R", b"A"])
def test_unknown_frontend_types(type_):
    with pytest.raises(ProtocolError, match="invalid frontend message type"):
        decode_frontend(Frame(type_, b""))


def test_password_family_needs_its_own_decoders():
    with pytest.raises(ProtocolError, match="decode_password_message"):
        decode_frontend(Frame(b"p", b"secret\0"))


def test_password_message():
    wire = raw(b"p", b"md5" + b"0" * 32 + b"\0")
    d = MessageDecoder.for_frontend_messages()
    d.feed(wire)
    frame = d.next_frame()
    m = decode_password_message(frame.payload)
    assert m == PasswordMessage("md5" + "0" * 32)
    assert decode_password_message(frame) == m
    assert m.encode() == wire
    assert "0000" not in repr(m)


def test_sasl_initial_response():
    first = b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    wire = raw(b"p", b"SCRAM-SHA-256\0" + i(len(first)) + first)
    m = decode_sasl_initial_response(Frame(b"p", wire[5:]))
    assert m == SASLInitialResponse("SCRAM-SHA-256", first)
    assert m.encode() == wire
    assert "rOpr" not in repr(m)
    none = raw(b"p", b"SCRAM-SHA-256\0" + i(-1))
    m = decode_sasl_initial_response(none[5:])
    assert m == SASLInitialResponse("SCRAM-SHA-256", None)
    assert m.encode() == none
    assert decode_sasl_initial_response(b"X\0" + i(0)) == SASLInitialResponse("X", b"")


def test_sasl_response():
    final = b"c=biws,r=abc,p=xyz"
    assert decode_sasl_response(final) == SASLResponse(final)
    assert decode_sasl_response(Frame(b"p", b"")) == SASLResponse(b"")
    assert SASLResponse(final).encode() == raw(b"p", final)
    assert "xyz" not in repr(SASLResponse(final))


@pytest.mark.parametrize("decoder, payload, reason", [
    (decode_password_message, b"secret", "NUL"),
    (decode_password_message, b"secret\0x", "trailing"),
    (decode_password_message, b"", "NUL"),
    (decode_password_message, b"\xff\0", "UTF-8"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256", "NUL"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256\0", "truncated"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256\0" + i(5) + b"abc", "truncated"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256\0" + i(-2), "negative"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256\0" + i(1) + b"ab", "trailing"),
    (decode_sasl_initial_response, b"SCRAM-SHA-256\0" + i(-1) + b"a", "trailing"),
])
def test_malformed_password_family(decoder, payload, reason):
    with pytest.raises(ProtocolError) as info:
        decoder(payload)
    assert info.value.remote and reason in info.value.message


def test_password_decoders_check_the_frame_type():
    for decoder in (decode_password_message, decode_sasl_initial_response, decode_sasl_response):
        with pytest.raises(ProtocolError, match="password message"):
            decoder(Frame(b"Q", b"x\0"))


@pytest.mark.parametrize("message, reason", [
    (Query("a\0b"), "NUL"),
    (Query("\udcff"), "UTF-8"),
    (Query(b"SELECT 1"), "str"),
    (Parse("", "x", (-1,)), "outside"),
    (Parse("", "x", (2**32,)), "outside"),
    (Parse("", "x", tuple(range(65536))), "65535"),
    (Bind("", "", (0, 0), (b"x",)), "format codes"),
    (Bind("", "", (70000,), ()), "outside"),
    (Bind("", "", (), ("text",)), "bytes"),
    (Describe("X", ""), "kind"),
    (Close("", ""), "kind"),
    (Execute("", 2**31), "outside"),
    (CopyData("text"), "bytes"),
    (FunctionCall(1, (0, 1), (None,)), "format codes"),
    (FunctionCall(1, (), (), True), "int"),
    (SASLInitialResponse("SCRAM-SHA-256", "str"), "bytes"),
])
def test_encoders_refuse_unencodable_values_as_local_errors(message, reason):
    with pytest.raises(ProtocolError) as info:
        message.encode()
    assert info.value.remote is False
    assert reason in info.value.message, info.value.message
