"""proxy.pgwire startup phase: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, bounds.

Expected bytes are built by hand with struct, never with the code under test.
"""

from __future__ import annotations

import struct

import pytest

from proxy.pgwire import (
    CancelRequest,
    GSSENCRequest,
    ProtocolError,
    SSLRequest,
    StartupDecoder,
    StartupMessage,
    decode_ssl_response,
    gssenc_response,
    ssl_response,
)

SSL = struct.pack("!ii", 8, 80877103)
GSS = struct.pack("!ii", 8, 80877104)


def startup_bytes(version: int, *pairs: bytes, terminator: bytes = b"\0") -> bytes:
    body = struct.pack("!i", version) + b"".join(pairs) + terminator
    return struct.pack("!i", len(body) + 4) + body


STARTUP = startup_bytes(196608, b"user\0alice\0", b"database\0orders\0", b"application_name\0psql\0")


def decode_all(data: bytes, split: bool = False) -> list:
    d = StartupDecoder()
    out = []
    chunks = [data[i:i + 1] for i in range(len(data))] if split else [data]
    for chunk in chunks:
        d.feed(chunk)
        while (m := d.next_message()) is not None:
            out.append(m)
    return out


def error_of(data: bytes) -> ProtocolError:
    d = StartupDecoder()
    d.feed(data)
    with pytest.raises(ProtocolError) as info:
        while d.next_message() is not None:
            pass
    assert info.value.remote is True
    return info.value


def test_ssl_request():
    assert decode_all(SSL) == [SSLRequest()]
    assert SSLRequest().encode() == SSL


def test_gssenc_request():
    assert decode_all(GSS) == [GSSENCRequest()]
    assert GSSENCRequest().encode() == GSS


def test_cancel_request():
    raw = struct.pack("!iiii", 16, 80877102, 4242, -559038737)
    assert decode_all(raw) == [CancelRequest(4242, -559038737)]
    assert CancelRequest(4242, -559038737).encode() == raw
    assert "559038737" not in repr(CancelRequest(4242, -559038737))  # the secret stays out of logs


def test_startup_message():
    (m,) = decode_all(STARTUP)
    assert m == StartupMessage(196608, {"user": "alice", "database": "orders", "application_name": "psql"})
    assert list(m.parameters) == ["user", "database", "application_name"]
    assert (m.major, m.minor, m.user, m.database) == (3, 0, "alice", "orders")
    assert m.encode() == STARTUP


def test_startup_database_defaults_to_user():
    (m,) = decode_all(startup_bytes(196608, b"user\0bob\0"))
    assert m.database == "bob"


def test_startup_empty_value_and_utf8():
    (m,) = decode_all(startup_bytes(196608, b"user\0j\xc3\xb6rg\0", b"options\0\0"))
    assert m.parameters == {"user": "jörg", "options": ""}


def test_protocol_3_1_is_accepted_with_its_minor():
    (m,) = decode_all(startup_bytes((3 << 16) | 1, b"user\0a\0", b"_pq_.x\0y\0"))
    assert (m.major, m.minor) == (3, 1)
    assert m.parameters["_pq_.x"] == "y"


@pytest.mark.parametrize("version", [2 << 16, 1 << 16, 4 << 16, 0, (1234 << 16) | 5681, -1])
def test_other_protocol_versions_are_feature_not_supported(version):
    err = error_of(startup_bytes(version, b"user\0a\0"))
    assert err.sqlstate == "0A000"
    assert "unsupported frontend protocol" in err.message


@pytest.mark.parametrize("pairs", [(), (b"database\0x\0",), (b"user\0\0",)])
def test_user_is_required(pairs):
    err = error_of(startup_bytes(196608, *pairs))
    assert err.sqlstate == "28000"
    assert "user name" in err.message


@pytest.mark.parametrize("raw, reason", [
    (startup_bytes(196608, terminator=b""), "terminator"),                    # nothing after version
    (startup_bytes(196608, b"user\0a\0", terminator=b""), "terminator"),       # no final NUL
    (startup_bytes(196608, b"user\0a", terminator=b""), "NUL"),                # value not terminated
    (startup_bytes(196608, b"user\0", terminator=b""), "missing value"),       # name without value
    (startup_bytes(196608, b"user\0a\0", terminator=b"\0x"), "trailing"),      # bytes after terminator
    (startup_bytes(196608, b"user\0a\0", terminator=b"\0\0"), "trailing"),
    (startup_bytes(196608, b"us\xffer\0a\0"), "UTF-8"),                        # invalid UTF-8 name
    (startup_bytes(196608, b"user\0\xc3\x28\0"), "UTF-8"),                     # invalid UTF-8 value
    (startup_bytes(196608, b"user\0a\0", b"user\0b\0"), "twice"),              # duplicate name
])
def test_malformed_startup_parameters(raw, reason):
    err = error_of(raw)
    assert err.sqlstate == "08P01"
    assert reason in err.message


@pytest.mark.parametrize("length", [0, 1, 4, 7, -1, -2**31, 10001, 2**30, 2**31 - 1])
def test_bad_lengths_fail_from_the_length_field_alone(length):
    d = StartupDecoder()
    d.feed(struct.pack("!i", length)[:3])
    assert d.next_message() is None
    d.feed(struct.pack("!i", length)[3:])  # 4 bytes: enough to refuse, nothing else buffered
    with pytest.raises(ProtocolError) as info:
        d.next_message()
    assert info.value.sqlstate == "08P01" and "invalid length of startup packet" in info.value.message


def test_largest_startup_packet_is_accepted():
    filler = b"x" * (10000 - 8 - len(b"user\0a\0") - len(b"options\0\0") - 1)
    raw = startup_bytes(196608, b"user\0a\0", b"options\0" + filler + b"\0")
    assert len(raw) == 10000
    (m,) = decode_all(raw)
    assert len(m.parameters["options"]) == len(filler)


def test_smaller_configured_bound():
    d = StartupDecoder(max_length=64)
    d.feed(struct.pack("!i", 65))
    with pytest.raises(ProtocolError):
        d.next_message()
    with pytest.raises(ValueError):
        StartupDecoder(max_length=20000)


@pytest.mark.parametrize("raw, name", [
    (struct.pack("!iii", 12, 80877103, 0), "SSLRequest"),
    (struct.pack("!iii", 12, 80877104, 0), "GSSENCRequest"),
    (struct.pack("!iii", 12, 80877102, 1), "CancelRequest"),
    (struct.pack("!iiiii", 20, 80877102, 1, 2, 3), "CancelRequest"),
])
def test_special_requests_have_fixed_lengths(raw, name):
    err = error_of(raw)
    assert name in err.message and err.sqlstate == "08P01"


def test_same_decoder_after_ssl_and_gss_requests():
    d = StartupDecoder()
    for packet, expected in [(GSS, GSSENCRequest()), (SSL, SSLRequest())]:
        d.feed(packet)
        assert d.next_message() == expected
        assert not d.done
    d.feed(STARTUP + b"Q\0\0\0\x05x")
    assert isinstance(d.next_message(), StartupMessage)
    assert d.done and d.next_message() is None
    assert d.take_remaining() == b"Q\0\0\0\x05x"
    assert d.buffered == 0


def test_unencrypted_bytes_after_ssl_request_are_refused():
    err = error_of(SSL + STARTUP)
    assert "unencrypted data after SSLRequest" in err.message
    err = error_of(GSS + b"x")
    assert "unencrypted data after GSSENCRequest" in err.message


@pytest.mark.parametrize("first", [SSL, GSS])
def test_second_request_of_the_same_kind_is_refused(first):
    d = StartupDecoder()
    d.feed(first)
    assert d.next_message() is not None
    d.feed(first)
    with pytest.raises(ProtocolError, match="duplicate"):
        d.next_message()


def test_cancel_request_ends_the_phase():
    d = StartupDecoder()
    d.feed(struct.pack("!iiii", 16, 80877102, 1, 2) + b"junk")
    assert d.next_message() == CancelRequest(1, 2)
    assert d.done and d.next_message() is None
    assert d.take_remaining() == b"junk"


def test_take_remaining_before_the_end_is_a_local_error():
    d = StartupDecoder()
    with pytest.raises(ProtocolError) as info:
        d.take_remaining()
    assert info.value.remote is False


def test_errors_are_sticky():
    d = StartupDecoder()
    d.feed(struct.pack("!i", 3))
    with pytest.raises(ProtocolError) as first:
        d.next_message()
    d.feed(STARTUP)
    with pytest.raises(ProtocolError) as second:
        d.next_message()
    assert second.value is first.value


@pytest.mark.parametrize("stream", [
    STARTUP,
    struct.pack("!iiii", 16, 80877102, 7, 8),
])
def test_byte_by_byte_equals_whole(stream):
    assert decode_all(stream, split=True) == decode_all(stream)


def test_byte_by_byte_ssl_then_startup():
    assert decode_all(SSL + STARTUP, split=True) == [SSLRequest(), decode_all(STARTUP)[0]]


def test_incomplete_packet_returns_none():
    d = StartupDecoder()
    d.feed(STARTUP[:-1])
    assert d.next_message() is None
    assert d.buffered == len(STARTUP) - 1


@pytest.mark.parametrize("message, reason", [
    (StartupMessage(196608, {"user": "a\0b"}), "NUL"),
    (StartupMessage(196608, {"user": "a", "": "x"}), "empty parameter name"),
    (StartupMessage(196608, {"database": "x"}), "user"),
    (StartupMessage(196608, {"user": ""}), "user"),
    (StartupMessage(2 << 16, {"user": "a"}), "3.x"),
    (StartupMessage(196608, {"user": "a", "options": "x" * 10000}), "10000"),
    (StartupMessage(196608, {"user": "\ud800"}), "UTF-8"),
])
def test_startup_encode_refuses_what_decoding_refuses(message, reason):
    with pytest.raises(ProtocolError, match=reason) as info:
        message.encode()
    assert info.value.remote is False


def test_cancel_encode_range():
    with pytest.raises(ProtocolError) as info:
        CancelRequest(2**31, 0).encode()
    assert info.value.remote is False


def test_encryption_answers():
    assert ssl_response(True) == b"S" and ssl_response(False) == b"N"
    assert gssenc_response(True) == b"G" and gssenc_response(False) == b"N"
    assert decode_ssl_response(b"S") is True
    assert decode_ssl_response(b"N") is False
    for bad in (b"E", b"", b"SS", b"x"):
        with pytest.raises(ProtocolError):
            decode_ssl_response(bad)
