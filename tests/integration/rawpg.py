"""A raw PostgreSQL v3 client for tests that must send exact message sequences through the proxy
(pipelined batches, COPY with Syncs) that libpq and asyncpg never send: TLS, SCRAM-SHA-256 with a
one-time secret, then whatever bytes the test writes, and the server's replies one by one."""

from __future__ import annotations

import asyncio
import ssl
import struct

import scramp

from proxy.pgwire.frontend import SASLInitialResponse, SASLResponse
from proxy.pgwire.startup import StartupMessage


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.buffer = reader, writer, b""

    @classmethod
    async def connect(cls, port: int, user: str, password: str, database: str,
                      cafile: str) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!ii", 8, 80877103))  # SSLRequest
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(ssl.create_default_context(cafile=cafile),
                               server_hostname="127.0.0.1")
        writer.write(StartupMessage(196608, {"user": user, "database": database}).encode())
        client = cls(reader, writer)
        scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        while True:
            kind, body = await client.frame()
            if kind == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 10:
                    writer.write(SASLInitialResponse(
                        "SCRAM-SHA-256", scram.get_client_first().encode()).encode())
                elif code == 11:
                    scram.set_server_first(body[4:].decode())
                    writer.write(SASLResponse(scram.get_client_final().encode()).encode())
            elif kind == b"E":
                raise ConnectionError(body.decode(errors="replace"))
            elif kind == b"Z":
                return client

    def send(self, *messages) -> None:
        self.writer.write(b"".join(m.encode() for m in messages))

    async def frame(self, timeout: float = 10) -> tuple[bytes, bytes]:
        while True:
            if len(self.buffer) >= 5:
                (length,) = struct.unpack("!i", self.buffer[1:5])
                if len(self.buffer) >= 1 + length:
                    kind, body = self.buffer[:1], self.buffer[5:1 + length]
                    self.buffer = self.buffer[1 + length:]
                    return kind, body
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            self.buffer += data

    async def until(self, kind: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
        """The replies up to and including the ``count``-th of type ``kind``."""
        seen = []
        while count:
            frame = await self.frame()
            seen.append(frame)
            count -= frame[0] == kind
        return seen

    def close(self) -> None:
        self.writer.close()
