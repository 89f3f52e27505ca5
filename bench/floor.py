"""The least CPU a Python relay doing jit-proxy's data paths needs, on this machine.

What it is for: ``python -m bench.floor`` puts a number on what the design costs before any of
asyncssh's or the proxy's own per-packet work. Every byte of ``ssh -J`` through jit-proxy is
opened twice (the client's outer connection, then the inner one the proxy terminates to record
and to log in with its own certificate) and sealed once (the connection to the target), and it
is read from one socket and written to another. Here one uvloop protocol does exactly that for
32 KiB payloads (aes128-gcm, what OpenSSH and the proxy's defaults agree on) between two local
sockets fed and drained by threads, and the event loop thread's CPU (user, system) per GiB is
printed. Compare it with ``relay CPU per GiB`` of ``python -m bench --only ssh``: the difference
is the per-packet Python work a leaner relay could save at most.

``python -m bench.floor --pg`` does the same for the PostgreSQL path: a bare uvloop relay that
terminates TLS from pgbench and opens TLS (verify-full) to the cluster, as jit-proxy does, and
passes bytes through with no parsing, no audit and no authentication of its own (SCRAM goes end to
end), alternately with pgbouncer (session pooling, TLS on both sides, as in ``--only pg``) on one
cluster. It prints pgbench ``-S`` TPS and each relay's CPU (user, system) per transaction, and
their ratio: the most any Python relay could reach against pgbouncer here.

What it must not do: pass for a measurement of jit-proxy (it relays no SSH and audits no SQL), or
reach anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.runtime.daemon import run  # uvloop when installed, as the proxy runs

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


class _Pump(asyncio.Protocol):
    """One side of the bare PostgreSQL relay: what arrives is written to ``peer`` as it comes;
    when this side's own transport cannot take more, ``peer`` stops reading."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what came before ``attach``
        self.handshake: asyncio.StreamWriter | None = None  # dropped, it would close the socket

    def attach(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.early:
            peer.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def _bare_pg_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          server_tls: ssl.SSLContext, upstream_tls: ssl.SSLContext,
                          upstream_port: int) -> None:
    """SSLRequest from the client, TLS to the cluster, TLS from the client, then bytes."""
    from proxy.pgwire import SSLRequest
    loop = asyncio.get_running_loop()
    try:
        if await reader.readexactly(8) != SSLRequest().encode():
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        up_writer.write(SSLRequest().encode())
        if await up_reader.readexactly(1) != b"S":
            raise ConnectionError("the cluster refused TLS")
        from_upstream, from_client = _Pump(), _Pump()
        from_upstream.handshake, from_client.handshake = up_writer, writer
        upstream = await loop.start_tls(up_writer.transport, from_upstream, upstream_tls,
                                        server_hostname="127.0.0.1")
        from_client.attach(upstream)
        writer.write(b"S")
        client = await loop.start_tls(writer.transport, from_client, server_tls,
                                      server_side=True)
        from_upstream.attach(client)
    except (OSError, asyncio.IncompleteReadError):
        writer.close()


def measure_pg(seconds: int, rounds: int, scale: int) -> dict[str, dict[str, float]]:
    """pgbench -S (8 clients, 2 threads) through the bare relay and through pgbouncer,
    alternately ``rounds`` times for ``seconds`` each, on a cluster of pgbench scale ``scale``:
    for each, the median ``tps`` and the relay's ``user`` and ``system`` CPU µs per
    transaction. Raises RuntimeError when a tool is missing or pgbench fails."""
    from bench.env import (PG_DB, PG_PASSWORD, PG_USER, PgPeers, cpu_split, descendants,
                           require_tools)
    from bench.pg import run_pgbench
    require_tools(pg=True)
    d = Path(tempfile.mkdtemp(prefix="jit-floor-"))
    os.chmod(d, 0o711)
    peers = PgPeers(d / "pg", scale, max_connections=100)
    ready, port, stop = threading.Event(), [0], [None]

    def serve() -> None:
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (d / "cert.pem").write_bytes(peers.cert.chain_pem)
        (d / "key.pem").write_bytes(peers.cert.key_pem)
        os.chmod(d / "key.pem", 0o600)
        server_tls.load_cert_chain(d / "cert.pem", d / "key.pem")
        upstream_tls = ssl.create_default_context(cafile=str(peers.ca_file))

        async def relay() -> None:
            server = await asyncio.start_server(
                lambda r, w: _bare_pg_client(r, w, server_tls, upstream_tls, peers.port),
                "127.0.0.1", 0)
            port[0] = server.sockets[0].getsockname()[1]
            stop[0] = (asyncio.get_running_loop(), asyncio.Event())
            ready.set()
            await stop[0][1].wait()
            server.close()
        run(relay())

    thread = threading.Thread(target=serve, daemon=True)
    try:
        peers.start()
        thread.start()
        if not ready.wait(30):
            raise RuntimeError("the bare relay did not start")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        environ.update(PGPASSWORD=PG_PASSWORD, PGSSLMODE="require")
        assert peers.bouncer is not None
        bouncer = (descendants(peers.bouncer.pid) or [peers.bouncer.pid])[0]
        relay_stat = Path(f"/proc/self/task/{thread.native_id}/stat")
        bouncer_stat = Path(f"/proc/{bouncer}/stat")
        paths = {"bare relay": (port[0], lambda: cpu_split(relay_stat.read_text())),
                 "pgbouncer": (peers.bouncer_port, lambda: cpu_split(bouncer_stat.read_text()))}
        got: dict[str, dict[str, list[float]]] = {p: {"tps": [], "user": [], "system": []}
                                                  for p in paths}
        for _ in range(rounds):
            for name, (p, cpu) in paths.items():
                before = cpu()
                tps, done = run_pgbench(["-h", "127.0.0.1", "-p", str(p), "-U", PG_USER, PG_DB],
                                        environ, seconds, via=name)
                after = cpu()
                got[name]["tps"].append(tps)
                got[name]["user"].append((after[0] - before[0]) / max(done, 1) * 1e6)
                got[name]["system"].append((after[1] - before[1]) / max(done, 1) * 1e6)
        return {name: {k: statistics.median(v) for k, v in figures.items()}
                for name, figures in got.items()}
    finally:
        if stop[0] is not None:
            loop, event = stop[0]
            loop.call_soon_threadsafe(event.set)
            thread.join(10)
        peers.stop()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="payload to relay (MiB)")
    p.add_argument("--pg", action="store_true",
                   help="the PostgreSQL path instead: a bare TLS relay against pgbouncer")
    p.add_argument("--seconds", type=int, default=8, help="length of each pgbench run (--pg)")
    p.add_argument("--rounds", type=int, default=3, help="alternated pgbench runs (--pg)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (--pg)")
    args = p.parse_args()
    if args.pg:
        try:
            r = measure_pg(args.seconds, args.rounds, args.scale)
        except RuntimeError as exc:
            print(f"bench.floor: {exc}", file=sys.stderr)
            return 1
        for name, f in r.items():
            print(f"{name}: {f['tps']:.0f} TPS, {f['user'] + f['system']:.1f} µs CPU per "
                  f"transaction (user {f['user']:.1f}, system {f['system']:.1f})")
        ratio = r["bare relay"]["tps"] / r["pgbouncer"]["tps"]
        print(f"pg relay floor: {ratio:.2f}x pgbouncer's pgbench -S TPS for a Python relay that "
              f"only terminates and opens TLS (medians of {args.rounds} alternated "
              f"{args.seconds} s runs)")
        return 0
    r = run(measure(args.mib))
    print(f"relay floor: {r['user'] + r['system']:.2f} s CPU per GiB (user {r['user']:.2f}, "
          f"system {r['system']:.2f}) for two AES-GCM opens, one seal and a socket in and out "
          f"per {PAYLOAD // 1024} KiB; {args.mib} MiB in {r['wall']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
