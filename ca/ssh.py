"""OpenSSH user and host certificates (PROTOCOL.certkeys) signed by the internal CA.

What it is for: turning a grant's facts (principal, validity, permissions) into a signed certificate.
The user CA signs the certificates the proxy presents to targets; the host CA signs the host
certificates the proxy presents to clients (for itself and for every target it terminates).

What it must not do: choose serials or read the clock itself (callers pass both, so serials can be
persisted and time injected), or ever mint a certificate without principals or without an end:
asyncssh's defaults (no principals = any user; valid_before = forever) are never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ca.keys import load_or_create_key

USER_CA_FILE = "user_ca"
HOST_CA_FILE = "host_ca"


@dataclass(frozen=True)
class UserCertificateSpec:
    """What a user certificate says. Times are POSIX seconds (UTC); ``serial`` is a 64-bit integer."""

    serial: int
    key_id: str
    principal: str
    valid_after: int
    valid_before: int
    permit_agent_forwarding: bool = False
    permit_port_forwarding: bool = False
    permit_x11_forwarding: bool = False
    permit_pty: bool = True


class SSHCertificateAuthority:
    """The user CA and the host CA, both ed25519."""

    def __init__(self, user_ca: asyncssh.SSHKey, host_ca: asyncssh.SSHKey):
        self._user_ca = user_ca
        self._host_ca = host_ca

    @classmethod
    def open(cls, directory: Path, passphrase: bytes | None = None) -> "SSHCertificateAuthority":
        """Load the CA keys from ``directory``, creating them (0600) on first use.

        Raises:
            ca.CAKeyError: a key file is too open, undecryptable or not a key.
        """
        directory = Path(directory)
        return cls(load_or_create_key(directory / USER_CA_FILE, passphrase),
                   load_or_create_key(directory / HOST_CA_FILE, passphrase))

    @property
    def user_ca_public(self) -> str:
        """The user CA public key, one OpenSSH line (for sshd's TrustedUserCAKeys)."""
        return self._user_ca.export_public_key().decode().strip()

    @property
    def host_ca_public(self) -> str:
        """The host CA public key, one OpenSSH line."""
        return self._host_ca.export_public_key().decode().strip()

    def known_hosts_line(self, pattern: str = "*") -> str:
        """The ``@cert-authority`` line that makes a client trust every host certificate we sign."""
        return f"@cert-authority {pattern} {self.host_ca_public}"

    def issue_user_certificate(self, public_key: asyncssh.SSHKey,
                               spec: UserCertificateSpec) -> asyncssh.SSHCertificate:
        """Sign a user certificate for ``public_key`` (PROTOCOL.certkeys, type user).

        Exactly one principal; ``permit-user-rc`` is never set; forwarding extensions only when the
        spec permits them.

        Raises:
            ValueError: empty principal or key id, or ``valid_before <= valid_after``.
        """
        _check_validity(spec.key_id, [spec.principal], spec.valid_after, spec.valid_before)
        return self._user_ca.generate_user_certificate(
            public_key, spec.key_id, serial=spec.serial, principals=[spec.principal],
            valid_after=spec.valid_after, valid_before=spec.valid_before,
            permit_x11_forwarding=spec.permit_x11_forwarding,
            permit_agent_forwarding=spec.permit_agent_forwarding,
            permit_port_forwarding=spec.permit_port_forwarding,
            permit_pty=spec.permit_pty, permit_user_rc=False,
        )

    def issue_host_certificate(self, public_key: asyncssh.SSHKey, *, serial: int, key_id: str,
                               principals: list[str], valid_after: int,
                               valid_before: int) -> asyncssh.SSHCertificate:
        """Sign a host certificate for ``public_key`` naming ``principals`` (host names).

        Raises:
            ValueError: no principals, empty key id, or ``valid_before <= valid_after``.
        """
        _check_validity(key_id, principals, valid_after, valid_before)
        return self._host_ca.generate_host_certificate(
            public_key, key_id, serial=serial, principals=list(principals),
            valid_after=valid_after, valid_before=valid_before,
        )


def _check_validity(key_id: str, principals: list[str], valid_after: int, valid_before: int) -> None:
    if not key_id:
        raise ValueError("a certificate needs a key id")
    if not principals or any(not p for p in principals):
        raise ValueError("a certificate needs at least one non-empty principal")
    if valid_before <= valid_after:
        raise ValueError(f"certificate validity is empty: {valid_after} >= {valid_before}")
