"""BatchedWrites (proxy/ssh/bridge.py): the writes of one event-loop iteration leave as one, in
order; close sends what is pending; abort drops it. Against a real socket pair on a real loop."""

from __future__ import annotations

import asyncio
import socket

from proxy.ssh.bridge import BatchedWrites


class Counting(asyncio.Protocol):
    def __init__(self):
        self.received = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        self.received += data

    def connection_lost(self, exc):
        self.closed.set_result(None)


async def pair():
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    writer, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    _, reader = await loop.connect_accepted_socket(Counting, b)
    calls = []
    original = writer.write

    def counted(data):
        calls.append(len(data))
        original(data)
    writer.write = counted
    return BatchedWrites(writer, loop), reader, calls


def test_one_iteration_one_write_in_order_and_close_flushes():
    async def run():
        batched, reader, calls = await pair()
        for i in range(5):
            batched.write(bytes([i]) * 3)
        assert batched.get_write_buffer_size() == 15 and calls == []
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert calls == [15]
        batched.write(b"tail")
        batched.close()  # pending bytes go out before the close
        await asyncio.wait_for(reader.closed, 5)
        return bytes(reader.received)
    assert asyncio.run(run()) == b"".join(bytes([i]) * 3 for i in range(5)) + b"tail"


def test_abort_drops_what_is_pending():
    async def run():
        batched, reader, calls = await pair()
        batched.write(b"never")
        batched.abort()
        await asyncio.wait_for(reader.closed, 5)
        await asyncio.sleep(0)
        return bytes(reader.received), calls
    assert asyncio.run(run()) == (b"", [])
