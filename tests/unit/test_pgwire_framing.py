"""proxy.pgwire framing: Frame, encode_frame, MessageDecoder bounds, splits and linear streaming.

Expected bytes are built by hand with struct, never with the code under test.
"""

from __future__ import annotations

import struct

import pytest

from proxy.pgwire import (
    DEFAULT_MAX_MESSAGE_LENGTH,
    DataRow,
    Frame,
    MessageDecoder,
    ProtocolError,
    decode_backend,
    encode_frame,
)


def raw(type_: bytes, payload: bytes) -> bytes:
    return type_ + struct.pack("!i", len(payload) + 4) + payload


def frames_of(decoder: MessageDecoder, data: bytes, chunk: int | None = None) -> list[Frame]:
    out = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        decoder.feed(data[i:i + step])
        while (f := decoder.next_frame()) is not None:
            out.append(f)
    return out


def test_frame_encode():
    assert Frame(b"Q", b"select 1\0").encode() == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert encode_frame(b"S", b"") == b"S\x00\x00\x00\x04"
    assert encode_frame(b"d", memoryview(b"ab")) == raw(b"d", b"ab")


@pytest.mark.parametrize("bad", [b"", b"QQ", "Q", b"\0"])
def test_encode_frame_refuses_bad_types(bad):
    with pytest.raises(ProtocolError) as info:
        encode_frame(bad, b"")
    assert info.value.remote is False


def test_frame_repr_does_not_dump_payloads():
    assert "secret" not in repr(Frame(b"p", b"secret\0"))


def test_one_frame_and_empty_payload():
    d = MessageDecoder()
    assert frames_of(d, raw(b"Q", b"select 1\0") + raw(b"S", b"")) == [
        Frame(b"Q", b"select 1\0"), Frame(b"S", b"")]
    assert d.buffered == 0 and d.next_frame() is None


def test_payload_is_bytes_and_feeding_after_a_frame_is_safe():
    d = MessageDecoder()
    d.feed(raw(b"d", b"abc") + b"d")
    f = d.next_frame()
    assert type(f.payload) is bytes
    d.feed(b"\0\0\0\x05x")  # no BufferError from a lingering view of the buffer
    assert d.next_frame() == Frame(b"d", b"x")


@pytest.mark.parametrize("length", [0, 1, 3, -1, -2**31])
def test_length_below_four_is_refused(length):
    d = MessageDecoder()
    d.feed(b"Q" + struct.pack("!i", length))
    with pytest.raises(ProtocolError) as info:
        d.next_frame()
    assert info.value.sqlstate == "08P01" and info.value.remote
    assert "invalid message length" in info.value.message


def test_one_gigabyte_prefix_fails_from_the_header_alone():
    d = MessageDecoder.for_frontend_messages()
    header = b"Q" + struct.pack("!I", 1 << 30)
    d.feed(header[:4])
    assert d.next_frame() is None  # 4 bytes: not yet a header
    d.feed(header[4:])
    with pytest.raises(ProtocolError) as info:
        d.next_frame()
    assert info.value.sqlstate == "08P01"
    assert str(1 << 30) in info.value.message and str(DEFAULT_MAX_MESSAGE_LENGTH) in info.value.message
    assert d.buffered == 5  # nothing of the body was waited for or buffered


def test_one_gigabyte_prefix_in_the_backend_direction():
    d = MessageDecoder.for_backend_messages()
    d.feed(b"D" + struct.pack("!I", 1 << 30))
    with pytest.raises(ProtocolError, match="invalid message length"):
        d.next_frame()


def test_max_length_bound_is_inclusive_and_counts_the_length_field():
    d = MessageDecoder(max_length=100)
    frames_of(d, raw(b"d", b"x" * 96))  # length field = 100: accepted
    d.feed(raw(b"d", b"x" * 97))  # 101: refused
    with pytest.raises(ProtocolError):
        d.next_frame()


def test_frontend_small_types_follow_postgresql():
    for t in b"CDEHScfX":
        d = MessageDecoder.for_frontend_messages()
        d.feed(bytes((t,)) + struct.pack("!i", 10001))
        with pytest.raises(ProtocolError):
            d.next_frame()
    d = MessageDecoder.for_frontend_messages()
    d.feed(b"p" + struct.pack("!i", 65536))
    with pytest.raises(ProtocolError):
        d.next_frame()
    d = MessageDecoder.for_frontend_messages()
    d.feed(b"p" + struct.pack("!i", 65535))
    assert d.next_frame() is None  # allowed: waits for the body
    d = MessageDecoder.for_frontend_messages()
    d.feed(b"Q" + struct.pack("!i", 10001))
    assert d.next_frame() is None


def test_unknown_types_fail_from_the_first_byte():
    d = MessageDecoder.for_frontend_messages()
    d.feed(b"G")  # first byte of "GET / HTTP/1.1"
    with pytest.raises(ProtocolError, match="invalid message type"):
        d.next_frame()
    d = MessageDecoder.for_backend_messages()
    d.feed(b"Q")
    with pytest.raises(ProtocolError):
        d.next_frame()
    d = MessageDecoder()  # no type filter by default
    d.feed(raw(b"G", b""))
    assert d.next_frame() == Frame(b"G", b"")


def test_errors_are_sticky_and_feed_never_raises():
    d = MessageDecoder()
    d.feed(b"Q\0\0\0\0")
    with pytest.raises(ProtocolError) as first:
        d.next_frame()
    d.feed(raw(b"S", b""))
    with pytest.raises(ProtocolError) as second:
        d.next_frame()
    assert first.value is second.value


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        MessageDecoder(max_length=3)
    with pytest.raises(ValueError):
        MessageDecoder(max_length=2**31)
    with pytest.raises(ValueError):
        MessageDecoder(type_limits={b"SS": 5})


STREAM = b"".join([
    raw(b"T", struct.pack("!h", 1) + b"a\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)),
    raw(b"D", struct.pack("!hi", 1, 1) + b"1"),
    raw(b"D", struct.pack("!hi", 1, -1)),
    raw(b"C", b"SELECT 2\0"),
    raw(b"Z", b"I"),
    raw(b"1", b""),
    raw(b"d", b"x" * 300),
])


def test_many_frames_in_one_feed():
    got = frames_of(MessageDecoder.for_backend_messages(), STREAM)
    assert [f.type for f in got] == [b"T", b"D", b"D", b"C", b"Z", b"1", b"d"]
    assert b"".join(f.encode() for f in got) == STREAM


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_split_feeds_give_the_same_frames(chunk):
    whole = frames_of(MessageDecoder.for_backend_messages(), STREAM)
    assert frames_of(MessageDecoder.for_backend_messages(), STREAM, chunk=chunk) == whole


def test_large_stream_of_data_rows_in_64k_chunks():
    n = 100_000
    rows = b"".join(raw(b"D", struct.pack("!hi", 2, 6) + b"%06d" % i + struct.pack("!i", -1))
                    for i in range(n))
    d = MessageDecoder.for_backend_messages()
    count = 0
    for i in range(0, len(rows), 65536):
        d.feed(rows[i:i + 65536])
        while (f := d.next_frame()) is not None:
            if count % 9973 == 0:
                assert decode_backend(f) == DataRow((b"%06d" % count, None))
            else:
                assert f.type == b"D" and f.payload[6:12] == b"%06d" % count
            count += 1
    assert count == n and d.buffered == 0


def test_one_large_frame_in_64k_chunks():
    body = bytes(range(256)) * (8 * 4096)  # 8 MiB
    data = raw(b"d", body) + raw(b"c", b"")
    d = MessageDecoder.for_backend_messages()
    got = frames_of(d, data, chunk=65536)
    assert got == [Frame(b"d", body), Frame(b"c", b"")]
    assert d.buffered == 0
