"""proxy.ssh.tuning against a real OpenSSH sshd: on an AEAD cipher no empty IGNORE precedes each
packet, on any other cipher asyncssh's IGNORE stays; the data arrives whole either way; asyncssh's
packet log lines still appear at debug level 3."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncssh
import pytest

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


async def packets_for_writes(target, cipher: str) -> tuple[int, str]:
    """(packets the client sent for CHUNKS writes of CHUNK bytes, what ``wc -c`` counted)."""
    async with asyncssh.connect(
            "127.0.0.1", target["sshd"].port, username=target["login"], config=None,
            client_keys=[(target["key"], target["cert"])], agent_path=None,
            known_hosts=([asyncssh.import_public_key(target["host_key"])], [], []),
            encryption_algs=[cipher]) as conn:
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


def packet_lines(target, caplog, level: int) -> list[str]:
    """asyncssh's log lines about channel data packets during one transfer at ``level``."""
    caplog.clear()
    asyncssh.set_debug_level(level)
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            asyncio.run(packets_for_writes(target, "aes128-gcm@openssh.com"))
    finally:
        asyncssh.set_debug_level(1)
    return [r.getMessage() for r in caplog.records if "MSG_CHANNEL_DATA" in r.getMessage()]


def test_packet_log_lines_appear_at_debug_level_3_only(target, caplog):
    lines = packet_lines(target, caplog, 3)
    assert any("] Sent MSG_CHANNEL_DATA" in line for line in lines), lines[:5]
    assert any("] Received MSG_CHANNEL_DATA" in line for line in lines), lines[:5]
    assert packet_lines(target, caplog, 2) == []
