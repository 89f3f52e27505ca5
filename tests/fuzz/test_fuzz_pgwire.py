"""proxy.pgwire under hypothesis: hostile bytes give messages or ProtocolError, nothing else.

Arbitrary bytes and mutations of valid encodings go, whole and byte by byte, through
StartupDecoder and MessageDecoder + decode_frontend / decode_backend / the password decoders; the
split run must agree with the whole run. Whatever is accepted is canonical: re-encoding a decoded
message gives back exactly the bytes it came from (so lax parsing, e.g. of negative lengths or
trailing bytes, is caught too). Generated messages round-trip: decode(encode(m)) == m.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import pgwire as pg

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies for valid messages ---

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=12)
NAME = TEXT.filter(bool)
BLOB = st.binary(max_size=24)
INT16 = st.integers(-2**15, 2**15 - 1)
INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
VALUE = st.none() | BLOB
KIND = st.sampled_from(["S", "P"])


@st.composite
def formats_and_values(draw):
    values = tuple(draw(st.lists(VALUE, max_size=4)))
    n = draw(st.sampled_from(sorted({0, 1, len(values)})))
    return tuple(draw(st.lists(INT16, min_size=n, max_size=n))), values


@st.composite
def binds(draw):
    formats, values = draw(formats_and_values())
    return pg.Bind(draw(TEXT), draw(TEXT), formats, values, tuple(draw(st.lists(INT16, max_size=3))))


@st.composite
def function_calls(draw):
    formats, values = draw(formats_and_values())
    return pg.FunctionCall(draw(UINT32), formats, values, draw(INT16))


FRONTEND = st.one_of(
    st.builds(pg.Query, TEXT),
    st.builds(pg.Parse, TEXT, TEXT, st.lists(UINT32, max_size=4).map(tuple)),
    binds(),
    st.builds(pg.Describe, KIND, TEXT),
    st.builds(pg.Execute, TEXT, INT32),
    st.just(pg.Sync()), st.just(pg.Flush()), st.just(pg.CopyDone()), st.just(pg.Terminate()),
    st.builds(pg.Close, KIND, TEXT),
    st.builds(pg.CopyData, BLOB),
    st.builds(pg.CopyFail, TEXT),
    function_calls(),
)

PASSWORD_FAMILY = st.one_of(
    st.builds(pg.PasswordMessage, TEXT),
    st.builds(pg.SASLInitialResponse, TEXT, VALUE),
    st.builds(pg.SASLResponse, BLOB),
)

FIELDS = st.dictionaries(st.characters(min_codepoint=1, max_codepoint=255), TEXT, max_size=5)
FIELD_DESCRIPTIONS = st.builds(pg.FieldDescription, TEXT, UINT32, INT16, UINT32, INT16, INT32, INT16)
INT8 = st.integers(-128, 127)

BACKEND = st.one_of(
    st.sampled_from([pg.AuthenticationOk(), pg.AuthenticationKerberosV5(),
                     pg.AuthenticationCleartextPassword(), pg.AuthenticationGSS(),
                     pg.AuthenticationSSPI(), pg.EmptyQueryResponse(), pg.ParseComplete(),
                     pg.BindComplete(), pg.CloseComplete(), pg.NoData(), pg.PortalSuspended(),
                     pg.CopyDone()]),
    st.builds(pg.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(pg.AuthenticationGSSContinue, BLOB),
    st.builds(pg.AuthenticationSASL, st.lists(NAME, max_size=3).map(tuple)),
    st.builds(pg.AuthenticationSASLContinue, BLOB),
    st.builds(pg.AuthenticationSASLFinal, BLOB),
    st.builds(pg.ParameterStatus, TEXT, TEXT),
    st.builds(pg.BackendKeyData, INT32, INT32),
    st.builds(pg.ReadyForQuery, st.sampled_from("ITE")),
    st.builds(pg.NegotiateProtocolVersion, INT32, st.lists(TEXT, max_size=3).map(tuple)),
    st.builds(pg.ErrorResponse, FIELDS),
    st.builds(pg.NoticeResponse, FIELDS),
    st.builds(pg.CommandComplete, TEXT),
    st.builds(pg.CopyInResponse, INT8, st.lists(INT16, max_size=4).map(tuple)),
    st.builds(pg.CopyOutResponse, INT8, st.lists(INT16, max_size=4).map(tuple)),
    st.builds(pg.CopyBothResponse, INT8, st.lists(INT16, max_size=4).map(tuple)),
    st.builds(pg.RowDescription, st.lists(FIELD_DESCRIPTIONS, max_size=3).map(tuple)),
    st.builds(pg.DataRow, st.lists(VALUE, max_size=5).map(tuple)),
    st.builds(pg.ParameterDescription, st.lists(UINT32, max_size=4).map(tuple)),
    st.builds(pg.NotificationResponse, INT32, TEXT, TEXT),
    st.builds(pg.FunctionCallResponse, VALUE),
    st.builds(pg.CopyData, BLOB),
)


@st.composite
def startup_messages(draw):
    params = draw(st.dictionaries(NAME, TEXT, max_size=4))
    params["user"] = draw(NAME)
    return pg.StartupMessage((3 << 16) | draw(st.integers(0, 0xFFFF)), params)


STARTUP = st.one_of(startup_messages(), st.builds(pg.CancelRequest, INT32, INT32))

# --- drivers: run a stream whole or split, collect messages and the first error ---


def _decode_password_family(frame: pg.Frame) -> list:
    out = []
    for decoder in (pg.decode_password_message, pg.decode_sasl_initial_response, pg.decode_sasl_response):
        try:
            message = decoder(frame)
            assert message.to_frame() == frame  # canonical
            out.append(message)
        except pg.ProtocolError as exc:
            assert exc.remote is True
            out.append(("error", exc.sqlstate, exc.message))
    return out


def run_messages(direction: str, data: bytes, step: int | None) -> tuple[list, tuple | None]:
    if direction == "frontend":
        decoder = pg.MessageDecoder.for_frontend_messages()
    elif direction == "backend":
        decoder = pg.MessageDecoder.for_backend_messages()
    else:
        decoder = pg.MessageDecoder(max_length=4096)
    decode = pg.decode_backend if direction == "backend" else pg.decode_frontend
    out: list = []
    step = step or max(1, len(data))
    try:
        for start in range(0, max(1, len(data)), step):
            decoder.feed(data[start:start + step])
            while (frame := decoder.next_frame()) is not None:
                assert type(frame.payload) is bytes and len(frame.type) == 1
                if frame.type == b"p" and direction != "backend":
                    out.append(_decode_password_family(frame))
                    continue
                try:
                    message = decode(frame)
                except pg.ProtocolError as exc:
                    assert exc.remote is True
                    out.append(("error", exc.sqlstate, exc.message))
                else:
                    assert message.to_frame() == frame  # canonical
                    out.append(message)
    except pg.ProtocolError as exc:  # framing errors end the stream
        assert exc.remote is True and exc.sqlstate == "08P01"
        return out, (exc.sqlstate, exc.message)
    return out, None


def check_messages(direction: str, data: bytes) -> None:
    whole = run_messages(direction, data, None)
    assert run_messages(direction, data, 1) == whole


def run_startup(data: bytes, step: int | None) -> tuple[list, tuple | None]:
    decoder = pg.StartupDecoder()
    out: list = []
    step = step or max(1, len(data))
    try:
        for start in range(0, max(1, len(data)), step):
            decoder.feed(data[start:start + step])
            while (m := decoder.next_message()) is not None:
                out.append(m)
    except pg.ProtocolError as exc:
        assert exc.remote is True and exc.sqlstate in ("08P01", "0A000", "28000")
        return out, (exc.sqlstate, exc.message)
    if decoder.done:
        out.append(("rest", decoder.take_remaining()))
    return out, None


def check_startup(data: bytes) -> None:
    whole = run_startup(data, None)
    messages = [m for m in whole[0] if not isinstance(m, tuple)]
    assert data.startswith(b"".join(m.encode() for m in messages))  # canonical
    split = run_startup(data, 1)
    if whole[1] is not None and "unencrypted data after" in whole[1][1]:
        # fed whole, clear-text bytes were already there when the SSL/GSSENC request was decoded;
        # fed byte by byte they were not, so the split run may go further.
        assert split[0][:len(whole[0])] == whole[0]
        return
    assert split == whole


def mutate(data: bytes, draw) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "length"]))
        if op == "insert" or not b:
            at = draw(st.integers(0, len(b)))
            b[at:at] = draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
        elif op == "delete":
            del b[at:at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del b[at:]
        else:  # overwrite 4 bytes with an interesting Int32 (lengths, counts)
            word = struct.pack("!i", draw(st.sampled_from([-1, -2, 0, 3, 4, 5, 65535, 2**30, 2**31 - 1])))
            b[at:at + 4] = word
    return bytes(b)


# --- arbitrary bytes ---

@FAST
@given(st.binary(max_size=300))
def test_startup_arbitrary_bytes(data):
    check_startup(data)


@FAST
@given(st.binary(max_size=300))
def test_startup_arbitrary_bytes_after_a_plausible_length(data):
    check_startup(struct.pack("!i", len(data) + 8) + struct.pack("!i", 196608) + data)


@FAST
@given(st.sampled_from(["frontend", "backend", "any"]), st.binary(max_size=300))
def test_messages_arbitrary_bytes(direction, data):
    check_messages(direction, data)


@FAST
@given(st.sampled_from(["frontend", "backend", "any"]),
       st.lists(st.tuples(st.sampled_from(sorted(set(b"QPBDESHCdcfXFpRKZNGWTI123ntsAvV"))),
                          st.binary(max_size=40)), max_size=6))
def test_messages_well_framed_random_payloads(direction, frames):
    data = b"".join(bytes((t,)) + struct.pack("!i", len(p) + 4) + p for t, p in frames)
    check_messages(direction, data)


# Payloads assembled from protocol-shaped tokens (interesting Int16/Int32 counts and lengths, short
# NUL-terminated strings, raw bytes) reach deep into the decoders far more often than raw bytes.
TOKEN = st.one_of(
    st.sampled_from([-2**15, -2, -1, 0, 1, 2, 3, 2**15 - 1]).map(lambda v: struct.pack("!h", v)),
    st.sampled_from([-2**31, -2, -1, 0, 1, 2, 3, 4, 5, 8, 10, 11, 12, 2**31 - 1]).map(
        lambda v: struct.pack("!i", v)),
    st.binary(max_size=6).map(lambda b: b.replace(b"\0", b"") + b"\0"),
    st.sampled_from([b"S", b"P", b"I", b"T", b"E", b"\xff", b"\xc3", b"\0"]),
    st.binary(max_size=6),
)


@FAST
@given(st.sampled_from(["frontend", "backend"]),
       st.lists(st.tuples(st.sampled_from(sorted(set(b"QPBDESHCdcfXFpRKZNGWTI123ntsAvV"))),
                          st.lists(TOKEN, max_size=8).map(b"".join)), min_size=1, max_size=4))
def test_messages_token_payloads(direction, frames):
    data = b"".join(bytes((t,)) + struct.pack("!i", len(p) + 4) + p for t, p in frames)
    check_messages(direction, data)


@FAST
@given(st.lists(TOKEN, max_size=10).map(b"".join))
def test_startup_token_payloads(body):
    for version in (196608, 80877102, 80877103):
        check_startup(struct.pack("!ii", len(body) + 8, version) + body)


@FAST
@given(st.binary(max_size=200))
def test_password_decoders_arbitrary_payloads(payload):
    _decode_password_family(pg.Frame(b"p", payload))


# --- mutations of valid encodings ---

@SLOW
@given(st.lists(FRONTEND | PASSWORD_FAMILY, min_size=1, max_size=4), st.data())
def test_frontend_mutations(messages, data):
    check_messages("frontend", mutate(b"".join(m.encode() for m in messages), data.draw))


@SLOW
@given(st.lists(BACKEND, min_size=1, max_size=4), st.data())
def test_backend_mutations(messages, data):
    check_messages("backend", mutate(b"".join(m.encode() for m in messages), data.draw))


@SLOW
@given(st.lists(st.sampled_from([pg.SSLRequest(), pg.GSSENCRequest()]), max_size=2), STARTUP, st.data())
def test_startup_mutations(requests, final, data):
    check_startup(mutate(b"".join(r.encode() for r in requests) + final.encode(), data.draw))


# --- round trips ---

@FAST
@given(FRONTEND)
def test_frontend_round_trip(message):
    assert pg.decode_frontend(message.to_frame()) == message
    assert message.to_frame().encode() == message.encode()


@FAST
@given(BACKEND)
def test_backend_round_trip(message):
    assert pg.decode_backend(message.to_frame()) == message


@FAST
@given(PASSWORD_FAMILY)
def test_password_family_round_trip(message):
    decoder = {pg.PasswordMessage: pg.decode_password_message,
               pg.SASLInitialResponse: pg.decode_sasl_initial_response,
               pg.SASLResponse: pg.decode_sasl_response}[type(message)]
    assert decoder(message.to_frame()) == message


@SLOW
@given(st.lists(FRONTEND, max_size=5), st.integers(1, 17))
def test_frontend_stream_round_trip_in_chunks(messages, step):
    data = b"".join(m.encode() for m in messages)
    got, error = run_messages("frontend", data, step)
    assert error is None and got == messages


@SLOW
@given(st.lists(BACKEND, max_size=5), st.integers(1, 17))
def test_backend_stream_round_trip_in_chunks(messages, step):
    data = b"".join(m.encode() for m in messages)
    got, error = run_messages("backend", data, step)
    assert error is None and got == messages


@FAST
@given(STARTUP, st.binary(max_size=10))
def test_startup_round_trip(message, rest):
    for step in (None, 1):
        got, error = run_startup(message.encode() + rest, step)
        assert error is None and got == [message, ("rest", rest)]


# --- FrameBoundaries: where backend messages end, however the stream is split ---

BACKEND_MESSAGE = st.tuples(st.sampled_from(sorted(pg.BACKEND_TYPES)), st.binary(max_size=40))


@st.composite
def split_stream(draw, messages):
    stream = b"".join(bytes((t,)) + struct.pack("!i", len(body) + 4) + body
                      for t, body in messages)
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=8)) | {0, len(stream)})
    return stream, [stream[a:b] for a, b in zip(cuts, cuts[1:])]


@FAST
@given(st.data(), st.lists(BACKEND_MESSAGE, max_size=12))
def test_frame_boundaries_are_the_message_ends_however_the_stream_is_split(data, messages):
    stream, chunks = data.draw(split_stream(messages))
    ends, offset = set(), 0
    for _, body in messages:
        offset += 5 + len(body)
        ends.add(offset)
    fb = pg.FrameBoundaries(watch=b"SZ", mark=b"1E")
    start = 0
    for chunk in chunks:
        last = fb.feed(chunk)
        inside = [e - start for e in ends if start < e <= start + len(chunk)]
        assert last == (max(inside) if inside else None)
        start += len(chunk)
        assert fb.at_boundary == (start in ends or start == 0)
    assert fb.watched == [pg.Frame(bytes((t,)), body if t in b"SZ" else b"")
                          for t, body in messages if t in b"SZ1E"]


@FAST
@given(st.data(), st.lists(BACKEND_MESSAGE, max_size=4), st.integers(-2**31, 3))
def test_frame_boundaries_refuse_a_length_below_4_wherever_it_is_cut(data, before, length):
    good, _ = data.draw(split_stream(before))
    stream = good + b"D" + struct.pack("!i", length) + b"rest"
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=6)) | {0, len(stream)})
    fb = pg.FrameBoundaries()
    with pytest.raises(pg.ProtocolError, match=f"length {length} is below 4"):
        for a, b in zip(cuts, cuts[1:]):
            fb.feed(stream[a:b])
    assert not fb.at_boundary  # broken for good: nothing may be injected, nothing parsed on
    with pytest.raises(pg.ProtocolError, match=f"length {length} is below 4"):
        fb.feed(b"Z\0\0\0\x05I")


def test_frame_boundaries_refuse_a_watched_message_over_the_limit_from_its_header():
    fb = pg.FrameBoundaries(watch=b"S")
    assert fb.feed(b"S" + struct.pack("!i", 4 + 10000) + b"x" * 10) is None  # at the limit: fine
    fb = pg.FrameBoundaries(watch=b"S")
    with pytest.raises(pg.ProtocolError, match="too long"):
        fb.feed(b"S" + struct.pack("!i", 4 + 10001))
    with pytest.raises(pg.ProtocolError, match="too long"):  # and stays broken
        fb.feed(b"Z\0\0\0\x05I")
    assert pg.FrameBoundaries(watch=b"S").feed(b"D" + struct.pack("!i", 4 + 10001)) is None
    marked = pg.FrameBoundaries(watch=b"S", mark=b"E")  # only counted: any length will do
    assert marked.feed(b"E" + struct.pack("!i", 4 + 20000) + b"x" * 20000) == 20005
    assert marked.watched == [pg.Frame(b"E", b"")]
