"""proxy.ssh.tuning against a real OpenSSH sshd: on an AEAD cipher no empty IGNORE precedes each
packet, on any other cipher asyncssh's IGNORE stays, also across rekeys; IGNOREs sent on purpose
go out; the data arrives whole either way; asyncssh's packet log is not formatted below debug
level 3 and still written at level 3. (``apply`` patches the test process for the rest of the run,
as it does the daemon.)"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_IGNORE, MSG_KEX_LAST,
                                MSG_KEXINIT, MSG_UNIMPLEMENTED)
from asyncssh.packet import SSHPacketLogger, String

from ca.ssh import SSHCertificateAuthority, UserCertificateSpec
from proxy.runtime.sandbox import TargetSSHD
from proxy.ssh import tuning

CHUNKS, CHUNK = 20, 1000


@pytest.fixture(scope="module")
def target(tmp_path_factory, test_login):
    root = tmp_path_factory.mktemp("tuning")
    ca = SSHCertificateAuthority.open(root / "ca")
    sshd = TargetSSHD(root / "target", user_ca=ca.user_ca_public)
    host_key = sshd.prepare()
    sshd.start()
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    cert = ca.issue_user_certificate(key, UserCertificateSpec(
        serial=1, key_id="tuning-test", principal=test_login, valid_after=now - 60,
        valid_before=now + 3600))
    tuning.apply()
    yield {"sshd": sshd, "host_key": host_key, "login": test_login, "key": key, "cert": cert}
    sshd.stop()


def connect_to(target, cipher: str, **options):
    """An asyncssh client connection to the test sshd with its certificate, ``cipher`` only."""
    return asyncssh.connect(
        "127.0.0.1", target["sshd"].port, username=target["login"], config=None,
        client_keys=[(target["key"], target["cert"])], agent_path=None,
        known_hosts=([asyncssh.import_public_key(target["host_key"])], [], []),
        encryption_algs=[cipher], **options)


async def packets_for_writes(target, cipher: str, **connect) -> tuple[int, str]:
    """(packets the client sent for CHUNKS writes of CHUNK bytes, what ``wc -c`` counted).
    The first figure is from sequence numbers: meaningful only without a rekey (strict kex
    restarts them at each NEWKEYS)."""
    async with connect_to(target, cipher, **connect) as conn:
        assert conn.get_extra_info("send_cipher") == cipher
        process = await conn.create_process("wc -c", encoding=None)
        before = conn._send_seq
        for _ in range(CHUNKS):
            process.stdin.write(b"x" * CHUNK)
            await process.stdin.drain()
        sent = conn._send_seq - before
        process.stdin.write_eof()
        out = await asyncio.wait_for(process.stdout.read(), 30)
        return sent, out.decode().strip()


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_aead_cipher_sends_one_packet_per_write(target, cipher):
    sent, counted = asyncio.run(packets_for_writes(target, cipher))
    assert counted == str(CHUNKS * CHUNK)
    assert sent == CHUNKS  # without the tuning: 2 * CHUNKS (an IGNORE before each)


def test_other_cipher_keeps_the_ignore_packets(target):
    sent, counted = asyncio.run(packets_for_writes(target, "aes128-ctr"))
    assert counted == str(CHUNKS * CHUNK)
    assert sent == 2 * CHUNKS


def sent_packet_log(target, caplog, cipher: str, **connect) -> tuple[list[int], str]:
    """(the types of the packets the client sent, as asyncssh's packet log at debug level 3 gives
    them; what ``wc -c`` counted) for one transfer."""
    caplog.clear()
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            _, counted = asyncio.run(packets_for_writes(target, cipher, **connect))
    finally:
        asyncssh.set_debug_level(1)
    # a packet sent after a key exchange held it back is logged by the connection, which knows
    # channel packets by number only ("Sent packet type 94")
    types = [int(m.group(1) or m.group(2)) for r in caplog.records
             if (m := re.search(r"\] Sent (?:MSG_[A-Z_]+ \((\d+)\)|packet type (\d+))",
                                r.getMessage()))]
    return types, counted


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes128-ctr"])
def test_rekeys_mid_transfer(target, caplog, cipher):
    """A rekey sends KEXINIT from inside send_packet: the flag must neither swallow nor keep."""
    types, counted = sent_packet_log(target, caplog, cipher, rekey_bytes=8192)
    assert counted == str(CHUNKS * CHUNK)
    assert types.count(MSG_KEXINIT) >= 3  # the first exchange and at least two rekeys
    above_kex = [t for t in types if t > MSG_KEX_LAST]  # (the packets asyncssh pads)
    assert types.count(MSG_CHANNEL_DATA) == CHUNKS
    if cipher == "aes128-ctr":  # one IGNORE before each of them, as asyncssh does
        assert types.count(MSG_IGNORE) == len(above_kex)
    else:
        assert MSG_IGNORE not in types


class ChaffOnRekey(logging.Handler):
    """Sends an IGNORE with content when ``conn`` requests a rekey: from inside send_packet,
    between the patch deciding to skip asyncssh's empty IGNORE and asyncssh sending it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.conn, self.sent = None, 0

    def emit(self, record):
        conn = self.conn
        if (conn is not None and conn._send_encryption is not None
                and record.getMessage().endswith("Requesting key exchange")):
            conn.send_packet(MSG_IGNORE, String(b"chaff"))
            self.sent += 1


async def send_own_ignores(target, chaff: ChaffOnRekey) -> None:
    async with connect_to(target, "aes128-gcm@openssh.com", rekey_bytes=8192) as conn:
        chaff.conn = conn
        conn.send_packet(MSG_IGNORE, String(b"chaff"))
        conn.send_packet(MSG_IGNORE, String(b""))
        process = await conn.create_process("wc -c", encoding=None)
        for _ in range(CHUNKS):
            process.stdin.write(b"x" * CHUNK)
            await process.stdin.drain()
        process.stdin.write_eof()
        assert (await process.stdout.read()).strip() == str(CHUNKS * CHUNK).encode()
        assert conn._jit_skip_ignore is False


def test_ignore_packets_sent_on_purpose_go_out(target, caplog):
    chaff = ChaffOnRekey()
    logging.getLogger("asyncssh").addHandler(chaff)
    caplog.clear()
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            asyncio.run(send_own_ignores(target, chaff))
    finally:
        asyncssh.set_debug_level(1)
        logging.getLogger("asyncssh").removeHandler(chaff)
    assert chaff.sent >= 2  # rekeys happened, each with its chaff
    sent = sum("] Sent MSG_IGNORE" in r.getMessage() for r in caplog.records)
    assert sent == 2 + chaff.sent


@pytest.mark.parametrize("level", [1, 2])
def test_packet_log_not_formatted_below_level_3(target, monkeypatch, level):
    formatted = []
    monkeypatch.setattr(SSHPacketLogger, "_log_packet",
                        lambda self, *args: formatted.append(args[1]))
    asyncssh.set_debug_level(level)
    try:
        _, counted = asyncio.run(packets_for_writes(target, "aes128-gcm@openssh.com"))
    finally:
        asyncssh.set_debug_level(1)
    assert counted == str(CHUNKS * CHUNK)
    assert formatted == []


def test_packet_log_lines_at_level_3(target, caplog):
    types, _ = sent_packet_log(target, caplog, "aes128-gcm@openssh.com")
    assert types.count(MSG_CHANNEL_DATA) == CHUNKS
    assert MSG_KEXINIT in types and MSG_CHANNEL_EOF in types
    received = [r.getMessage() for r in caplog.records if "] Received MSG_CHANNEL_DATA" in
                r.getMessage()]
    assert received  # wc's answer


# --- the AES-GCM packet paths (_recv_gcm_packet, _send_gcm_packet) --------------------------

class ChoppingRelay:
    """A TCP relay between an asyncssh client and the test sshd that passes the bytes on in
    chunks of random size (1 byte to 70,000, seeded), so the client reads packets split anywhere
    and several packets in one read. It parses the server's stream (version line, plaintext
    packets up to the server's NEWKEYS, then aes-gcm packets whose length is in the clear) and can
    spoil the server's ``spoil_at``-th encrypted packet: ``"tag"`` flips a ciphertext bit,
    ``"length"`` claims a length over asyncssh's limit, ``"odd"`` one byte more than it is,
    ``"short"`` a length of 8."""

    def __init__(self, port: int, seed: int, spoil: str | None = None, spoil_at: int = 3,
                 sizes: list[int] | None = None):
        import itertools
        import random
        self.port, self.rng = port, random.Random(seed)
        self.spoil, self.spoil_at = spoil, spoil_at
        self.spoiled = False
        self.sizes = itertools.cycle(sizes) if sizes else None  # (else random ones)

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def _size(self) -> int:
        if self.sizes is not None:
            return next(self.sizes)
        return self.rng.choice([1, 3, 4, 15, 16, 17, 20, self.rng.randint(1, 70000)])

    async def _pump(self, reader, writer, frame=None) -> None:
        try:
            while data := await reader.read(1 << 17):
                if frame is not None:
                    data = frame(data)
                while data:
                    n = self._size()
                    writer.write(data[:n])
                    data = data[n:]
                    await writer.drain()
                    if self.rng.random() < 0.05:
                        await asyncio.sleep(0.001)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(self._pump(c_reader, s_writer),
                             self._pump(s_reader, c_writer, self._framer()))

    def _framer(self):
        """Passes the server's bytes through, spoiling one encrypted packet if asked."""
        buf, state = bytearray(), {"version": True, "encrypted": 0, "newkeys": False}

        def frame(data: bytes) -> bytes:
            buf.extend(data)
            out = bytearray()
            while True:
                if state["version"]:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    out += buf[:nl + 1]
                    del buf[:nl + 1]
                    state["version"] = False
                    continue
                if len(buf) < 6:
                    break
                length = int.from_bytes(buf[:4], "big")
                total = 4 + length + (16 if state["newkeys"] else 0)
                if len(buf) < total:
                    break
                packet = bytearray(buf[:total])
                del buf[:total]
                if not state["newkeys"]:
                    state["newkeys"] = packet[5] == 21  # MSG_NEWKEYS
                else:
                    state["encrypted"] += 1
                    if self.spoil and state["encrypted"] == self.spoil_at:
                        self.spoiled = True
                        lengths = {"length": 0x7fffffff, "odd": length + 1, "short": 8}
                        if self.spoil == "tag":
                            packet[10] ^= 0x01
                        else:
                            packet[:4] = lengths[self.spoil].to_bytes(4, "big")
                out += packet
            return bytes(out)
        return frame


def connect_through(target, port: int, cipher: str, **options):
    return asyncssh.connect(
        "127.0.0.1", port, username=target["login"], config=None,
        client_keys=[(target["key"], target["cert"])], agent_path=None,
        known_hosts=([asyncssh.import_public_key(target["host_key"])], [], []),
        encryption_algs=[cipher], **options)


async def round_trip(target, port: int, cipher: str, **options) -> tuple[str, bytes]:
    """Uploads 3 MiB of random bytes to sha256sum and downloads ``seq 1 400000`` (2.6 MB):
    (the digest the target computed, what came back)."""
    import os as _os
    async with connect_through(target, port, cipher, **options) as conn:
        assert conn.get_extra_info("send_cipher") == cipher
        assert conn.get_extra_info("recv_cipher") == cipher
        up = _os.urandom(3 << 20)
        process = await conn.create_process("sha256sum", encoding=None)
        for i in range(0, len(up), 100_000):
            process.stdin.write(up[i:i + 100_000])
        process.stdin.write_eof()
        digest = (await asyncio.wait_for(process.stdout.read(), 60)).split()[0].decode()
        down = await asyncio.wait_for(conn.run("seq 1 400000", encoding=None), 60)
    import hashlib
    assert digest == hashlib.sha256(up).hexdigest()
    return digest, down.stdout


EXPECTED_DOWN = "".join(f"{i}\n" for i in range(1, 400001)).encode()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"])
def test_gcm_packets_split_anywhere_arrive_whole(target, cipher, seed):
    async def run():
        async with ChoppingRelay(target["sshd"].port, seed) as port:
            return await round_trip(target, port, cipher)
    _, down = asyncio.run(run())
    assert down == EXPECTED_DOWN


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(1, 40), st.integers(1000, 70000)), min_size=1,
                      max_size=6).filter(lambda sizes: sum(sizes) >= 200 * len(sizes)),
       up=st.binary(min_size=1, max_size=70000), down=st.integers(0, 70000))
def test_gcm_stream_cut_anywhere(target, sizes, up, down):
    """hypothesis picks how the relay cuts both streams (from the handshake on) and how much
    goes each way; whatever the cuts, the bytes arrive whole. (At least one byte goes up:
    asyncssh's ``run`` sends no EOF for an empty ``input``.)"""
    import hashlib

    async def run():
        async with ChoppingRelay(target["sshd"].port, 0, sizes=sizes) as port:
            async with connect_through(target, port, "aes128-gcm@openssh.com") as conn:
                digest = await asyncio.wait_for(conn.run("sha256sum", input=up, encoding=None),
                                                30)
                got = await asyncio.wait_for(conn.run(f"head -c {down} /dev/zero",
                                                      encoding=None), 30)
                return digest.stdout.split()[0].decode(), got.stdout
    digest, got = asyncio.run(run())
    assert digest == hashlib.sha256(up).hexdigest()
    assert got == bytes(down)


def test_gcm_across_rekeys_both_ways(target, monkeypatch):
    """Each rekey's new keys are taken up mid-stream in both directions, and the send sequence
    number is the server's after them: strict kex restarts it at each NEWKEYS, which these paths
    send under the old keys. (GCM's nonce is its own counter, so only the server's
    SSH_MSG_UNIMPLEMENTED, which quotes the number it counted, shows a wrong one.)"""
    async def run():
        async with ChoppingRelay(target["sshd"].port, 7) as port:
            async with connect_through(target, port, "aes128-gcm@openssh.com",
                                       rekey_bytes=1 << 18) as conn:
                kexinits = []
                original = conn._send_kexinit
                conn._send_kexinit = lambda: (kexinits.append(1), original())[1]
                data = b"".join(bytes([i % 251]) * 4096 for i in range(512))  # 2 MiB
                result = await asyncio.wait_for(conn.run("cat", input=data, encoding=None), 60)
                assert result.stdout == data
                quoted = asyncio.get_running_loop().create_future()
                monkeypatch.setitem(type(conn)._packet_handlers, MSG_UNIMPLEMENTED,
                                    lambda self, t, i, packet: quoted.set_result(
                                        packet.get_uint32()))
                seq = conn._send_seq
                conn.send_packet(140)  # unassigned (OpenSSH drops the connection at 192+)
                assert await asyncio.wait_for(quoted, 10) == seq
                return len(kexinits)
    assert asyncio.run(run()) >= 4  # the client asked for rekeys (2 MiB each way, 256 KiB each)


@pytest.mark.parametrize("spoil, error", [("tag", asyncssh.MACError),
                                          ("length", asyncssh.ProtocolError),
                                          ("odd", asyncssh.ProtocolError),
                                          ("short", asyncssh.ProtocolError)])
def test_gcm_spoiled_packet_ends_the_connection(target, spoil, error):
    """A flipped ciphertext bit fails the tag (MACError, as in asyncssh); a length over the
    limit, or one that is not a multiple of 16 (RFC 5647 §7.2; asyncssh fails the tag or, under
    12, misreads the packet), is refused before anything is decrypted (ProtocolError); each ends
    the connection."""
    async def run():
        relay = ChoppingRelay(target["sshd"].port, 11, spoil=spoil, spoil_at=2)
        async with relay as port:
            with pytest.raises(error):
                async with connect_through(target, port, "aes128-gcm@openssh.com") as conn:
                    await asyncio.wait_for(conn.run("true"), 30)
        return relay.spoiled
    assert asyncio.run(run())


def test_gcm_paths_only_on_the_asyncssh_release_they_follow(target):
    """(On another release asyncssh's own code runs, and the tests above check it instead.)"""
    from asyncssh.connection import SSHConnection
    on = tuning.apply()
    assert on == (asyncssh.__version__ == tuning.GCM_PATHS_FOR)
    assert (SSHConnection._recv_pkthdr is tuning._recv_pkthdr) == on
    assert (SSHConnection.data_received is tuning._data_received) == on


def test_gcm_idle_connection_keeps_no_read_buffer(target):
    """Once every packet read is handled, the receive buffer is let go (the offset mark would
    otherwise keep the last read, up to 256 KiB, alive on each idle connection)."""
    async def run():
        async with connect_to(target, "aes128-gcm@openssh.com") as conn:
            result = await asyncio.wait_for(conn.run("head -c 1000000 /dev/zero",
                                                     encoding=None), 30)
            assert len(result.stdout) == 1000000
            await asyncio.sleep(0.2)
            return conn._inpbuf, conn._jit_unread
    assert asyncio.run(run()) == (b"", None)


def test_gcm_over_a_transport_without_writelines(target):
    """asyncssh's proxy_command tunnel has write but no writelines: packets still go out."""
    import sys
    relay = ("import socket, sys, threading\n"
             f"s = socket.create_connection(('127.0.0.1', {target['sshd'].port}))\n"
             "def up():\n"
             "    while d := sys.stdin.buffer.raw.read(65536): s.sendall(d)\n"
             "threading.Thread(target=up, daemon=True).start()\n"
             "while d := s.recv(65536): sys.stdout.buffer.write(d); sys.stdout.flush()\n")

    async def run():
        async with connect_to(target, "aes128-gcm@openssh.com",
                              proxy_command=[sys.executable, "-c", relay]) as conn:
            assert not hasattr(conn._transport, "writelines")
            return (await asyncio.wait_for(conn.run("echo through"), 30)).stdout
    assert asyncio.run(run()) == "through\n"
