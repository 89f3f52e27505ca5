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

from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_IGNORE, MSG_KEX_LAST,
                                MSG_KEXINIT)
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
