"""Audit: the hash-chained JSON Lines log and the session recorders.

What it is for: an append-only record of everything that happened, each line carrying the hash of
the line before it, so that ``jit-proxy audit verify`` proves nothing was changed or removed.
What it must not do: record secrets (passwords, one-time secrets, key material), or import the
runtime or the protocol layers.
"""

from proxy.audit.log import AuditLog, VerifyResult, verify_log

__all__ = ["AuditLog", "VerifyResult", "verify_log"]
