"""Bounds-checked reading and range-checked writing of the protocol's data types (internal).

What it is for: the PostgreSQL docs' "Message Data Types" (Int8/Int16/Int32, String = UTF-8 text
ended by one NUL, Byte1, Byten), shared by every decoder and encoder of ``proxy.pgwire``. A ``Reader``
turns every short read, missing terminator and invalid UTF-8 into ``ProtocolError`` (remote=True);
the ``put_*`` helpers turn every out-of-range or unencodable value into ``ProtocolError``
(remote=False), so that nothing else (``struct.error``, ``IndexError``, ``UnicodeError``) escapes.

What it must not do: any I/O, or allocate from a count found in the input (every count is checked
against the bytes actually present, item by item).
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
UINT16_MAX = (1 << 16) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
UINT32_MAX = (1 << 32) - 1


def as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as immutable ``bytes`` (no copy when it already is)."""
    return data if type(data) is bytes else bytes(data)


def tuple_fields(obj: object, *names: str) -> None:
    """Store list arguments of a frozen dataclass as tuples, so equality and hashing work."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, list):
            object.__setattr__(obj, name, tuple(value))


class Reader:
    """A cursor over one message payload; every read checks the bytes that are left.

    ``what`` names the message in error texts (e.g. ``"Bind"``).
    """

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0):
        self.data = data
        self.pos = pos
        self.what = what

    def fail(self, reason: str) -> ProtocolError:
        return ProtocolError(f"invalid {self.what} message: {reason}")

    def _need(self, n: int) -> None:
        left = len(self.data) - self.pos
        if left < n:
            raise self.fail(f"truncated at offset {self.pos} (needed {n} bytes, {left} left)")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        self._need(1)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def uint32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def take(self, n: int) -> bytes:
        self._need(n)
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def value(self) -> bytes | None:
        """Int32 length (-1 = NULL) then that many bytes, as in Bind, DataRow, FunctionCall."""
        at = self.pos
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise self.fail(f"negative value length {n} at offset {at} (only -1, NULL, is allowed)")
        return self.take(n)

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.fail(f"string at offset {self.pos} is not NUL-terminated")
        raw = self.data[self.pos:end]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"string at offset {self.pos} is not valid UTF-8") from None
        self.pos = end + 1
        return text

    def rest(self) -> bytes:
        v = self.data[self.pos:]
        self.pos = len(self.data)
        return v

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unexpected trailing bytes at offset {self.pos}")


def _local(what: str, reason: str) -> ProtocolError:
    return ProtocolError(f"cannot encode {what}: {reason}", remote=False)


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _local(what, f"expected an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _local(what, f"{v} is outside [{lo}, {hi}]")
    return v


def put_int8(v: int, what: str) -> bytes:
    return bytes((_int(v, -128, 127, what) & 0xFF,))


def put_int16(v: int, what: str) -> bytes:
    return _I16.pack(_int(v, INT16_MIN, INT16_MAX, what))


def put_uint16(v: int, what: str) -> bytes:
    return _U16.pack(_int(v, 0, UINT16_MAX, what))


def put_int32(v: int, what: str) -> bytes:
    return _I32.pack(_int(v, INT32_MIN, INT32_MAX, what))


def put_uint32(v: int, what: str) -> bytes:
    return _U32.pack(_int(v, 0, UINT32_MAX, what))


def put_bytes(v: object, what: str) -> bytes:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise _local(what, f"expected bytes, got {type(v).__name__}")
    return bytes(v)


def put_cstring(v: object, what: str) -> bytes:
    if not isinstance(v, str):
        raise _local(what, f"expected a str, got {type(v).__name__}")
    try:
        raw = v.encode("utf-8")
    except UnicodeEncodeError:
        raise _local(what, "text is not encodable as UTF-8 (lone surrogate)") from None
    if b"\0" in raw:
        raise _local(what, "text contains a NUL character")
    return raw + b"\0"


def put_value(v: object, what: str) -> bytes:
    """Int32 length then bytes; ``None`` is encoded as length -1 (NULL)."""
    if v is None:
        return _I32.pack(-1)
    raw = put_bytes(v, what)
    if len(raw) > INT32_MAX:
        raise _local(what, "value longer than 2**31-1 bytes")
    return _I32.pack(len(raw)) + raw


def put_count(items: object, what: str) -> int:
    """The length of a sequence as an unsigned Int16 count (PostgreSQL reads counts unsigned)."""
    if isinstance(items, (str, bytes, bytearray)):
        raise _local(what, f"expected a sequence of items, got {type(items).__name__}")
    try:
        n = len(items)  # type: ignore[arg-type]
    except TypeError:
        raise _local(what, f"expected a sequence of items, got {type(items).__name__}") from None
    if n > UINT16_MAX:
        raise _local(what, f"{n} items, more than {UINT16_MAX}")
    return n


def frame(type_: bytes, payload: bytes) -> bytes:
    """Byte1 type, Int32 length including itself, payload (no checks on ``type_``)."""
    if len(payload) > INT32_MAX - 4:
        raise _local("message", f"payload of {len(payload)} bytes does not fit the Int32 length")
    return _HEADER.pack(type_, len(payload) + 4) + payload
