"""Two per-packet costs of asyncssh that the relay does not need, taken off its data path.

What it is for: every byte of ``ssh -J`` crosses three asyncssh connections in the proxy (the
client's outer connection, the inner jump connection, the upstream connection to the target), so
asyncssh's per-packet Python work is most of the relay's CPU (``python -m bench --profile``).
Two parts of that work serve nothing here:

- ``SSHConnection.send_packet`` sends an empty ``SSH_MSG_IGNORE`` (RFC 4253 §11.2) before every
  packet once keys are in place. That is the old countermeasure against the chosen-plaintext
  attack on CBC mode with a predictable IV (CVE-2008-5161; RFC 4251 §9.3.1); it does nothing for
  AEAD ciphers (AES-GCM, RFC 5647, and chacha20-poly1305, PROTOCOL.chacha20poly1305), which take a
  fresh nonce per packet and are the only ones the proxy negotiates by default. On those ciphers
  the IGNORE packet is skipped; on any other cipher (an operator's ``ssh.ciphers`` may add CTR or
  CBC) asyncssh's behaviour stays as it is. Bench profile before: 7.6% of the relay's CPU.
- ``log_sent_packet`` and ``log_received_packet`` format the packet's name and length for every
  packet and only then ask whether packet logging (asyncssh debug level 3) is on. Here the
  question comes first; with packet logging on, the call is asyncssh's own. Before: 9%.

What it must not do: change what reaches the wire on a non-AEAD cipher, change any logged line,
or touch anything but these two paths. ``apply`` is idempotent.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE, MSG_KEX_LAST
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.packet import SSHPacketLogger

AEAD = (GCMEncryption, ChachaEncryption)

_state: dict[str, Any] = {}


def _send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    """asyncssh's ``send_packet``, without the empty IGNORE it puts before each packet when the
    send cipher is AEAD (see the module docstring)."""
    if pkttype == MSG_IGNORE and getattr(self, "_jit_skip_ignore", False):
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


def apply() -> None:
    """Install both patches on asyncssh's classes (process-wide; idempotent)."""
    if _state:
        return
    _state["send_packet"] = SSHConnection.send_packet
    _state["log_sent_packet"] = SSHPacketLogger.log_sent_packet
    _state["log_received_packet"] = SSHPacketLogger.log_received_packet
    SSHConnection.send_packet = _send_packet  # type: ignore[method-assign]
    SSHPacketLogger.log_sent_packet = _log_sent_packet  # type: ignore[method-assign]
    SSHPacketLogger.log_received_packet = _log_received_packet  # type: ignore[method-assign]
