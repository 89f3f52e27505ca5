"""Two per-packet costs of asyncssh that the relay does not need, taken off its data path.

What it is for: every byte of ``ssh -J`` crosses three asyncssh connections in the proxy (the
client's outer connection, the inner jump connection, the upstream connection to the target), so
asyncssh's per-packet Python work is most of the relay's CPU (``python -m bench --profile``).
Two parts of that work serve nothing here:

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

What it must not do: change what reaches the wire on a non-AEAD cipher, or change a logged line
(at debug level 3 the skipped IGNOREs are, of course, not logged either). Written against
asyncssh 2.24.1; tests/integration/test_asyncssh_tuning.py fails if an upgrade moves either
path. ``apply`` is idempotent and patches the process.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE, MSG_KEX_LAST
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.packet import SSHPacketLogger, String

AEAD = (GCMEncryption, ChachaEncryption)
_EMPTY = String(b"")  # the payload of asyncssh's own IGNORE

_state: dict[str, Any] = {}


def _send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    """asyncssh's ``send_packet``, without the empty IGNORE it puts before each packet when the
    send cipher is AEAD (see the module docstring)."""
    if pkttype == MSG_IGNORE and args == (_EMPTY,) and getattr(self, "_jit_skip_ignore", False):
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
