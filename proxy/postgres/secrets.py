"""One-time secrets for the PostgreSQL port, kept only as SCRAM-SHA-256 verifiers (RFC 7677).

What it is for: ``db-login`` mints a random secret for (user, target, grant); the listener checks a
client's SCRAM proof against its verifier and consumes it. One secret per (user, target): a new
``db-login`` replaces the previous one.

What it must not do: keep the secret itself (only salt, StoredKey, ServerKey), persist anything
(after a restart, run ``db-login`` again), or read the clock (``now`` is passed in).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import scramp

ITERATIONS = 4096


@dataclass(frozen=True)
class Verifier:
    grant_id: int
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int
    expires_at: float

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        return self.salt, self.stored_key, self.server_key, self.iterations


_DUMMY: Verifier | None = None


def dummy_verifier() -> Verifier:
    """A verifier nobody knows the secret of, so a missing grant fails exactly like a wrong
    secret. Made once: deriving it per login would make failures measurably slower."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = _verifier(secrets.token_urlsafe(24), grant_id=0, expires_at=0.0)
    return _DUMMY


def _verifier(secret: str, grant_id: int, expires_at: float) -> Verifier:
    salt, stored_key, server_key, iterations = scramp.ScramMechanism(
        "SCRAM-SHA-256").make_auth_info(secret, ITERATIONS, os.urandom(16))
    return Verifier(grant_id, salt, stored_key, server_key, iterations, expires_at)


class OneTimeSecrets:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Verifier] = {}

    def mint(self, user: str, target: str, grant_id: int, now: float, ttl: float) -> str:
        """A new secret (URL-safe text, 192 bits) for ``user`` on ``target``; replaces any other."""
        secret = secrets.token_urlsafe(24)
        self._by_key[(user, target)] = _verifier(secret, grant_id, now + ttl)
        return secret

    def lookup(self, user: str, target: str, now: float) -> Verifier | None:
        """The live verifier for (user, target), or None (expired ones are forgotten)."""
        v = self._by_key.get((user, target))
        if v is not None and v.expires_at <= now:
            del self._by_key[(user, target)]
            return None
        return v

    def consume(self, user: str, target: str, verifier: Verifier) -> bool:
        """Use ``verifier`` up; False when it was already used or replaced."""
        if self._by_key.get((user, target)) is verifier:
            del self._by_key[(user, target)]
            return True
        return False

    def forget_grant(self, grant_id: int) -> None:
        for key in [k for k, v in self._by_key.items() if v.grant_id == grant_id]:
            del self._by_key[key]
