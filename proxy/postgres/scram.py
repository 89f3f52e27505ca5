"""The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL clients speak it.

What it is for: checking a client's proof against a stored verifier (salt, StoredKey, ServerKey,
iterations) and producing the server's signature, in three calls that map onto the
SASLInitialResponse / SASLContinue / SASLResponse / SASLFinal messages.

Why not scramp here: libpq and most PostgreSQL drivers send an empty user name (``n=,``) because
PostgreSQL takes the user from the startup packet, and scramp's server refuses empty attributes.
scramp still makes the verifiers (``make_auth_info``) and is the proxy's SCRAM client upstream.

What it must not do: accept channel binding it cannot check (``p=`` is refused), compare proofs
with anything but ``hmac.compare_digest``, or ever see the secret itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets


class ScramError(Exception):
    """The client's messages are malformed or its proof is wrong (never says which to the client)."""


def _attrs(text: str, keys: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError("malformed SCRAM attribute")
        out.setdefault(part[0], part[2:])
    for k in keys:
        if k not in out:
            raise ScramError(f"missing SCRAM attribute {k!r}")
    return out


class ScramServer:
    """One exchange. ``auth_info`` is (salt, stored_key, server_key, iterations) as made by
    ``scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info``."""

    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, auth_info: tuple[bytes, bytes, bytes, int]):
        self._salt, self._stored_key, self._server_key, self._iterations = auth_info
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2 = ""
        self._server_signature = b""

    def server_first(self, client_first: str) -> str:
        """Take the client-first message (``n,,n=user,r=nonce``); return the server-first one.

        Raises:
            ScramError: channel binding requested (``p=``), or a malformed message.
        """
        if client_first.startswith("p="):
            raise ScramError("channel binding is not offered")
        parts = client_first.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            raise ScramError("malformed gs2 header")
        self._gs2 = parts[0] + "," + parts[1] + ","
        self._client_first_bare = parts[2]
        bare = _attrs(self._client_first_bare.replace("n=,", "n=x,", 1)
                      if self._client_first_bare.startswith("n=,") else self._client_first_bare,
                      ("n", "r"))
        if "m" in bare:
            raise ScramError("mandatory extensions are not supported")
        client_nonce = bare["r"]
        if not client_nonce or any(c < "!" or c > "~" or c == "," for c in client_nonce):
            raise ScramError("malformed nonce")
        self._nonce = client_nonce + secrets.token_urlsafe(18)
        self._server_first = (f"r={self._nonce},s={base64.b64encode(self._salt).decode()},"
                              f"i={self._iterations}")
        return self._server_first

    def server_final(self, client_final: str) -> str:
        """Check the client-final message's binding, nonce and proof; return ``v=signature``.

        Raises:
            ScramError: anything wrong, including a wrong proof (the secret was wrong).
        """
        without_proof, sep, proof_part = client_final.rpartition(",p=")
        if not sep:
            raise ScramError("missing proof")
        attrs = _attrs(without_proof, ("c", "r"))
        try:
            binding = base64.b64decode(attrs["c"], validate=True)
            proof = base64.b64decode(proof_part, validate=True)
        except (binascii.Error, ValueError):
            raise ScramError("malformed base64") from None
        if not hmac.compare_digest(binding, self._gs2.encode()):
            raise ScramError("channel binding data does not match")
        if not hmac.compare_digest(attrs["r"].encode(), self._nonce.encode()):
            raise ScramError("nonce does not match")
        auth_message = ",".join((self._client_first_bare, self._server_first,
                                 without_proof)).encode()
        client_signature = hmac.new(self._stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(client_signature):
            raise ScramError("wrong proof")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key):
            raise ScramError("wrong proof")
        self._server_signature = hmac.new(self._server_key, auth_message,
                                          hashlib.sha256).digest()
        return "v=" + base64.b64encode(self._server_signature).decode()
