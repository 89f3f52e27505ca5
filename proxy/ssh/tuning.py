"""asyncssh's per-packet work that the relay does not need, taken off its data path.

What it is for: every byte of ``ssh -J`` crosses three asyncssh connections in the proxy (the
client's outer connection, the inner jump connection, the upstream connection to the target), so
asyncssh's per-packet Python work is most of the relay's CPU (``python -m bench --profile``).

- ``SSHConnection.send_packet`` sends an empty ``SSH_MSG_IGNORE`` (RFC 4253 §11.2) before every
  packet once keys are in place. That is the countermeasure of RFC 4251 §9.3.1 against the
  chosen-plaintext attack on CBC mode, whose IV (the previous ciphertext block) the attacker can
  predict. It does nothing for AEAD ciphers (aes128/256-gcm@openssh.com, OpenSSH's form of
  RFC 5647, and chacha20-poly1305@openssh.com), whose nonces come from a counter or the sequence
  number; the proxy's SSH server offers only those by default, and its upstream connections
  prefer them. On an AEAD send cipher that one empty IGNORE is skipped; on any other (an
  operator's ``ssh.ciphers``, or a target offering only CTR) asyncssh's behaviour stays as it
  is. Any other IGNORE (one with content, or sent outside ``send_packet``'s own) goes out.
  OpenSSH sends none of these. Bench profile before: 7.6% of the relay's CPU.
- ``log_sent_packet`` and ``log_received_packet`` format the packet's name and length for every
  packet and only then ask whether packet logging (asyncssh debug level 3) is on. Here the
  question comes first; with packet logging on, the call is asyncssh's own. Before: 9%.
- On aes128/256-gcm@openssh.com without compression (what OpenSSH clients and targets end up on
  with the proxy's defaults), packets are read and written by ``_recv_gcm_packet`` and
  ``_send_gcm_packet`` instead of asyncssh's ``_recv_pkthdr``/``_recv_packet`` and
  ``send_packet``. asyncssh copied each 32 KiB packet about ten times on its way through one
  connection: the whole rest of the receive buffer twice per packet (a read holds several),
  header and tag joined on and cut off again, a new AESGCM context per packet. Here a read is
  copied once (when the next one is appended), the packet is decrypted in place from the buffer
  through a memoryview, a channel data payload is not cut out before its data is, and a packet
  is sealed in one call (and handed to ``BatchedWrites`` as header and body, unjoined). What is
  checked, in which order, and with which error is asyncssh's: the length limit
  (ProtocolError), the tag (MACError), the routing of each message type and its errors, handlers
  that return an awaitable, holding back packets during key exchange and authentication, the
  rekey trigger, sequence numbers (strict kex restarts them at NEWKEYS). One check is added, as
  OpenSSH has it: a length that is not a multiple of 16 is a ProtocolError (asyncssh fails such
  a packet's tag, or with a length under 12 misreads it). Bench, A/B: relay CPU per GiB about
  10 -> 7 s.

What it must not do: change what reaches the wire on a non-AEAD cipher, accept a packet asyncssh
would refuse, or change a logged line (at debug level 3 the skipped IGNOREs are, of course, not
logged either). The AES-GCM paths re-implement parts of asyncssh 2.24.1's ``SSHConnection`` and
lean on its attributes, so ``apply`` installs them only on that release (``GCM_PATHS_FOR``);
on any other, asyncssh's own code runs (slower, never wrong) and ``apply`` says so.
tests/integration/test_asyncssh_tuning.py runs all of it against a real OpenSSH sshd, with
packets split anywhere, rekeys both ways and spoiled packets. ``apply`` is idempotent and
patches the process.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from typing import Any

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_FIRST, MSG_CHANNEL_LAST, MSG_DEBUG,
                                MSG_IGNORE, MSG_KEX_FIRST, MSG_KEX_LAST, MSG_NEWKEYS,
                                MSG_SERVICE_ACCEPT, MSG_SERVICE_REQUEST, MSG_UNIMPLEMENTED,
                                MSG_USERAUTH_BANNER, MSG_USERAUTH_FIRST, MSG_USERAUTH_LAST)
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.misc import MACError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket, SSHPacketLogger, String, UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

AEAD = (GCMEncryption, ChachaEncryption)
_EMPTY = String(b"")  # the payload of asyncssh's own IGNORE

GCM_PATHS_FOR = "2.24.1"  # the asyncssh release _recv_gcm_packet and _send_gcm_packet follow
_HELD_UNTIL_KEX = {MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT}

_state: dict[str, Any] = {}
log = logging.getLogger("jit_proxy.ssh")


def _send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    """asyncssh's ``send_packet``, without the empty IGNORE it puts before each packet when the
    send cipher is AEAD (see the module docstring); on AES-GCM without compression, the
    leaner ``_send_gcm_packet``."""
    if (type(self._send_encryption) is GCMEncryption and self._compressor is None
            and _state["gcm"]):
        _send_gcm_packet(self, pkttype, args, handler)
        return
    if pkttype == MSG_IGNORE and args == (_EMPTY,) and self._jit_skip_ignore:
        self._jit_skip_ignore = False  # type: ignore[attr-defined]
        return
    self._jit_skip_ignore = (  # type: ignore[attr-defined]
        pkttype > MSG_KEX_LAST and isinstance(self._send_encryption, AEAD))
    try:
        _state["send_packet"](self, pkttype, *args, handler=handler)
    finally:
        self._jit_skip_ignore = False  # type: ignore[attr-defined]


def _log_sent_packet(self: SSHPacketLogger, pkttype: int, pktid: Any, packet: Any,
                     note: str = "") -> None:
    if self.logger._debug_level >= 3:
        _state["log_sent_packet"](self, pkttype, pktid, packet, note)


def _log_received_packet(self: SSHPacketLogger, pkttype: int, pktid: Any, packet: Any,
                         note: str = "") -> None:
    if self.logger._debug_level >= 3:
        _state["log_received_packet"](self, pkttype, pktid, packet, note)


def _aead(cipher: GCMCipher) -> AESGCM:
    """The cipher's AESGCM context, made once per key (asyncssh makes one per packet)."""
    aead = cipher.__dict__.get("_jit_aead")
    if aead is None:
        aead = cipher._jit_aead = AESGCM(cipher._key)  # type: ignore[attr-defined]
    return aead


def _unread_from(self: SSHConnection) -> int:
    """Where the unread part of ``self._inpbuf`` starts: packets read by ``_recv_gcm_packet``
    stay in the buffer until the next ``data_received`` (or a handler of asyncssh's own) drops
    them, so a read holding several packets is not copied once per packet. The mark names the
    buffer object it belongs to; any buffer asyncssh puts in its place starts at 0."""
    mark = self._jit_unread
    return mark[1] if mark is not None and mark[0] is self._inpbuf else 0


def _drop_read(self: SSHConnection) -> None:
    pos = _unread_from(self)
    if pos:
        self._inpbuf = self._inpbuf[pos:]
    self._jit_unread = None


def _data_received(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
    """asyncssh's ``data_received``: drops the packets already read while appending (one copy)."""
    self._inpbuf = self._inpbuf[_unread_from(self):] + data
    self._jit_unread = None
    self._recv_data()


def _recv_pkthdr(self: SSHConnection) -> bool:
    """asyncssh's packet reader, or ``_recv_gcm_packet`` on AES-GCM without compression."""
    if type(self._recv_encryption) is GCMEncryption and self._decompressor is None:
        return _recv_gcm_packet(self)
    _drop_read(self)
    return _state["recv_pkthdr"](self)


def _recv_gcm_packet(self: SSHConnection) -> bool:
    """Read, authenticate and decrypt one aes*-gcm@openssh.com packet (RFC 5647 §7 as OpenSSH
    uses it: the 4-byte packet length is the associated data, then ciphertext and 16-byte tag)
    straight out of the receive buffer, and dispatch it as asyncssh's ``_recv_packet`` does.
    Returns False until the whole packet is there. Raises ProtocolError (a length over
    asyncssh's limit, or not a multiple of 16) and MACError (tag mismatch), which end the
    connection as in asyncssh."""
    buf = self._inpbuf
    pos = _unread_from(self)
    if len(buf) - pos < self._recv_blocksize:
        return False
    pktlen = int.from_bytes(buf[pos:pos + 4], "big")
    if pktlen > self._max_recv_pktlen:
        raise ProtocolError("Max packet size exceeded")
    if pktlen < 16 or pktlen % 16:  # RFC 5647 §7.2, as OpenSSH checks (asyncssh fails the tag)
        raise ProtocolError("Packet length not a multiple of the cipher block size")
    end = pos + 4 + pktlen + self._recv_macsize
    if len(buf) < end:
        return False
    cipher = self._recv_encryption._cipher
    view = memoryview(buf)
    try:
        packet_data = _aead(cipher).decrypt(cipher._iv, view[pos + 4:end], view[pos:pos + 4])
    except InvalidTag:
        packet_data = None
    finally:
        view.release()
    cipher._update_iv()
    if not packet_data:
        raise MACError("MAC verification failed")
    if end == len(buf):  # all read: an idle connection keeps no read buffer alive
        self._inpbuf, self._jit_unread = b"", None
    else:
        self._jit_unread = (buf, end)
    self._packet = b""
    padlen = packet_data[0]
    if (4 <= padlen < len(packet_data) - 1 and packet_data[1] == MSG_CHANNEL_DATA
            and self.logger._debug_level < 3):
        # the payload is read in place (its data is copied out once, by get_string); the
        # packet log (level 3) shows whole payloads, so there the payload is cut out first
        packet = SSHPacket(packet_data)
        packet._idx, packet._len = 1, len(packet_data) - padlen
    else:
        packet = SSHPacket(packet_data[1:-padlen])
    return _dispatch(self, self._recv_seq, packet)


def _dispatch(self: SSHConnection, seq: int, packet: SSHPacket) -> bool:
    """The second half of asyncssh 2.24.1's ``_recv_packet`` for a packet that arrived under
    keys: route it to the key exchange, the authentication, a channel or the connection, with
    asyncssh's checks, errors and handling of handlers that return an awaitable."""
    pkttype = packet.get_byte()
    handler: Any = self
    skip_reason = exc_reason = ""
    if MSG_KEX_FIRST <= pkttype <= MSG_KEX_LAST:
        if not self._kex:
            skip_reason, exc_reason = "kex not in progress", "Key exchange not in progress"
        elif self._ignore_first_kex:
            skip_reason, self._ignore_first_kex = "ignored first kex", False
        else:
            handler = self._kex
    elif MSG_USERAUTH_FIRST <= pkttype <= MSG_USERAUTH_LAST:
        if self._auth:
            handler = self._auth
        else:
            skip_reason = "auth not in progress"
            exc_reason = "Authentication not in progress"
    elif pkttype > MSG_USERAUTH_LAST and not self._auth_complete:
        skip_reason = "invalid request before auth complete"
        exc_reason = "Invalid request before authentication was complete"
    elif MSG_CHANNEL_FIRST <= pkttype <= MSG_CHANNEL_LAST:
        try:
            recv_chan = packet.get_uint32()
        except PacketDecodeError:
            skip_reason = "incomplete channel request"
            exc_reason = "Incomplete channel request received"
        else:
            handler = self._channels.get(recv_chan)
            if handler is None:
                handler, skip_reason = self, "invalid channel number"
                exc_reason = f"Invalid channel number {recv_chan} received"
    handler.log_received_packet(pkttype, seq, packet, skip_reason)
    if not skip_reason:
        try:
            result = handler.process_packet(pkttype, seq, packet)
        except PacketDecodeError as exc:
            raise ProtocolError(str(exc)) from None
        if inspect.isawaitable(result):
            self._recv_handler = lambda: False  # hold what arrives until it has run
            task = self.create_task(result)
            task.add_done_callback(functools.partial(
                self._finish_recv_packet, pkttype, seq, is_async=True))
            return False
        if not result:
            self.logger.debug1("Unknown packet type %d received", pkttype)
            self.send_packet(MSG_UNIMPLEMENTED, UInt32(seq))
    if exc_reason:
        raise ProtocolError(exc_reason)
    self._finish_recv_packet(pkttype, seq)
    return True


def _send_gcm_packet(self: SSHConnection, pkttype: int, args: tuple[bytes, ...],
                     handler: Any) -> None:
    """asyncssh 2.24.1's ``send_packet`` on AES-GCM without compression: the same rekey
    trigger, holding back of packets during key exchange and authentication, padding (RFC 4253
    §6, with the length outside the encryption as in RFC 5647 §7.2), sequence numbers and rekey
    byte count; no empty IGNORE first (see the module docstring), and the packet is built with
    one join and one encryption instead of five copies."""
    if (self._auth_complete and self._kex_complete and
            (self._rekey_bytes_sent >= self._rekey_bytes or
             (self._rekey_seconds and time.monotonic() >= self._rekey_time))):
        self._send_kexinit()
        self._kexinit_sent = True
    if (((pkttype in _HELD_UNTIL_KEX or pkttype > MSG_KEX_LAST) and not self._kex_complete) or
            (pkttype == MSG_USERAUTH_BANNER and
             not (self._auth_in_progress or self._auth_complete)) or
            (pkttype > MSG_USERAUTH_LAST and not self._auth_complete)):
        self._deferred_packets.append((pkttype, args))
        return
    size = 2 + sum(map(len, args))  # padding length, type, payload
    padlen = -(self._send_enchdrlen + size - 1) % self._send_blocksize
    if padlen < 4:
        padlen += self._send_blocksize
    pktlen = size + padlen
    hdr = pktlen.to_bytes(4, "big")
    cipher = self._send_encryption._cipher
    sealed = _aead(cipher).encrypt(cipher._iv, b"".join((bytes((padlen, pkttype)), *args,
                                                          os.urandom(padlen))), hdr)
    cipher._update_iv()
    transport = self._transport
    if transport:
        try:
            if getattr(transport, "gathers", False):  # BatchedWrites: no join here
                transport.writelines((hdr, sealed))
            else:  # (asyncio's writelines lacks write's check for a lost connection: gh-136234)
                transport.write(hdr + sealed)
        except ConnectionError:  # pragma: no cover - as asyncssh's _send
            pass
    seq = self._send_seq
    self._send_seq = 0 if pkttype == MSG_NEWKEYS and self._strict_kex else (seq + 1) & 0xffffffff
    if self._kex_complete:
        self._rekey_bytes_sent += pktlen
    logger = handler or self
    if logger.logger._debug_level >= 3:  # (the payload is joined again only for the log)
        _state["log_sent_packet"](logger, pkttype, seq, bytes((pkttype,)) + b"".join(args))


def apply() -> bool:
    """Install the patches on asyncssh's classes (process-wide; idempotent). Returns whether
    the AES-GCM packet paths are among them (only on asyncssh ``GCM_PATHS_FOR``)."""
    if _state:
        return _state["gcm"]
    _state["gcm"] = asyncssh.__version__ == GCM_PATHS_FOR
    _state["send_packet"] = SSHConnection.send_packet
    _state["log_sent_packet"] = SSHPacketLogger.log_sent_packet
    _state["log_received_packet"] = SSHPacketLogger.log_received_packet
    _state["recv_pkthdr"] = SSHConnection._recv_pkthdr
    SSHConnection._jit_unread = None  # type: ignore[attr-defined]
    SSHConnection._jit_skip_ignore = False  # type: ignore[attr-defined]
    SSHConnection.send_packet = _send_packet  # type: ignore[method-assign]
    SSHPacketLogger.log_sent_packet = _log_sent_packet  # type: ignore[method-assign]
    SSHPacketLogger.log_received_packet = _log_received_packet  # type: ignore[method-assign]
    if _state["gcm"]:
        SSHConnection._recv_pkthdr = _recv_pkthdr  # type: ignore[method-assign]
        SSHConnection.data_received = _data_received  # type: ignore[method-assign]
    else:
        log.warning("asyncssh %s: the relay's AES-GCM packet paths are written for %s and are "
                    "off; asyncssh's own code relays (more CPU per byte)",
                    asyncssh.__version__, GCM_PATHS_FOR)
    return _state["gcm"]
