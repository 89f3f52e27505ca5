"""BatchedWrites (proxy/ssh/bridge.py): the writes of one event-loop iteration leave as one, in
order (one joined write for a channel, one writelines for a socket); close sends what is pending;
abort drops it. Against a real socket pair on a real loop."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.ssh.bridge import BatchedWrites


class Counting(asyncio.Protocol):
    def __init__(self):
        self.received = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        self.received += data

    def connection_lost(self, exc):
        self.closed.set_result(None)


async def pair(join: bool = True):
    """(BatchedWrites on a socket pair's writer, the reader, the writer's calls: ("write",
    length) or ("writelines", [lengths]))."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    writer, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    _, reader = await loop.connect_accepted_socket(Counting, b)
    calls = []
    write, writelines = writer.write, writer.writelines

    def counted(data):
        calls.append(("write", len(data)))
        write(data)

    def counted_lines(lines):
        calls.append(("writelines", [len(x) for x in lines]))
        writelines(lines)
    writer.write, writer.writelines = counted, counted_lines
    return BatchedWrites(writer, loop, join), reader, calls


@pytest.mark.parametrize("join", [True, False])
def test_one_iteration_one_write_in_order_and_close_flushes(join):
    async def run():
        batched, reader, calls = await pair(join)
        for i in range(5):
            batched.write(bytes([i]) * 3)
        assert batched.get_write_buffer_size() == 15 and calls == []
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if join:
            assert calls == [("write", 15)]
        else:  # (asyncio's own writelines may join and call write: then seen as a second call)
            assert calls[0] == ("writelines", [3] * 5) and calls[1:] in ([], [("write", 15)])
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
