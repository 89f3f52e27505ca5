"""The least CPU a Python relay doing jit-proxy's SSH data path needs per GiB, on this machine.

What it is for: ``python -m bench.floor`` puts a number on what the design costs before any of
asyncssh's or the proxy's own per-packet work. Every byte of ``ssh -J`` through jit-proxy is
opened twice (the client's outer connection, then the inner one the proxy terminates to record
and to log in with its own certificate) and sealed once (the connection to the target), and it
is read from one socket and written to another. Here one uvloop protocol does exactly that for
32 KiB payloads (aes128-gcm, what OpenSSH and the proxy's defaults agree on) between two local
sockets fed and drained by threads, and the event loop thread's CPU (user, system) per GiB is
printed. Compare it with ``relay CPU per GiB`` of ``python -m bench --only ssh``: the difference
is the per-packet Python work a leaner relay could save at most.

What it must not do: pass for a measurement of jit-proxy (it relays no SSH), or reach anything
but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAYLOAD = 32768  # bytes: OpenSSH's channel packets


def _packets(aead: AESGCM, nonce: bytes) -> tuple[bytes, bytes]:
    """(an outer packet carrying an inner one, the inner length header), as on the wire."""
    inner_plain = os.urandom(PAYLOAD + 32)  # payload, padding
    hdr = len(inner_plain).to_bytes(4, "big")
    inner = hdr + aead.encrypt(nonce, inner_plain, hdr)
    outer_hdr = len(inner).to_bytes(4, "big")
    return outer_hdr + aead.encrypt(nonce, inner, outer_hdr), hdr


class _Relay(asyncio.Protocol):
    """Open the outer and the inner layer of each packet, seal the payload, write it on."""

    def __init__(self, aead: AESGCM, nonce: bytes, size: int, hdr: bytes,
                 out: asyncio.Transport, done: asyncio.Future):
        self.aead, self.nonce, self.size, self.hdr = aead, nonce, size, hdr
        self.out, self.done, self.buf, self.count = out, done, b"", 0

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, view = 0, memoryview(buf)
        while len(buf) - pos >= self.size:
            inner = self.aead.decrypt(self.nonce, view[pos + 4:pos + self.size],
                                      view[pos:pos + 4])
            plain = self.aead.decrypt(self.nonce, memoryview(inner)[4:], memoryview(inner)[:4])
            self.out.write(self.hdr + self.aead.encrypt(self.nonce, plain, self.hdr))
            pos += self.size
            self.count += 1
        view.release()
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.close()
        self.done.set_result(self.count)


async def measure(mib: int) -> dict[str, float]:
    """Relay ``mib`` MiB; returns the loop thread's ``user`` and ``system`` CPU seconds per GiB
    and the ``wall`` seconds. Raises RuntimeError when not every packet came through whole."""
    aead, nonce = AESGCM(AESGCM.generate_key(128)), os.urandom(12)
    packet, hdr = _packets(aead, nonce)
    count = max(1, mib * (1 << 20) // PAYLOAD)
    loop = asyncio.get_running_loop()
    out_ready: asyncio.Future = loop.create_future()
    done: asyncio.Future = loop.create_future()
    sink = await asyncio.start_server(lambda r, w: out_ready.set_result(w.transport),
                                      "127.0.0.1", 0)

    received = [0]

    def drain() -> None:
        with socket.create_connection(sink.sockets[0].getsockname()) as s:
            while chunk := s.recv(1 << 20):
                received[0] += len(chunk)

    def feed(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _ in range(count):
                s.sendall(packet)

    threads = [threading.Thread(target=drain)]
    threads[0].start()
    out = await out_ready
    source = await loop.create_server(
        lambda: _Relay(aead, nonce, len(packet), hdr, out, done), "127.0.0.1", 0)
    before, start = resource.getrusage(resource.RUSAGE_THREAD), time.monotonic()
    threads.append(threading.Thread(target=feed, args=(source.sockets[0].getsockname()[1],)))
    threads[1].start()
    relayed = await done
    after, wall = resource.getrusage(resource.RUSAGE_THREAD), time.monotonic() - start
    for t in threads:
        await asyncio.to_thread(t.join)
    source.close()
    sink.close()
    if relayed != count or received[0] != count * (len(hdr) + PAYLOAD + 32 + 16):
        raise RuntimeError(f"relayed {relayed} of {count} packets, {received[0]} bytes out")
    gib = relayed * PAYLOAD / (1 << 30)
    return {"user": (after.ru_utime - before.ru_utime) / gib,
            "system": (after.ru_stime - before.ru_stime) / gib, "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="payload to relay (MiB)")
    args = p.parse_args()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:  # (asyncio's own loop: a higher floor)
        run = asyncio.run
    r = run(measure(args.mib))
    print(f"relay floor: {r['user'] + r['system']:.2f} s CPU per GiB (user {r['user']:.2f}, "
          f"system {r['system']:.2f}) for two AES-GCM opens, one seal and a socket in and out "
          f"per {PAYLOAD // 1024} KiB; {args.mib} MiB in {r['wall']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
